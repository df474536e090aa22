"""MLflow tracking I/O: the pipeline's runs, their params, metrics, tags and artifacts. No decisions."""

from __future__ import annotations

import contextlib
import contextvars
import json
import logging
import os
import re
import sys
import threading
import time
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric

from ..config import PipelineConfig
from ..secrets import redacted_config, without_credentials
from .kept_points import PointFile, PointMemory, kept_points_path

os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")
log = logging.getLogger(__name__)


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to `tracking_uri`; also points the fluent API there (pyfunc logging needs it)."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


EXPERIMENT_KIND = ("mlflow.experimentKind", "custom_model_development")
"""Marks the experiment as model training: the MLflow UI opens its runs, charts and models, not
its GenAI pages (an empty traces view)."""


def ensure_experiment(c: MlflowClient, name: str, artifact_location: str) -> str:
    """The experiment's id, creating it with an explicit artifact location when absent; marked as
    model training either way (`EXPERIMENT_KIND`) unless someone chose a kind for it already."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        if EXPERIMENT_KIND[0] not in exp.tags:
            c.set_experiment_tag(exp.experiment_id, *EXPERIMENT_KIND)
        return exp.experiment_id
    location = artifact_location if "://" in artifact_location else Path(artifact_location).resolve().as_uri()
    return c.create_experiment(name, artifact_location=location, tags=dict([EXPERIMENT_KIND]))


def flatten(d: dict, prefix: str = "") -> dict[str, str]:
    """Nested config as `section.key` -> string, the way MLflow params want it."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten(v, key + "."))
        else:
            out[key] = json.dumps(v) if isinstance(v, (list, tuple)) else str(v)
    return out


def start_run(cfg: PipelineConfig, run_name: str, tags: dict[str, str]) -> str:
    """Create the pipeline's MLflow run with the config as params; returns the run id. A retry of
    an attempt that died part way continues its run and logs the params it still lacks."""
    c = client(cfg.tracking.tracking_uri)
    exp_id = ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
    # Before the run exists: a config that cannot become params leaves no empty run behind.
    params = flatten(redacted_config(cfg.model_dump(mode="json")))  # a webhook URL's token never in params
    run_id = _unfinished_run(c, exp_id, tags)
    if run_id:  # an earlier attempt of this very run died: continue its record
        c.update_run(run_id, status="RUNNING")
        for k, v in tags.items():
            c.set_tag(run_id, k, v)
    else:
        run_id = c.create_run(exp_id, run_name=run_name, tags=tags).info.run_id
    log_missing_params(c, run_id, params)
    return run_id


PARAMS_DIFFERING_TAG = "lora.params_differing"
"""Tag of a continued run whose params, logged by an earlier attempt, differ from this attempt's."""


def log_missing_params(c: MlflowClient, run_id: str, params: dict[str, str]) -> dict[str, tuple[str, str]]:
    """Log the params of `params` that the run lacks (an earlier attempt may have logged some).
    MLflow params never change: one the run holds with another value keeps it, and is reported in
    a warning and the run's tag `PARAMS_DIFFERING_TAG`. Returns those, as key -> (held, new)."""
    params = {k: v[:6000] for k, v in params.items()}  # MLflow's limit on a param's value
    held = c.get_run(run_id).data.params
    missing = [mlflow.entities.Param(k, v) for k, v in params.items() if k not in held]
    for i in range(0, len(missing), 100):
        c.log_batch(run_id, params=missing[i : i + 100])
    differing = {k: (held[k], v) for k, v in params.items() if k in held and held[k] != v}
    if differing:
        shown = json.dumps({k: {"logged": old, "now": new} for k, (old, new) in differing.items()})
        shown = shown if len(shown) <= 5000 else json.dumps(sorted(differing))[:5000]  # the keys, where values overflow
        log.warning("MLflow run %s already holds %d param(s) with other values than this attempt's (kept, as MLflow "
                    "params cannot change; tag %s lists them): %s", run_id, len(differing), PARAMS_DIFFERING_TAG,
                    ", ".join(sorted(differing)))
        c.set_tag(run_id, PARAMS_DIFFERING_TAG, shown)
    return differing


