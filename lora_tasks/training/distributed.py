"""The only Ray glue: start or join Ray and launch `training.train_worker` on a TorchTrainer."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import hashlib
import json
import logging
import os
import queue
import shutil
import signal
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import ray
import ray.train
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from ..config import PipelineConfig
from ..data.prepare import PreparedData, StreamSpec, checkpoint_storage, columns, contract_kwargs
from ..data.sources import fingerprint, load_table, sample_rows, source_fingerprint
from ..data.streaming import (
    SAMPLE_ORDER,
    invalid_batch,
    merge_summaries,
    sample_batch,
    stream_format,
    summarise_batch,
    valid_batch,
)
from ..data.validation import ValidationReport, ValidationResult, enforce_policy, validate_splits
from ..errors import DataError, NonFiniteLoss, TrainingError, ValidationFailed
from .loop import ADAPTER_DIR, TrainResult, WorkerContext, train_worker

# Ray's default temp dir is long; unix socket paths are limited to 107 bytes.
RAY_TEMP_DIR = os.environ.get("PREFECT_LORA_RAY_TMP", "/tmp/plray")


# Where this process's local Ray tells its workers the state API is: nowhere that answers (the
# instance runs no dashboard). Without an address, a state API call searches the host for a Ray
# instance: beside another one (`ray start`, another user's job) Ray Train's placement-group
# cleaner raised "Found multiple active Ray instances" (a traceback in every run), or, where `ray
# start` left its address in /tmp/ray, went to that instance instead. (A local run now has no
# cleaner, `_Trainer`; the address keeps any other state API call at home.)
NO_STATE_API = "http://127.0.0.1:1"

_INIT_LOCK = threading.Lock()  # a fleet's members start their jobs from several threads: one ray.init


def ensure_ray(address: str | None, num_cpus: int | None = None) -> None:
    """Connect to the cluster at `address`, or start a local Ray sized for the job."""
    with _INIT_LOCK:
        if STOPPED_BY is not None:  # a fleet member's thread, after its process was stopped (Ctrl-C)
            raise TrainingError(f"stopped by signal {STOPPED_BY}: no new Ray instance is started")
        if not ray.is_initialized():
            _on_a_lasting_thread(lambda: _init_ray(address, num_cpus))


_STARTER: queue.SimpleQueue | None = None


def _on_a_lasting_thread(call: Callable[[], None]) -> None:
    """`call()` on the main thread or on one that lives as long as the process. Ray starts its local
    processes with a parent-death signal (SIGKILL), which Linux sends when the *thread* that
    started them ends: a local Ray started by a fleet member's thread died under the other
    members the moment that thread ran out of work ("Failed to connect to GCS within 60 seconds",
    then the process exited)."""
    global _STARTER
    if threading.current_thread() is threading.main_thread():
        return call()
    if _STARTER is None:
        _STARTER = queue.SimpleQueue()
        threading.Thread(target=_run_calls, args=(_STARTER,), name="ray-starter", daemon=True).start()
    done: queue.SimpleQueue = queue.SimpleQueue()
    _STARTER.put((call, done))
    raised = done.get()
    if raised is not None:
        raise raised


def _run_calls(calls: queue.SimpleQueue) -> None:
    while True:
        call, done = calls.get()
        try:
            call()
            done.put(None)
        except BaseException as exc:  # noqa: BLE001  (raised in the calling thread)
            done.put(exc)


def _init_ray(address: str | None, num_cpus: int | None) -> None:
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
    # Quiet, non-interactive runs: no usage stats, no dashboard.
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    # A worker's print (the progress lines) reaches the driver once, as printed: Ray Train's print
    # patch would also log it through its own logger, so each line came out twice.
    os.environ.setdefault("RAY_TRAIN_ENABLE_PRINT_PATCH", "0")
    # Ray's own INFO/WARNING lines (and the placement-group cleaner's complaint that the state
    # API, which needs the dashboard, is absent) are noise here; errors still come through.
    kwargs = dict(
        log_to_driver=True,
        include_dashboard=False,
        logging_config=ray.LoggingConfig(log_level=os.environ.get("PREFECT_LORA_RAY_LOG_LEVEL", "ERROR")),
    )
    with _signal_handlers(), _root_logger_kept():  # ray.init must not keep SIGTERM, nor the driver's root logger
        if address:
            ray.init(address=address, runtime_env=_runtime_env(), **kwargs)
        else:
            # One machine has no node to drain: no preemption watcher (and no core-worker error line about its actor).
            os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
            # address="local": a fresh instance, never a `ray start` cluster that happens to run here
            # No metrics: nothing reads them here (no dashboard), and the driver's exit flushed them to
            # a metrics agent that a terminal's Ctrl-C had already stopped: ray.shutdown took 20 s.
            ray.init(address="local", num_cpus=num_cpus, _temp_dir=RAY_TEMP_DIR,
                     runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": NO_STATE_API}},
                     _system_config={"enable_metrics_collection": False}, **kwargs)
    ray.data.DataContext.get_current().enable_progress_bars = False  # log lines, not bars, in a scheduled job


@contextlib.contextmanager
def _root_logger_kept():
    """The driver's root logger as it was before the block. `ray.init(logging_config=...)` gives
    the root logger a handler of Ray's (and sets its level): every error Prefect logged then came
    out twice, the second time in Ray's format with Ray's ids. The config still applies to the
    workers, where it belongs."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    try:
        yield
    finally:
        root.setLevel(level)
        for h in [h for h in root.handlers if h not in handlers]:
            root.removeHandler(h)


