"""How data and work reach the workers: in memory or streamed through Ray Data, trained on Ray
Train (`distributed.py`) or by the same loop in this process. The launcher pair is the only place
that decides this, and `distributed.py` the only module that imports Ray.

One worker on this machine needs no Ray: starting a local Ray instance, a Ray Train controller
and a worker process that imports torch and loads the model again costs ~20 s a run on a small
machine, more than short trainings take. `scaling.launcher: auto` runs such jobs here; a job
with more workers, a cluster address, streamed data or a storage URI goes to Ray Train."""

from __future__ import annotations

import gc
import os
import re
import shutil
import socket
from collections.abc import Callable
from pathlib import Path

from ..config import PipelineConfig
from ..data.evidence import check_evidence_files
from ..data.prepare import PreparedData, StreamSpec, checkpoint_storage, prepare_in_memory
from ..data.streaming import streams_train_data
from ..errors import TrainingError
from .loop import ADAPTER_DIR, TrainResult, WorkerContext, train_worker
from .replay import check_disjoint

CHECKPOINT_NAME = "checkpoint_step_{:06d}"  # beside Ray's `checkpoint_<timestamp>`, never mistaken for one
_CHECKPOINT_RE = re.compile(r"checkpoint_step_(\d+)$")
_KEEP = 2  # checkpoints kept, as Ray Train's CheckpointConfig(num_to_keep=2) on the other path


def prepare_data(cfg: PipelineConfig, out_dir: str | Path) -> PreparedData:
    """Load, split, sample and validate the data; write the report (and quarantine) to `out_dir`.

    Raises ValidationFailed (with the report) when the contract's policy stops the run. Large
    sources (see `data.loader`) are validated on Ray Data instead and stream to the workers."""
    check_evidence_files(cfg)  # a missing reference corpus or benchmark fails now, not after training
    check_disjoint(cfg)  # replay must not be the forgetting evidence: refused before any work
    if streams_train_data(cfg):
        from .distributed import prepare_streaming_data

        return prepare_streaming_data(cfg, out_dir)
    return prepare_in_memory(cfg, out_dir)


def baseline_rows(cfg: PipelineConfig, data: PreparedData) -> list[dict]:
    """The train rows a classifier's baseline (`baseline.py`) is fit on: the split in memory, or a
    sample of `evaluation.baseline_rows` of a streamed one (read on Ray Data)."""
    if cfg.task != "sequence_classification" or data.train_stream is None:
        return data.train_rows
    from .distributed import sample_stream_rows

    return sample_stream_rows(cfg, data.train_stream, cfg.evaluation.baseline_rows)


def launcher_for(cfg: PipelineConfig, streaming: bool = False) -> str:
    """`local` or `ray`: what `scaling.launcher` means for this config."""
    why_not_local = cfg.why_not_in_process(streaming)
    if cfg.scaling.launcher == "local" and why_not_local:
        raise TrainingError(f"scaling.launcher: local trains one worker in this process, but {why_not_local}; "
                            "set scaling.launcher: ray (or auto)")
    if cfg.scaling.launcher == "auto":
        return "ray" if why_not_local else "local"
    return cfg.scaling.launcher


def train_adapter(cfg: PipelineConfig, rows: list[dict], run_dir: str | Path, *, step_log=None,
                  max_failures: int | None = None, stream: StreamSpec | None = None,
                  progress: Callable[[str], None] | None = None) -> TrainResult:
    """Train with the launcher `scaling.launcher` picks; the adapter ends in `run_dir/adapter`.
    `step_log` takes the loop's `(metrics, step)`, is flushed at each checkpoint and closed at the
    end (the caller's MLflow run: `registry.tracking.metric_logger`, which never raises into the
    loop, a store outage included); it travels to Ray's rank 0 by pickle. `progress` takes each
    progress line of rank 0 (`loop.progress_line`), in this process whichever launcher trains (a
    flow's run logger); without it they are printed where the loop runs.

    Either way, a new attempt with the same run folder (a Prefect retry, or the same config and
    data run again) continues from the latest checkpoint."""
    if launcher_for(cfg, streaming=stream is not None) == "local":
        return train_in_process(cfg, rows, run_dir, step_log=step_log, progress=progress)
    from .distributed import train_adapter as train_on_ray

    return train_on_ray(cfg, rows, run_dir, step_log=step_log, max_failures=max_failures, stream=stream,
                        progress=progress)