def start_child_run(tracking_uri: str, parent_run_id: str, run_name: str, params: dict) -> str:
    """A run nested under `parent_run_id` in the MLflow UI (a remedy's trial), with `params`."""
    c = client(tracking_uri)
    parent = c.get_run(parent_run_id)
    run = c.create_run(parent.info.experiment_id, run_name=run_name,
                       tags={"mlflow.parentRunId": parent_run_id, "remedy.trial": run_name})
    for k, v in flatten(params).items():
        c.log_param(run.info.run_id, k, v)
    return run.info.run_id


def download_artifacts(tracking_uri: str, run_id: str, artifact_path: str, dst: str | Path) -> Path:
    """A run's artifact folder, downloaded into `dst` (created)."""
    Path(dst).mkdir(parents=True, exist_ok=True)
    return Path(client(tracking_uri).download_artifacts(run_id, artifact_path, str(dst)))


def _unfinished_run(c: MlflowClient, exp_id: str, tags: dict[str, str]) -> str | None:
    """The latest run of the same run key and config hash that did not finish, if any."""
    key, config_hash = tags.get("lora.run_key"), tags.get("lineage.config_hash")
    if not key or not config_hash:
        return None
    runs = c.search_runs(
        [exp_id],
        filter_string=f"tags.`lora.run_key` = '{key}' and tags.`lineage.config_hash` = '{config_hash}'",
        order_by=["attributes.start_time DESC"], max_results=1,
    )
    return runs[0].info.run_id if runs and runs[0].info.status != "FINISHED" else None


# ---------------------------------------------------------------------------------------------
# Metric names. The code speaks flat names (`train_loss`, `base_accuracy`, `reference_kl`,
# `task_gain`). A run logs as MLflow metrics only its training curve, under `train/` (`CURVE`),
# and a handful of headline figures under their flat names (`report.headline_metrics`); every
# other figure is a row of its comparison table and of `reports/metrics.json`. MLflow's charts
# show the sections of `/` prefixes first, sorted by name, then the unprefixed ones ("Model
# metrics"): the loss curve is the first chart, the headline figures follow. Runs logged before
# (every figure grouped: `eval/adapted/`, `forgetting/`, `gate/`, `time/`...) read back the same.
# ---------------------------------------------------------------------------------------------

CURVE = {"train_loss": "train/loss", "learning_rate": "train/lr"}
"""The per-step figures and their MLflow names (`lr`: sorted after `loss`, which comes first)."""
_FLAT_CURVE = {v: k for k, v in CURVE.items()}
_GROUPS = ("gate", "time", "train", "eval", "forgetting")  # of runs logged before the headline names
_WHO = ("base", "baseline", "adapted", "champion")  # baseline: a classifier's majority class and linear probe


def metric_key(name: str) -> str:
    """The MLflow name of flat metric `name`."""
    return CURVE.get(name, name)


def flat_name(key: str) -> str:
    """The flat name of MLflow metric `key` (the inverse of `metric_key`, and of the grouped names
    runs logged before; other names unchanged)."""
    if key in _FLAT_CURVE:
        return _FLAT_CURVE[key]
    group, _, rest = key.partition("/")
    if not rest or group not in _GROUPS:
        return key
    if group in ("gate", "time"):
        return rest
    if group == "train":
        return rest if rest == "learning_rate" else f"train_{rest}"
    who, _, tail = rest.partition("/")
    if who in _WHO and tail:
        return f"{who}_{tail}"
    return rest if group == "forgetting" else f"eval_{rest}"