STOPPED_BY: int | None = None
"""The signal that interrupted a wait on Ray (`interruptible`), for the caller's exit code."""


@contextlib.contextmanager
def interruptible():
    """While the driver waits on Ray, SIGTERM and SIGINT interrupt it as Ctrl-C does. Ray's waits
    pass on only KeyboardInterrupt: any other exception raised by a signal handler inside them
    (Prefect's TerminationSignal, SystemExit) comes out as a SystemError, which a task would
    retry. Whatever Ray installs meanwhile ends with the block: a handler of a finished run
    would swallow the caller's Ctrl-C."""
    def stop(signum, frame):
        global STOPPED_BY
        STOPPED_BY = signum
        raise KeyboardInterrupt(f"stopped by signal {signum}")

    with _signal_handlers(stop):
        yield


_RESTORED_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGUSR1") if hasattr(signal, name))


@contextlib.contextmanager
def _signal_handlers(stop=None):
    """SIGTERM and SIGINT handled by `stop` in the block (None: whatever the block installs), and
    SIGTERM, SIGINT and SIGUSR1 by the handlers from before again after it. Without the restore,
    ray.init would keep SIGTERM (a bare `sys.exit`, and a native handler that aborts the process
    3 s after the signal, so a stopped run could not clean up: its Prefect server and MLflow run
    were left behind), and Tune would keep SIGINT and SIGUSR1. Signal handlers belong to the main
    thread: elsewhere nothing changes."""
    main = threading.current_thread() is threading.main_thread()
    previous = {sig: signal.getsignal(sig) for sig in _RESTORED_SIGNALS} if main else {}
    if main and stop is not None:
        signal.signal(signal.SIGTERM, stop)
        signal.signal(signal.SIGINT, stop)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(sig, handler)


class _Trainer(TorchTrainer):
    """A TorchTrainer that leaves SIGINT to the driver (`interruptible`). Ray Train's own handler,
    set in `fit` and never put back, aborts the run's controller and then calls `sys.exit(0)`
    inside a Ray wait: Ctrl-C during training came out as a SystemError (a task retried it, a test
    session went on with its next test), and after training it reached a finished run's handler
    instead of the program. Ctrl-C now stops the driver as SIGTERM does; the next attempt resumes
    from the latest checkpoint as after any stop.

    On a local Ray (`local`: no `scaling.address`) it runs without Ray Train's placement-group
    cleaner, an actor per run that asks the state API whether the controller lives, to free the
    run's resources if it died: the local instance serves no state API (`NO_STATE_API`), so the
    cleaner could never tell, and it ends with the driver anyway. On a busy host its stop timed out
    and printed a traceback at the end of a run that had succeeded; and its process cost every run."""

    local = False

    def _register_sigint_handler(self, controller) -> None:
        pass

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        return [c for c in callbacks if not (self.local and type(c).__name__ == "PlacementGroupCleanerCallback")]