def run_trials(cfg: PipelineConfig, trial, settings: list[dict], run_dir: str | Path) -> list:
    """A remedy search's trials, `trial(settings)` each, as Ray Tune trials (in parallel where the
    cluster has room; one at a time on one machine). Their results, in order."""
    if not settings:
        return []
    from .distributed import tune_trials

    return tune_trials(cfg, trial, settings, run_dir)


def train_in_process(cfg: PipelineConfig, rows: list[dict], run_dir: str | Path, *, step_log=None,
                     progress: Callable[[str], None] | None = None) -> TrainResult:
    """One worker, here: `scaling.cpus_per_worker` torch threads (as a Ray worker gets), the
    device `scaling.use_gpu` asks for, checkpoints in `run_dir/train/checkpoint_step_NNNNNN`
    (written whole, then renamed into place, so the latest one is always complete)."""
    import torch

    run_dir = Path(run_dir)
    train_dir = Path(checkpoint_storage(cfg, run_dir)) / "train"
    train_dir.mkdir(parents=True, exist_ok=True)
    if cfg.scaling.use_gpu and not torch.cuda.is_available():
        raise TrainingError("scaling.use_gpu is set but this machine has no CUDA GPU; set scaling.use_gpu: false")
    device = torch.device("cuda", 0) if cfg.scaling.use_gpu else torch.device("cpu")
    latest = latest_checkpoint(train_dir)
    last: dict = {}

    log = step_log
    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        last["metrics"] = metrics
        if log:
            log.flush()  # the curve up to a checkpoint is kept with it, and sent to the store
        if checkpoint_dir:
            last["path"] = _keep_checkpoint(train_dir, checkpoint_dir, int(metrics["step"]))
    ctx = WorkerContext(device=device, report=report, resume_from=str(latest) if latest else None,
                        **({"log": log} if log else {}), **({"progress": progress} if progress else {}))
    threads = torch.get_num_threads()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    try:
        train_worker(cfg, rows, ctx)
    finally:
        if log:
            getattr(log, "close", log.flush)()  # the last flush: what the store lacks stays kept
        torch.set_num_threads(threads)
        gc.collect()  # the model and optimizer are garbage now: free them before evaluation loads the base again
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "path" not in last:
        raise TrainingError("training finished without writing a checkpoint")
    adapter_dir = run_dir / ADAPTER_DIR
    shutil.rmtree(adapter_dir, ignore_errors=True)
    shutil.copytree(last["path"] / ADAPTER_DIR, adapter_dir)
    placement = {"worker_nodes": "local", "worker_hosts": socket.gethostname(), "worker_pids": str(os.getpid())}
    return TrainResult(str(adapter_dir), str(last["path"]), {**last["metrics"], **placement})


def latest_checkpoint(train_dir: Path) -> Path | None:
    """The newest complete checkpoint this launcher wrote in `train_dir`, if any."""
    saved = _saved_checkpoints(train_dir)
    return saved[-1] if saved else None


def _saved_checkpoints(train_dir: Path) -> list[Path]:
    """This launcher's complete checkpoints in `train_dir`, oldest first."""
    found = [(int(m.group(1)), p) for p in train_dir.glob("checkpoint_step_*") if (m := _CHECKPOINT_RE.search(p.name))]
    return [p for _, p in sorted(found)]


def _keep_checkpoint(train_dir: Path, folder: str, step: int) -> Path:
    """Copy the loop's checkpoint folder in under its step, atomically; keep the newest few."""
    final = train_dir / CHECKPOINT_NAME.format(step)
    partial = train_dir / f".{final.name}.partial"
    shutil.rmtree(partial, ignore_errors=True)
    shutil.copytree(folder, partial)
    if final.exists():  # the same step again (resumed from the final checkpoint)
        shutil.rmtree(final)
    partial.rename(final)
    for old in _saved_checkpoints(train_dir)[:-_KEEP]:
        shutil.rmtree(old, ignore_errors=True)
    return final