def run_metrics(tracking_uri: str, run_id: str) -> dict[str, float]:
    """A run's latest metrics under their flat names."""
    return {flat_name(k): v for k, v in MlflowClient(tracking_uri).get_run(run_id).data.metrics.items()}


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics (flat names, grouped by `metric_key`) in one batch; non-numbers are skipped."""
    now = int(time.time() * 1000)
    items = [
        Metric(metric_key(k), float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if items:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=items)


class MetricLogger:
    """A `(metrics, step)` callback for the training loop that logs to the run in batches: one
    write at most every `every_s` seconds, and what is left on `flush()` (the launchers flush at
    every checkpoint, and `close()` at the end). A write per step cost ~15 ms on a SQLite store, a
    third of a small model's step on a CPU.

    The store being down never stops training: each point is first appended to the run folder's
    `metrics/<run id>.jsonl` (`keep_dir`; in memory, bounded, without one), then written to the
    store by a thread of its own, so the loop never waits on it. A failed write is tried again at
    a later flush, after `backoff_s` (the last delay repeats); the training log says in one line
    that the store is unreachable and the points are kept, and in one more when it is back. What
    the store still lacks when training ends stays in the file: `replay_kept_points` logs it,
    exactly once (the flow does so before its other writes). `background=False` writes in the
    caller's thread (tests)."""

    def __init__(self, tracking_uri: str, run_id: str, every_s: float = 2.0, keep_dir: str | Path | None = None, *,
                 backoff_s: tuple[float, ...] = (2, 5, 15, 30, 60), final_wait_s: float = 20.0,
                 background: bool = True, send=None):
        self.tracking_uri, self.run_id, self.every_s = tracking_uri, run_id, every_s
        self.keep_path = kept_points_path(keep_dir, run_id) if keep_dir else None
        self.backoff_s, self.final_wait_s, self.background, self.send = backoff_s, final_wait_s, background, send
        self._start()

    def _start(self) -> None:
        """The state of this process (a Ray worker gets the logger pickled, without it)."""
        self._pending: list[Metric] = []
        self._last = time.monotonic()
        self._journal: PointFile | PointMemory | None = None
        self._thread: threading.Thread | None = None
        self._wake, self._closing = threading.Event(), False
        self._failures, self._retry_at, self.unreachable = 0, 0.0, False

    def __getstate__(self) -> dict:
        keep = ("tracking_uri", "run_id", "every_s", "keep_path", "backoff_s", "final_wait_s", "background", "send")
        return {k: self.__dict__[k] for k in keep}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._start()

    def __call__(self, metrics: dict, step: int) -> None:
        now = int(time.time() * 1000)
        self._pending += [Metric(metric_key(k), float(v), now, step) for k, v in metrics.items()
                          if isinstance(v, (int, float)) and not isinstance(v, bool)]
        if time.monotonic() - self._last >= self.every_s or len(self._pending) >= 900:  # log_batch takes 1,000
            self.flush()

    def flush(self) -> None:
        """Keep what is pending (run folder) and have it written to the store; never raises."""
        points, self._pending, self._last = self._pending, [], time.monotonic()
        self._keep(points)
        if not self.background:
            self._attempt(force=False)
        elif self._journal is not None:
            if self._thread is None:
                ctx = contextvars.copy_context()  # its lines go where the loop's do (a Prefect task's log)
                self._thread = threading.Thread(target=ctx.run, args=(self._send_loop,), daemon=True,
                                                name=f"metric-logger-{self.run_id}")
                self._thread.start()
            self._wake.set()

    def close(self) -> None:
        """The last flush, at the end of training: one more try (whatever the backoff), waited for
        up to `final_wait_s`; what the store did not take stays kept, and the log says where."""
        self.flush()
        if self._thread is not None:
            self._closing = True
            self._wake.set()
            self._thread.join(self.final_wait_s)
            self._thread, self._closing = None, False
        else:
            self._attempt(force=True)
        left = self._journal.unsent_count() if self._journal is not None else 0
        if left:
            where = self.keep_path or "memory"
            print(f"MLflow store still unreachable at the end of training: {left} point(s) of the curve kept in "
                  f"{where}; they are logged with the run's results (tracking.replay_kept_points)", flush=True)

    def _keep(self, points: list[Metric]) -> None:
        if self._journal is None:
            self._journal = PointMemory()
            if self.keep_path is not None:
                self._journal = PointFile(self.keep_path)
        try:
            self._journal.append(points)
        except OSError as exc:  # the run folder cannot be written here: memory it is, bounded
            print(f"cannot keep the training curve in {self.keep_path} ({exc.strerror or exc}); "
                  "keeping it in memory until the MLflow store takes it", flush=True)
            self._journal = PointMemory()
            self._journal.append(points)

    def _send_loop(self) -> None:
        while True:
            self._wake.wait()
            self._wake.clear()
            closing = self._closing
            self._attempt(force=closing)
            if closing:
                return

    def _attempt(self, force: bool) -> None:
        """Write what the store lacks; on failure, back off and say so once. Never raises."""
        if self._journal is None or (not force and time.monotonic() < self._retry_at):
            return
        try:
            sent = self._journal.send_unsent(self._write)
        except Exception as exc:  # noqa: BLE001  (any failure of the store: the points stay kept)
            self._failures += 1
            self._retry_at = time.monotonic() + self.backoff_s[min(self._failures, len(self.backoff_s)) - 1]
            if not self.unreachable:
                self.unreachable = True
                print(f"MLflow store unreachable ({_short_reason(exc)}): training goes on, the curve's points are kept "
                      f"in {self.keep_path or 'memory'} and logged when the store is back", flush=True)
            return
        self._failures = 0
        if self.unreachable:
            self.unreachable = False
            print(f"MLflow store reachable again: {sent} kept point(s) of the curve logged", flush=True)

    def _write(self, points: list[Metric]) -> None:
        if self.send is not None:
            self.send(points)
        else:
            MlflowClient(self.tracking_uri).log_batch(self.run_id, metrics=points)