def ensure_ray_for(cfg: PipelineConfig) -> None:
    """`ensure_ray` for this config. A local Ray gets one logical CPU more than the workers take,
    so Ray Data's read and validation tasks can run beside them (on a cluster, leave that room)."""
    s = cfg.scaling
    ensure_ray(s.address, num_cpus=None if s.address else max(os.cpu_count() or 1, s.num_workers * s.cpus_per_worker) + 1)


def _runtime_env() -> dict:
    """What an existing cluster's workers get with the job: this package's code (uploaded, so the
    cluster needs only the dependencies, not a copy of the project) and quiet, offline-safe
    settings. The config and in-memory data travel in the trainer's `train_loop_config`."""
    env = {k: os.environ[k] for k in _FORWARDED_ENV if k in os.environ}
    return {"py_modules": [_package_for_workers()], "env_vars": {"TOKENIZERS_PARALLELISM": "false", **env}}


@functools.cache
def _package_for_workers() -> str:
    """The `prefect_lora` package folder as workers import it: where it is installed (a wheel
    holds `lora_tasks` inside it), else, from a checkout or an editable install where the folders
    sit apart, a copy of its `__init__` and of `lora_tasks` (workers need no flows)."""
    top = sys.modules[__name__.split(".")[0]]
    package, library = Path(top.__file__).parent, Path(__file__).resolve().parents[1]
    if (package / "lora_tasks").resolve() == library:
        return str(package)
    staged = Path(tempfile.mkdtemp(prefix="prefect-lora-job-")) / package.name
    shutil.copytree(library, staged / "lora_tasks", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy2(package / "__init__.py", staged / "__init__.py")
    return str(staged)


# Settings of the driver that workers elsewhere must see too (model cache, hub access, logging).
_FORWARDED_ENV = ("PREFECT_LORA_CACHE", "RAY_DATA_DISABLE_PROGRESS_BARS", "HF_HOME", "HF_HUB_OFFLINE", "HF_TOKEN", "TRANSFORMERS_OFFLINE",
                  "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_TOKEN")


def _ray_worker_loop(config: dict) -> None:
    """Entry point on each Ray Train worker: bridge Ray's context into a WorkerContext."""
    import torch

    cfg = PipelineConfig.model_validate(config["pipeline"])
    _quiet_report_lines()
    ctx = ray.train.get_context()
    torch.set_num_threads(cfg.scaling.cpus_per_worker)
    device = ray.train.torch.get_device() if cfg.scaling.use_gpu else torch.device("cpu")
    checkpoint = ray.train.get_checkpoint()

    def report(metrics: dict, checkpoint_dir: str | None) -> None:
        ckpt = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=ckpt)

    log = config.get("step_log")
    rank = ctx.get_world_rank()
    # Where each rank runs (node, host, pid) goes out with every report, for the run's record.
    placement = _gather_placement(rank, ctx.get_world_size())

    def report_with_placement(metrics: dict, checkpoint_dir: str | None) -> None:
        _exit_if_driver_gone(config.get("driver"))
        if log and rank == 0:
            log.flush()  # the curve up to a checkpoint is kept with it, and sent to the store
        report({**metrics, **placement}, checkpoint_dir)

    resume_dir = None
    with tempfile.TemporaryDirectory(prefix="lora-resume-") as tmp:
        if checkpoint is not None:
            resume_dir = checkpoint.to_directory(tmp)
        relay = config.get("progress")
        worker_ctx = WorkerContext(
            rank=rank, world_size=ctx.get_world_size(), device=device,
            report=report_with_placement, resume_from=resume_dir,
            **({"log": log} if log and rank == 0 else {}),
            # `is not None`: an empty queue is falsy
            **({"progress": _progress_onto(relay)} if relay is not None and rank == 0 else {}),
        )
        stream = config.get("stream")
        if stream:
            worker_ctx.stream = _shard_batches(ray.train.get_dataset_shard("train"), cfg, rank, ctx.get_world_size(), stream["num_rows"])
            worker_ctx.stream_rows = stream["num_rows"]
        try:
            train_worker(cfg, config["rows"], worker_ctx)
        finally:
            if log and rank == 0:
                getattr(log, "close", log.flush)()  # the last flush: what the store lacks stays kept


