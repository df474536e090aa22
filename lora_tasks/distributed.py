"""The only Ray glue: start or join Ray and launch `training.train_worker` on a TorchTrainer."""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from .config import PipelineConfig
from .pipeline import checkpoint_storage
from .errors import TrainingError
from .training import ADAPTER_DIR, WorkerContext, train_worker

# Ray's default temp dir is long; unix socket paths are limited to 107 bytes.
RAY_TEMP_DIR = os.environ.get("PREFECT_LORA_RAY_TMP", "/tmp/plray")


@dataclass(frozen=True)
class TrainResult:
    """Where the trained adapter and the last checkpoint are, and the final training metrics."""

    adapter_dir: str
    checkpoint_path: str
    metrics: dict


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address`, or start a local Ray sized for the job."""
    if ray.is_initialized():
        return
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Quiet, non-interactive runs: no usage stats, no dashboard.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # Ray's own INFO/WARNING lines (and the placement-group cleaner's complaint that the state
    # API, which needs the dashboard, is absent) are noise here; errors still come through.
    kwargs = dict(
        log_to_driver=True,
        include_dashboard=False,
        logging_config=ray.LoggingConfig(log_level=os.environ.get("PREFECT_LORA_RAY_LOG_LEVEL", "ERROR")),
    )
    if address:
        ray.init(address=address, runtime_env=_runtime_env(), **kwargs)
    else:
        ray.init(num_cpus=num_cpus, _temp_dir=RAY_TEMP_DIR, **kwargs)


def _runtime_env() -> dict:
    """What an existing cluster's workers get with the job: this package's code (uploaded, so the
    cluster needs only the dependencies, not a copy of the project) and quiet, offline-safe
    settings. The config and in-memory data travel in the trainer's `train_loop_config`."""
    root = Path(__file__).resolve().parents[1]
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    return {"py_modules": [str(root / "lora_tasks")], "env_vars": {"TOKENIZERS_PARALLELISM": "false", **env}}


# Settings of the driver that workers elsewhere must see too (model cache, hub access, logging).
_FORWARDED_ENV = ("PREFECT_LORA_CACHE", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "TRANSFORMERS_OFFLINE",
                  "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _ray_worker_loop(config: dict) -> None:
    """Entry point on each Ray Train worker: bridge Ray's context into a WorkerContext."""
    import torch

    from .registry import metric_logger

    cfg = PipelineConfig.model_validate(config["pipeline"])
    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    log = metric_logger(config["tracking_uri"], config["mlflow_run_id"]) if config.get("mlflow_run_id") else None
    rank = ctx.get_world_rank()
    # Where each rank runs (node, host, pid) goes out with every report, for the run's record.
    placement = _gather_placement(rank, ctx.get_world_size())

    def report_with_placement(metrics: dict, checkpoint_dir: str | None) -> None:
        report({**metrics, **placement}, checkpoint_dir)

    resume_dir = None
    with tempfile.TemporaryDirectory(prefix="lora-resume-") as tmp:
        if checkpoint is not None:
            resume_dir = checkpoint.to_directory(tmp)
        worker_ctx = WorkerContext(
            rank=rank, world_size=ctx.get_world_size(), device=device,
            report=report_with_placement, resume_from=resume_dir,
            **({"log": log} if log and rank == 0 else {}),
        )
        train_worker(cfg, config["rows"], worker_ctx)


def _gather_placement(rank: int, world_size: int) -> dict[str, str]:
    import socket

    import torch.distributed as dist

    me = (ray.get_runtime_context().get_node_id(), socket.gethostname(), os.getpid())
    every = [me]
    if world_size > 1 and dist.is_initialized():
        every = [None] * world_size
        dist.all_gather_object(every, me)
    return {
        "worker_nodes": ",".join(n for n, _, _ in every),
        "worker_hosts": ",".join(h for _, h, _ in every),
        "worker_pids": ",".join(str(p) for _, _, p in every),
    }


def train_adapter(
    cfg: PipelineConfig,
    rows: list[dict],
    run_dir: str | Path,
    *,
    mlflow_run_id: str | None = None,
    max_failures: int | None = None,
) -> TrainResult:
    """Train on Ray Train with `cfg.scaling`; copy the final adapter to `run_dir/adapter`.

    Checkpoints go to `train/` under the run's checkpoint storage (the run folder, or its place
    under a storage URI). Ray Train restarts failed workers from the latest checkpoint up to
    `max_failures` times (default `scaling.max_failures`); a new attempt with the same run folder
    (a Prefect retry, or the same config and data run again) continues from it too."""
    s = cfg.scaling
    ensure_ray(s.address, num_cpus=None if s.address else max(os.cpu_count() or 1, s.num_workers * s.cpus_per_worker))
    run_dir = Path(run_dir)
    storage = checkpoint_storage(cfg, run_dir)
    trainer = TorchTrainer(
        _ray_worker_loop,
        train_loop_config={
            "pipeline": cfg.model_dump(mode="json"),
            "rows": rows,
            "tracking_uri": cfg.tracking.tracking_uri,
            "mlflow_run_id": mlflow_run_id,
        },
        scaling_config=ScalingConfig(
            num_workers=s.num_workers, use_gpu=s.use_gpu, resources_per_worker={"CPU": s.cpus_per_worker}
        ),
        run_config=RunConfig(
            name="train",
            storage_path=storage,
            failure_config=FailureConfig(max_failures=s.max_failures if max_failures is None else max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            logging_config=ray.train.LoggingConfig(log_level=os.environ.get("PREFECT_LORA_RAY_TRAIN_LOG_LEVEL", "WARNING")),
        ),
    )
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as exc:
        raise TrainingError(f"training failed on Ray: {exc}; checkpoints so far are kept in {storage}/train") from exc
    if result.checkpoint is None:
        raise TrainingError("training finished without reporting a checkpoint")
    adapter_dir = run_dir / ADAPTER_DIR
    with result.checkpoint.as_directory() as ckpt:
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        shutil.copytree(Path(ckpt) / ADAPTER_DIR, adapter_dir)
    return TrainResult(str(adapter_dir), result.checkpoint.path, dict(result.metrics or {}))