def _short_reason(exc: BaseException) -> str:
    """Why a write failed, short: a tracking server and what it did (`_UNREACHABLE`), else the
    error's first line; never a `user:password@`."""
    text = str(exc)
    if "API request to " in text:
        server = text.split("API request to ", 1)[1].split("/api/", 1)[0].split()[0]
        why = next((w for needle, w in _UNREACHABLE.items() if needle in text), "an error")
        return f"{without_credentials(server)}: {why}"
    first = (text.strip().splitlines() or [""])[0]
    first = re.sub(r"//[^/@\s]+@", "//", first)
    return f"{type(exc).__name__}: {first[:160]}"


def metric_logger(tracking_uri: str, run_id: str, keep_dir: str | Path | None = None) -> MetricLogger:
    """The training loop's `(metrics, step)` callback that logs to the run (`MetricLogger`),
    keeping its points in `keep_dir` (the run folder) until the store has them."""
    return MetricLogger(tracking_uri, run_id, keep_dir=keep_dir)


def replay_kept_points(tracking_uri: str, run_id: str, run_dir: str | Path) -> int:
    """Log the points of run `run_id`'s curve that its `MetricLogger` kept in `run_dir` and the
    store does not have yet (the store was down when training ended); returns how many. Exactly
    once: the file's marker moves after each batch, and a point keeps its time stamp, so one sent
    again after a crash between the two is the same point (a SQL store keeps it once). Raises
    when the store is still unreachable (the caller retries)."""
    c = MlflowClient(tracking_uri)
    return PointFile(kept_points_path(run_dir, run_id)).send_unsent(lambda points: c.log_batch(run_id, metrics=points))


def log_artifact(tracking_uri: str, run_id: str, path: str | Path, artifact_path: str | None = None) -> None:
    """Upload a file or folder to the run's artifacts."""
    c = MlflowClient(tracking_uri)
    p = Path(path)
    (c.log_artifacts if p.is_dir() else c.log_artifact)(run_id, str(p), artifact_path)


def log_table(tracking_uri: str, run_id: str, rows: list[dict], artifact_file: str) -> None:
    """Log rows as an MLflow table (shown in the run's Artifacts and the evaluation view)."""
    if rows:
        import pandas as pd

        MlflowClient(tracking_uri).log_table(run_id, pd.DataFrame(rows), artifact_file)


def log_datasets(tracking_uri: str, run_id: str, splits: dict[str, tuple[str, int, str]], name: str,
                 columns: list[str]) -> None:
    """Record the data a run used as MLflow datasets (the run's "Datasets"): one per split, named
    `<name>-<split>`, with the digest of its own rows, its source file, its columns (all strings,
    as the contract reads them) and its row count. `splits` maps `train` and `eval` to (source
    path, rows, digest). Only metadata: the rows stay where they are."""
    from mlflow.entities import Dataset, DatasetInput, InputTag

    schema = json.dumps({"mlflow_colspec": [{"type": "string", "name": c, "required": True} for c in columns]})
    inputs = [
        DatasetInput(Dataset(f"{name}-{split}", digest[:32], "local",
                             json.dumps({"uri": Path(path).resolve().as_uri() if "://" not in path else path}),
                             schema, json.dumps({"num_rows": rows})),
                     [InputTag(DATA_CONTEXT, SPLIT_CONTEXT[split])])
        for split, (path, rows, digest) in splits.items()
    ]
    MlflowClient(tracking_uri).log_inputs(run_id, datasets=inputs)


DATA_CONTEXT = "mlflow.data.context"
SPLIT_CONTEXT = {"train": "training", "eval": "evaluation"}
"""The context tag each split's dataset carries (`log_datasets`)."""