def _progress_onto(queue) -> Callable[[str], None]:
    """Rank 0's progress lines onto the driver's queue (`_relayed_progress`); printed, as without
    one, when the queue is gone."""
    def put(line: str) -> None:
        try:
            queue.put_nowait(line)
        except Exception:  # noqa: BLE001  (the driver's queue gone: the line still reaches Ray's log)
            print(line, flush=True)

    return put


@contextlib.contextmanager
def _relayed_progress(progress: Callable[[str], None] | None):
    """Rank 0's progress lines, wherever it runs, handed to `progress` in this process as they come:
    the workers put them on a Ray queue (an actor that takes no CPU), a thread here takes them off
    (in this context: a Prefect task's logger knows its run). Yields the queue for the workers;
    None without `progress` (they print, and Ray shows the lines in this process's terminal)."""
    if progress is None:
        yield None
        return
    from ray.util.queue import Empty, Queue

    queue, finished = Queue(actor_options={"num_cpus": 0}), threading.Event()

    def relay() -> None:
        while True:
            try:
                line = queue.get(timeout=0.5)
            except Empty:
                if finished.is_set():
                    return  # every line put before training ended has been handed on
                continue
            except Exception:  # noqa: BLE001  (Ray shut down under it: no more lines come)
                return
            progress(line)

    thread = threading.Thread(target=contextvars.copy_context().run, args=(relay,), daemon=True,
                              name="training-progress")
    thread.start()
    try:
        yield queue
    finally:
        finished.set()
        thread.join(timeout=10)
        if ray.is_initialized():  # else (a stop shut Ray down) the queue is gone, and a call would start a new Ray
            queue.shutdown()


def _driver_identity() -> dict:
    """This process as a local Ray's workers can tell it is alive: pid and start time."""
    import psutil

    return {"pid": os.getpid(), "started": psutil.Process().create_time()}


def _exit_if_driver_gone(driver: dict | None) -> None:
    """End this worker at once when the driver that started the local Ray is gone (killed:
    SIGKILL, the OOM killer). Ray stops the workers of a dead driver's cluster only when its
    raylet goes, a few seconds later: a worker reporting meanwhile wrote a checkpoint (and logged
    steps) for a run that no longer existed. A driver killed but not yet reaped (a zombie) is gone.
    On a cluster (`scaling.address`) the driver may be on another machine: Ray's own fate
    sharing with the job applies there."""
    if not driver:
        return
    import psutil

    try:
        process = psutil.Process(driver["pid"])
        alive = abs(process.create_time() - driver["started"]) < 1 and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        alive = False
    if not alive:
        os._exit(1)


def _shard_batches(shard, cfg: PipelineConfig, rank: int, world_size: int, num_rows: int):
    """This rank's micro-batches from the streamed train split, resumable at a micro-batch count.

    Every rank reads the same ordered stream (`preserve_order`, a seeded local shuffle per epoch)
    in global batches of `batch_size * world_size` rows and keeps its own slice of each: the data
    position is then just a count, so a restart skips exactly what was trained."""
    t = cfg.training
    global_batch = t.batch_size * world_size
    per_epoch = num_rows // global_batch
    if per_epoch == 0:
        raise TrainingError(f"{num_rows} streamed train rows cannot fill one batch of {t.batch_size} on {world_size} workers")

    def batches(start: int):
        epoch, skip = divmod(start, per_epoch)
        while True:
            it = shard.iter_batches(batch_size=global_batch, batch_format="pandas", drop_last=True,
                                    local_shuffle_buffer_size=4 * global_batch, local_shuffle_seed=t.seed + epoch)
            for j, batch in enumerate(it):
                if j >= per_epoch:
                    break
                if j >= skip:
                    yield batch.iloc[rank::world_size].to_dict("records")
            epoch, skip = epoch + 1, 0

    return batches


def read_source(path: str, fmt: str):
    """A Ray Data dataset of the source, each row with the file it came from (`path`)."""
    if fmt == "jsonl":  # Arrow's reader (JSON lines): keeps JSON types, where lines=True (pandas) turns " 80" into 80
        return ray.data.read_json(path, include_paths=True)
    if fmt == "parquet":
        return ray.data.read_parquet(path, include_paths=True)
    if fmt == "csv":
        return ray.data.read_csv(path, include_paths=True)
    raise DataError(f"{path}: format {fmt!r} cannot be streamed; use jsonl, parquet or csv, or set data.loader: memory")


def _streamed_train(cfg: PipelineConfig, spec: StreamSpec):
    ds = read_source(spec.path, spec.format)
    if cfg.data.max_train_rows:
        ds = ds.limit(cfg.data.max_train_rows)
    return ds


def sample_stream_rows(cfg: PipelineConfig, spec: StreamSpec, limit: int | None) -> list[dict]:
    """A sample of `limit` (all without one) valid train rows of a streamed split, chosen by content
    hash, so the same in every run (and the baseline fit on it is read back from its cache): what
    a classifier's baseline is fit on, without holding the split in memory."""
    ensure_ray_for(cfg)
    share = 1.0 if not limit or spec.num_rows <= limit else min(1.0, 1.2 * limit / spec.num_rows)
    rows = _streamed_train(cfg, spec).map_batches(
        valid_batch, batch_format="pandas", fn_kwargs={"cfg": cfg, "eval_fraction": spec.eval_fraction, "split": "train"}
    ).map_batches(sample_batch, batch_format="pandas", fn_kwargs={"cfg": cfg, "share": share}).take_all()
    rows.sort(key=lambda r: r[SAMPLE_ORDER])  # Ray Data keeps no order: the content hash gives one
    return [{k: v for k, v in r.items() if k != SAMPLE_ORDER} for r in rows[:limit]]