def run_datasets(c: MlflowClient, run_id: str) -> dict[str, tuple[str, str]]:
    """The run's datasets by split (`train`, `eval`), as (name, digest): what its metrics are on."""
    split = {v: k for k, v in SPLIT_CONTEXT.items()}
    return {split[t.value]: (d.dataset.name, d.dataset.digest) for d in c.get_run(run_id).inputs.dataset_inputs
            for t in d.tags if t.key == DATA_CONTEXT and t.value in split}


def run_figures(tracking_uri: str, run_id: str) -> dict[str, float]:
    """Every figure of a run under its flat name: its table `reports/metrics.json` (scores, counts,
    timings, each interval as `<name>_ci_low` and `_ci_high`; unrounded), and its MLflow metrics
    (the curve's last points); just the metrics for a run without the table."""
    import tempfile

    figures = run_metrics(tracking_uri, run_id)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            path = MlflowClient(tracking_uri).download_artifacts(run_id, METRICS_TABLE, tmp)
            table = json.loads(Path(path).read_text())
        except (mlflow.exceptions.MlflowException, OSError, ValueError):
            return figures
    for row in (dict(zip(table["columns"], r)) for r in table["data"]):
        name = flat_name(row["metric"])
        figures[name] = row["value"]
        for bound in ("ci_low", "ci_high"):
            if row.get(bound) is not None:
                figures[f"{name}_{bound}"] = row[bound]
    return figures


METRICS_TABLE = "reports/metrics.json"
"""Every figure of a run's evaluation and training, one row each with its interval (`report.metrics_rows`)."""


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = MlflowClient(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


@contextlib.contextmanager
def system_metrics(tracking_uri: str, run_id: str, every_s: float = 10.0):
    """Log this machine's CPU, memory, disk and network use (`system/*` metrics, GPU too where
    one is present) to the run every `every_s` seconds while the block runs: MLflow's charts of
    what training and evaluation cost. Only the machine of this process (with a local Ray, all
    of the run's workers); nothing when psutil is absent."""
    try:
        from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

        monitor = SystemMetricsMonitor(run_id, sampling_interval=every_s, samples_before_logging=1,
                                       resume_logging=True, tracking_uri=tracking_uri)  # a retry goes on
    except ImportError:  # psutil missing
        monitor = None
    if monitor is not None:
        monitor.start()
    try:
        yield
    finally:
        if monitor is not None:
            monitor.finish()


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def metric_history(tracking_uri: str, run_id: str, keys: tuple[str, ...] = ("train_loss", "learning_rate")) -> dict:
    """(step, value) pairs per metric of a run, e.g. the loss curve the workers logged."""
    c = client(tracking_uri)
    history = {}
    for k in keys:  # today's names, or those of runs logged before (grouped, or flat before that)
        for key in dict.fromkeys((metric_key(k), f"train/{k.removeprefix('train_')}", k)):
            history[k] = [(m.step, m.value) for m in c.get_metric_history(run_id, key)]
            if history[k]:
                break
    return history


LOCAL_UI = "http://127.0.0.1:5000"
"""Where `mlflow ui` serves a local store by default."""


def ui_base(tracking_uri: str) -> str:
    """Where the MLflow UI of `tracking_uri` is: the tracking server itself, or for a local store
    the address `mlflow ui` (`ui_command`) serves it on by default."""
    return without_credentials(tracking_uri).rstrip("/") if is_server(tracking_uri) else LOCAL_UI


def is_server(tracking_uri: str) -> bool:
    return tracking_uri.startswith(("http://", "https://"))


_UNREACHABLE = {"Connection refused": "connection refused", "timed out": "no answer in time",
                "Name or service not known": "unknown host", "Failed to establish a new connection": "no connection",
                "Max retries exceeded": "no answer"}


def unreachable_server(exc: BaseException) -> str | None:
    """What to tell a user whose MLflow call never reached its tracking server (down, wrong
    address), else None: the server, why, and where to point instead."""
    text = str(exc)
    if type(exc).__name__ != "MlflowException" or "API request to " not in text:
        return None
    why = next((w for needle, w in _UNREACHABLE.items() if needle in text), None)
    if why is None:
        return None
    server = text.split("API request to ", 1)[1].split("/api/", 1)[0].split()[0]
    retries = os.environ.get("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "7")
    return (f"the MLflow tracking server at {without_credentials(server)} did not answer ({why}, after "
            f"{retries} retries: MLFLOW_HTTP_REQUEST_MAX_RETRIES). Start it, or point --tracking-uri or "
            "MLFLOW_TRACKING_URI at one that runs.")


def run_page(tracking_uri: str, run_id: str) -> str:
    """The run's page, in MLflow's model training view (`workflowType`), not its GenAI pages."""
    exp = client(tracking_uri).get_run(run_id).info.experiment_id
    return f"{ui_base(tracking_uri)}/#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning"


RUNS_VIEW = "prefect-lora"
"""The id of the runs list's saved view the pipeline keeps on its experiment (`keep_runs_view`)."""
_VIEW_TAG = f"mlflow.sharedViewState.{RUNS_VIEW}"  # MLflow's saved views: one experiment tag each


def keep_runs_view(tracking_uri: str, run_id: str, metrics: list[str]) -> None:
    """Keep on the run's experiment a saved view of its runs list, "decision and headline figures"
    (MLflow's *Views* menu; `runs_page` opens it): the columns `promotion.decision` and `metrics`
    (flat names), beside the run's name (`demo-orders v3 promoted`). MLflow's default columns
    are its own (source, models, dataset) and only a view changes them."""
    c = MlflowClient(tracking_uri)
    exp = c.get_run(run_id).info.experiment_id
    columns = ["tags.`promotion.decision`", *(f"metrics.`{metric_key(m)}`" for m in metrics)]
    widths = {col: max(80, min(110, 20 + 7 * len(col.split("`")[1]))) for col in columns}  # all beside the name at 1440
    state = json.dumps({"selectedColumns": columns, "columnOrder": columns, "columnWidths": widths,
                        "orderByKey": "attributes.start_time", "orderByAsc": False}, sort_keys=True)
    held = json.loads(c.get_experiment(exp).tags.get(_VIEW_TAG) or "{}")
    if held.get("state") == state:
        return
    now = int(time.time() * 1000)
    c.set_experiment_tag(exp, _VIEW_TAG, json.dumps({"name": "decision and headline figures",
                                                     "createdAt": held.get("createdAt", now), "updatedAt": now,
                                                     "state": state}))


def runs_page(tracking_uri: str, run_id: str) -> str:
    """The run's experiment's runs list, in the saved view of `keep_runs_view`."""
    exp = client(tracking_uri).get_run(run_id).info.experiment_id
    view = f"viewStateShareKey={RUNS_VIEW}&workflowType=machine_learning"
    return f"{ui_base(tracking_uri)}/#/experiments/{exp}/runs?{view}"


def version_page(tracking_uri: str, name: str, version: str) -> str:
    """A registered version's page."""
    from urllib.parse import quote

    return f"{ui_base(tracking_uri)}/#/models/{quote(name, safe='')}/versions/{version}"


def run_url(tracking_uri: str, run_id: str) -> str:
    """Where the run is seen: its page on a server's UI, or for a local store the `mlflow ui`
    command (this environment's) and the page it then serves."""
    page = run_page(tracking_uri, run_id)
    return page if is_server(tracking_uri) else f"{ui_command(tracking_uri)}, then {page}"


def ui_command(tracking_uri: str) -> str:
    """The command that starts the MLflow UI on a local store, with this environment's `mlflow`."""
    return f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {tracking_uri}"


def now_iso() -> str:
    """Now in UTC, ISO-8601 with microseconds: the time stamp of audit records and skip tags."""
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


def record_skip(cfg: PipelineConfig, tags: dict[str, str], version: str, champion_version: str | None,
                reason: str) -> str:
    """A short, finished run tagged `promotion.decision=skipped`: the schedule ran and found nothing
    new since `version` (the champion, or the latest decided version). That version gets
    `schedule.last_skip` (when, which run). Returns the run id."""
    c = client(cfg.tracking.tracking_uri)
    exp_id = ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
    run = c.create_run(exp_id, run_name=f"{cfg.model_name} skipped: nothing new since v{version}"[:250], tags={
        **{k: str(v) for k, v in tags.items()}, "promotion.decision": "skipped", "promotion.reasons": reason,
        "promotion.champion_compared": str(champion_version), "promotion.repeats": str(version),
        "mlflow.note.content": reason})
    c.set_terminated(run.info.run_id, status="FINISHED")
    c.set_model_version_tag(cfg.model_name, str(version), "schedule.last_skip",
                            json.dumps({"at": now_iso(), "run_id": run.info.run_id}))
    return run.info.run_id