def prepare_streaming_data(cfg: PipelineConfig, out_dir: str | Path) -> PreparedData:
    """Validate the train source on Ray Data (`map_batches`, one summary per batch), apply the
    policy, set invalid rows aside as JSONL files (quarantine), and collect the eval rows.

    The eval split comes from `eval_path` (read in memory), or else from the rows whose content
    hash falls below `eval_fraction` (at most `max_eval_rows`, default 1000, are kept)."""
    d = cfg.data
    ensure_ray_for(cfg)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fmt = stream_format(cfg)
    eval_fraction = None if d.eval_path else d.eval_fraction
    spec = StreamSpec(d.train_path, fmt, 0, eval_fraction)
    try:
        ds = _streamed_train(cfg, spec)
        summaries = ds.map_batches(summarise_batch, batch_format="pandas", fn_kwargs={"cfg": cfg, "eval_fraction": eval_fraction}).take_all()
    except ray.exceptions.RayTaskError as exc:
        cause = getattr(exc, "cause", exc)
        if isinstance(cause, (DataError, ValidationFailed)):
            raise cause from None
        raise DataError(f"{d.train_path}: Ray Data could not read it as {fmt}: {cause}. Fix the file or set data.format") from None
    report = merge_summaries(summaries, cfg.task)
    eval_rows: list[dict] = []
    if d.eval_path:  # read and checked in memory, as on the other path; the stream is all train rows then
        eval_df = sample_rows(load_table(d.eval_path, d.format), d.max_eval_rows, cfg.training.seed)
        eval_result = validate_splits(eval_df.iloc[0:0], eval_df, **{**contract_kwargs(cfg), "check_overlap": False})
        report = ValidationReport.combine(cfg.task, [report, eval_result.report])
        eval_rows = eval_result.eval[columns(cfg)].to_dict("records")
    files = report.write(out_dir)
    quarantine = None
    if not report.ok and d.validation.policy == "quarantine":
        quarantine = out_dir / "quarantine"
        shutil.rmtree(quarantine, ignore_errors=True)
        ds.map_batches(invalid_batch, batch_format="pandas", fn_kwargs={"cfg": cfg, "eval_fraction": eval_fraction}).write_json(str(quarantine))
    # The policy on the counts: the same rules, and messages, as the in-memory path.
    empty = pd.DataFrame(columns=columns(cfg))
    enforce_policy(ValidationResult(empty, empty, empty, report), policy=d.validation.policy,
                   max_invalid_fraction=d.validation.max_invalid_fraction, quarantine_dir=out_dir)
    if not d.eval_path:
        limit = d.max_eval_rows or 1000
        eval_ds = ds.map_batches(valid_batch, batch_format="pandas", fn_kwargs={"cfg": cfg, "eval_fraction": eval_fraction, "split": "eval"})
        eval_rows = eval_ds.limit(limit).take_all()
        eval_rows = [{c: r[c] for c in columns(cfg)} for r in eval_rows]
    fp = hashlib.sha256(f"{source_fingerprint(d.train_path, d.eval_path)}:{json.dumps(report.to_dict(), sort_keys=True, default=str)}".encode()).hexdigest()
    # the streamed train rows are never all read here: their source and the split rule identify them
    train_source = f"{source_fingerprint(d.train_path)}:train:{eval_fraction}"
    digests = {"train": hashlib.sha256(train_source.encode()).hexdigest(),
               "eval": fingerprint(pd.DataFrame(eval_rows, columns=columns(cfg)))}
    return PreparedData(
        train_rows=[], eval_rows=eval_rows, fingerprint=fp, report=report, digests=digests,
        quarantine_path=str(quarantine) if quarantine else None,
        files=files,
        train_stream=StreamSpec(spec.path, fmt, report.valid_rows["train"], eval_fraction),
    )


def _quiet_report_lines() -> None:
    """Ray Train V2 logs each report (metrics and all) at INFO, on a logger named by its file
    path, which `LoggingConfig` does not reach; the metrics go to MLflow anyway."""
    import logging

    try:
        from ray.train.v2._internal.execution import context
    except ImportError:  # another Ray layout: nothing to quiet
        return
    logging.getLogger(context.__file__).setLevel(logging.WARNING)


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
    step_log=None,
    max_failures: int | None = None,
    stream: StreamSpec | None = None,
    progress: Callable[[str], None] | None = None,
) -> TrainResult:
    """Train on Ray Train with `cfg.scaling` (whatever `scaling.launcher` says); copy the final adapter to `run_dir/adapter`.

    Checkpoints go to `train/` under the run's checkpoint storage (the run folder, or its place
    under a storage URI). Ray Train restarts failed workers from the latest checkpoint up to
    `max_failures` times (default `scaling.max_failures`); a new attempt with the same run folder
    (a Prefect retry, or the same config and data run again) continues from it too. Rank 0's
    progress lines come to `progress` here as they are written (`_relayed_progress`)."""
    ensure_ray_for(cfg)
    run_dir = Path(run_dir)
    storage = checkpoint_storage(cfg, run_dir)
    with _relayed_progress(progress) as relay:
        trainer = _trainer(cfg, rows, storage, step_log, max_failures, stream, relay)
        try:
            with interruptible():
                result = trainer.fit()
        except ray.train.TrainingFailedError as exc:
            raise _training_error(exc, storage) from exc
    if result.checkpoint is None:
        raise TrainingError("training finished without reporting a checkpoint")
    adapter_dir = run_dir / ADAPTER_DIR
    with result.checkpoint.as_directory() as ckpt:
        if adapter_dir.exists():
            shutil.rmtree(adapter_dir)
        shutil.copytree(Path(ckpt) / ADAPTER_DIR, adapter_dir)
    return TrainResult(str(adapter_dir), result.checkpoint.path, dict(result.metrics or {}))


def _trainer(cfg: PipelineConfig, rows: list[dict], storage: str, step_log, max_failures: int | None,
             stream: StreamSpec | None, relay) -> TorchTrainer:
    """The job of `train_adapter`: `_ray_worker_loop` on `scaling.num_workers` workers, checkpoints in `storage`."""
    s = cfg.scaling
    datasets, data_config = {}, None
    if stream is not None:  # every worker reads the whole ordered stream and keeps its slice
        train = _streamed_train(cfg, stream).map_batches(
            valid_batch, batch_format="pandas", fn_kwargs={"cfg": cfg, "eval_fraction": stream.eval_fraction, "split": "train"})
        datasets = {"train": train}
        data_config = ray.train.DataConfig(datasets_to_split=[], execution_options=ray.data.ExecutionOptions(preserve_order=True))
    trainer = _Trainer(
        _ray_worker_loop,
        train_loop_config={
            "pipeline": cfg.model_dump(mode="json"),
            "rows": rows,
            "stream": {"num_rows": stream.num_rows} if stream else None,
            "step_log": step_log,
            "progress": relay,
            "driver": None if s.address else _driver_identity(),
        },
        datasets=datasets or None,
        **({"dataset_config": data_config} if data_config else {}),
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
    trainer.local = not s.address
    return trainer


def _training_error(exc: Exception, storage) -> TrainingError:
    """Ray's report of a failed training as one error: a diverged loss as itself (no retry can
    help), anything else with where the checkpoints so far are kept."""
    diverged = [e for e in getattr(exc, "worker_failures", {}).values() if isinstance(e, NonFiniteLoss)]
    if diverged:
        return NonFiniteLoss(str(diverged[0]).strip().splitlines()[-1])
    return TrainingError(f"training failed on Ray: {exc}; checkpoints so far are kept in {storage}/train")


def tune_trials(cfg: PipelineConfig, trial, settings: list[dict], run_dir: str | Path) -> list:
    """`trial(settings)` for each entry as a Ray Tune trial, each with the CPUs (and GPU) the
    configured run's workers take together: side by side where the cluster has room for several,
    one at a time otherwise. Returns each trial's return value, in the order of `settings`; a
    failed trial raises a TrainingError naming its settings (the others' results stay on disk)."""
    from ray import tune

    ensure_ray_for(cfg)
    s = cfg.scaling
    resources = {"cpu": s.num_workers * s.cpus_per_worker, **({"gpu": 1} if s.use_gpu else {})}

    def run(config: dict) -> dict:
        return {"result": trial(settings[config["index"]])}

    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # no progress tables in a scheduled job's log
    os.environ.setdefault("TUNE_DISABLE_SIGINT_HANDLER", "1")  # Ctrl-C stops the driver (`interruptible`), not just Tune
    tuner = tune.Tuner(
        tune.with_resources(run, resources),
        param_space={"index": tune.grid_search(list(range(len(settings))))},
        run_config=tune.RunConfig(name="remedy-search", storage_path=str(Path(run_dir).resolve() / "tune"), verbose=0),
    )
    with interruptible():
        grid = tuner.fit()
    by_index = {r.config["index"]: r for r in grid}
    failed = [(i, r.error) for i, r in sorted(by_index.items()) if r.error]
    if failed:
        i, err = failed[0]
        raise TrainingError(f"remedy search: trial {settings[i]} failed ({type(err).__name__}: {err})")
    return [by_index[i].metrics["result"] for i in range(len(settings))]
