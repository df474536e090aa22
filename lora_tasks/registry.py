"""MLflow I/O: runs, metrics, artifacts, the adapter model, versions and aliases. No decisions."""

from __future__ import annotations

import json
import os
import time
import warnings
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import mlflow
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException

from .config import PipelineConfig
from .errors import RegistryError

CHAMPION, CHALLENGER = "champion", "challenger"
os.environ.setdefault("MLFLOW_ENABLE_ASYNC_LOGGING", "false")


def client(tracking_uri: str) -> MlflowClient:
    """A client bound to `tracking_uri`; also points the fluent API there (pyfunc logging needs it)."""
    if tracking_uri.startswith("sqlite:///"):
        Path(tracking_uri.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    return MlflowClient(tracking_uri=tracking_uri, registry_uri=tracking_uri)


def ensure_experiment(c: MlflowClient, name: str, artifact_location: str) -> str:
    """The experiment's id, creating it with an explicit artifact location when absent."""
    exp = c.get_experiment_by_name(name)
    if exp is not None:
        return exp.experiment_id
    location = artifact_location if "://" in artifact_location else Path(artifact_location).resolve().as_uri()
    return c.create_experiment(name, artifact_location=location)


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
    """Create the pipeline's MLflow run with the config as params; returns the run id."""
    c = client(cfg.tracking.tracking_uri)
    exp_id = ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
    unfinished = _unfinished_run(c, exp_id, tags)
    if unfinished:  # an earlier attempt of this very run died: continue its record
        c.update_run(unfinished, status="RUNNING")
        for k, v in tags.items():
            c.set_tag(unfinished, k, v)
        return unfinished
    run = c.create_run(exp_id, run_name=run_name, tags=tags)
    params = flatten(cfg.model_dump(mode="json"))
    items = [mlflow.entities.Param(k, v[:6000]) for k, v in params.items()]
    for i in range(0, len(items), 100):
        c.log_batch(run.info.run_id, params=items[i : i + 100])
    return run.info.run_id


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


def log_metrics(tracking_uri: str, run_id: str, metrics: dict[str, float], step: int = 0) -> None:
    """Log numeric metrics in one batch; non-numbers are skipped."""
    now = int(time.time() * 1000)
    items = [
        Metric(k, float(v), now, step)
        for k, v in metrics.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool)
    ]
    if items:
        MlflowClient(tracking_uri).log_batch(run_id, metrics=items)


def metric_logger(tracking_uri: str, run_id: str):
    """A `(metrics, step)` callback for the training loop that logs to the run."""

    def log(metrics: dict, step: int) -> None:
        log_metrics(tracking_uri, run_id, metrics, step)

    return log


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


def set_run_tags(tracking_uri: str, run_id: str, tags: dict[str, str]) -> None:
    c = MlflowClient(tracking_uri)
    for k, v in tags.items():
        c.set_tag(run_id, k, str(v))


def end_run(tracking_uri: str, run_id: str, status: str = "FINISHED") -> None:
    MlflowClient(tracking_uri).set_terminated(run_id, status=status)


def _requirements() -> list[str]:
    reqs = []
    for dist in ("torch", "transformers", "peft", "safetensors", "pandas", "mlflow"):
        try:
            reqs.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return reqs


def log_adapter_model(cfg: PipelineConfig, run_id: str, adapter_dir: str, base_name_or_path: str) -> str:
    """Log the adapter as a pyfunc model that references its base; returns the model URI."""
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    from . import pyfunc_model

    client(cfg.tracking.tracking_uri)
    if cfg.task == "causal_lm":
        outputs = Schema([ColSpec("string", "completion")])
        params = ParamSchema([ParamSpec("max_new_tokens", "long", 64)])
    else:
        outputs = Schema([ColSpec("string", "label"), ColSpec("double", "score")])
        params = None
    signature = ModelSignature(inputs=Schema([ColSpec("string", pyfunc_model.INPUT_COLUMN[cfg.task])]), outputs=outputs, params=params)
    model_config = {
        "task": cfg.task,
        "base_model": base_name_or_path,
        "revision": cfg.base_model.revision,
        "labels": [str(x) for x in cfg.data.labels] if cfg.data.labels else None,
        "torch_dtype": cfg.base_model.torch_dtype,
        "max_seq_length": cfg.training.max_seq_length,
        "seed": cfg.training.seed,
        "chat_template": cfg.data.chat_template,
        "system_prompt": cfg.data.system_prompt,
        # a local base is pinned by content: loading checks the folder still holds the same bytes
        "base_model_hash": client(cfg.tracking.tracking_uri).get_run(run_id).data.tags.get("lineage.base_model_hash") or None,
    }
    with mlflow.start_run(run_id=run_id), warnings.catch_warnings():
        # The signature is given; MLflow's advice to add an input example or type hints is noise here.
        warnings.filterwarnings("ignore", message=r".*(input example was not provided|Add type hints)", category=UserWarning)
        info = mlflow.pyfunc.log_model(
            name="adapter",
            python_model=pyfunc_model.__file__,  # model from code: loading unpickles nothing
            artifacts={"adapter": str(adapter_dir)},
            model_config=model_config,
            signature=signature,
            code_paths=[str(Path(__file__).resolve().parent)],
            pip_requirements=_requirements(),
        )
    return info.model_uri


@dataclass(frozen=True)
class VersionInfo:
    """A registered version and the metrics of the run that produced it."""

    version: str
    run_id: str | None
    metrics: dict[str, float]
    tags: dict[str, str]


def register_version(tracking_uri: str, name: str, model_uri: str, run_id: str, tags: dict[str, str]) -> str:
    """Register a new version of `name` from `model_uri` with lineage tags; alias it `challenger`."""
    c = client(tracking_uri)
    try:
        c.get_registered_model(name)
    except MlflowException:
        c.create_registered_model(name, description="LoRA adapters trained and gated by prefect-lora")
    # A tracking server accepts a `models:/m-...` source only with its model id (a SQLite store does not check).
    model_id = model_uri.removeprefix("models:/") if model_uri.startswith("models:/m-") else None
    mv = c.create_model_version(name, model_uri, run_id=run_id, tags={k: str(v) for k, v in tags.items()},
                                model_id=model_id)
    c.set_registered_model_alias(name, CHALLENGER, mv.version)
    return str(mv.version)


def get_alias(tracking_uri: str, name: str, alias: str = CHAMPION) -> VersionInfo | None:
    """The version behind `alias` and its run's metrics, or None when the alias is not set."""
    c = client(tracking_uri)
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException as exc:
        if "RESOURCE_DOES_NOT_EXIST" in str(exc.error_code) or "not found" in str(exc).lower():
            return None
        raise RegistryError(f"cannot read alias {alias!r} of {name!r}: {exc}") from exc
    metrics = c.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return VersionInfo(str(mv.version), mv.run_id, dict(metrics), dict(mv.tags))


# ---------------------------------------------------------------------------------------------
# Alias moves: compare-and-set under a lock, each one with an audit record.
#
# MLflow has no compare-and-set on aliases, so a move is: take a lock, re-read the alias, compare
# it with what the caller decided against, write, re-read to check the write. The lock is an
# exclusive `flock` on a file next to the SQLite database (or the `file:` store), which serialises
# every mover on that machine (processes and threads). For a tracking server there is no shared
# file: movers on one machine still share a local lock file, and movers on different machines take
# a lease tag on the registered model (write, wait, re-read); that narrows the race to the lease's
# settle time but is not a true mutex, which MLflow cannot offer. The re-read after the write
# still reports a concurrent overwrite (`AliasConflict`) instead of hiding it.
# ---------------------------------------------------------------------------------------------

AUDIT_TAG_PREFIX = "prefect_lora.alias_audit."
_LEASE_TAG = "prefect_lora.alias_lease"
_LEASE_SETTLE_S = 0.5


class ChampionChanged(RegistryError):
    """The alias no longer points where the caller's decision assumed: decide again against `current`."""

    def __init__(self, name: str, alias: str, expected: str | None, current: VersionInfo | None):
        self.name, self.alias, self.expected, self.current = name, alias, expected, current
        now = current.version if current else None
        super().__init__(
            f"{alias!r} of {name!r} moved from version {expected} to {now} since the decision was made; "
            "decide again against the new champion"
        )


class AliasConflict(RegistryError):
    """A re-read after the write found another writer's value: the lock was bypassed."""


@dataclass(frozen=True)
class AliasRecord:
    """One audit record: an alias move (or a decision that kept the alias where it was)."""

    name: str
    alias: str
    action: str
    """`auto-promote`, `promote`, `rollback`, or `kept` (a gate decision that did not move it)."""
    from_version: str | None
    to_version: str | None
    reason: str
    actor: str
    """Who: `user@host`, plus the Prefect flow run when one acted."""
    at: str
    """When, UTC ISO-8601."""
    details: dict

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def default_actor(flow_run_id: str | None = None) -> str:
    """`user@host`, and the Prefect flow run id when given."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001  (no passwd entry in some containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    who = f"{user}@{socket.gethostname()}"
    return f"{who} (prefect flow run {flow_run_id})" if flow_run_id else who


def _lock_file(tracking_uri: str, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return db.with_name(f"{db.name}.{safe}.alias.lock")
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        root = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
        return root / f".{safe}.alias.lock"
    import hashlib

    from .modeling import cache_dir

    return cache_dir() / "locks" / f"{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}.{safe}.alias.lock"


def _is_shared_store(tracking_uri: str) -> bool:
    """True when every mover sees the same lock file (a local SQLite or file store)."""
    return tracking_uri.startswith(("sqlite:///", "file:")) or "://" not in tracking_uri


class _AliasLock:
    """Exclusive lock on moving aliases of one registered model (see the section comment)."""

    def __init__(self, tracking_uri: str, name: str, timeout_s: float = 120.0):
        self.uri, self.name, self.timeout_s = tracking_uri, name, timeout_s
        self.path = _lock_file(tracking_uri, name)
        self.token = None
        self._fd = None

    def __enter__(self):
        import fcntl
        import uuid

        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        deadline = time.monotonic() + self.timeout_s
        while True:
            try:
                fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    os.close(self._fd)
                    raise RegistryError(
                        f"another process holds the alias lock of {self.name!r} ({self.path}) for over "
                        f"{self.timeout_s:.0f}s; if no promotion is running, delete that file"
                    ) from None
                time.sleep(0.05)
        if not _is_shared_store(self.uri):
            self.token = uuid.uuid4().hex
            try:
                self._take_lease(deadline)
            except BaseException:
                self._unlock()
                raise
        return self

    def _take_lease(self, deadline: float) -> None:
        c = client(self.uri)
        while True:
            tags = c.get_registered_model(self.name).tags
            held = json.loads(tags[_LEASE_TAG]) if tags.get(_LEASE_TAG) else None
            if held is None or held.get("expires", 0) < time.time():
                c.set_registered_model_tag(self.name, _LEASE_TAG, json.dumps({"owner": self.token, "expires": time.time() + 60}))
                time.sleep(_LEASE_SETTLE_S)  # let a racing writer land, then see who won
                tags = c.get_registered_model(self.name).tags
                if tags.get(_LEASE_TAG) and json.loads(tags[_LEASE_TAG]).get("owner") == self.token:
                    return
            if time.monotonic() > deadline:
                raise RegistryError(f"could not take the alias lease of {self.name!r} on {self.uri}: another mover holds it")
            time.sleep(0.2)

    def _unlock(self) -> None:
        import fcntl

        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __exit__(self, *exc) -> None:
        try:
            if self.token:
                c = client(self.uri)
                tags = c.get_registered_model(self.name).tags
                if tags.get(_LEASE_TAG) and json.loads(tags[_LEASE_TAG]).get("owner") == self.token:
                    c.delete_registered_model_tag(self.name, _LEASE_TAG)
        finally:
            self._unlock()


def alias_lock(tracking_uri: str, name: str, timeout_s: float = 120.0) -> _AliasLock:
    """Context manager serialising alias moves of `name` (see the guarantee in the section comment)."""
    return _AliasLock(tracking_uri, name, timeout_s)


def _require_model(c: MlflowClient, name: str):
    try:
        return c.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in c.search_registered_models(max_results=50))
        raise RegistryError(
            f"no registered model named {name!r} in this tracking store; registered models: {names or 'none'}. "
            "Check the name or --tracking-uri"
        ) from None


def get_version(tracking_uri: str, name: str, version: str) -> VersionInfo:
    """One version and its run's metrics; a clear error when the model or version does not exist."""
    c = client(tracking_uri)
    _require_model(c, name)
    try:
        mv = c.get_model_version(name, str(version))
    except MlflowException:
        known = sorted((int(v.version) for v in c.search_model_versions(f"name = '{name}'")), reverse=True)
        raise RegistryError(
            f"{name!r} has no version {version!r}; its versions are {known[:20] or 'none'}"
        ) from None
    metrics = c.get_run(mv.run_id).data.metrics if mv.run_id else {}
    return VersionInfo(str(mv.version), mv.run_id, dict(metrics), dict(mv.tags))


def resolve_version(tracking_uri: str, name: str, ref: str | None = None) -> str:
    """A version number from an alias (`champion`, `challenger`, ...) or a version string."""
    ref = CHAMPION if ref in (None, "") else str(ref)
    if ref.isdigit():
        return get_version(tracking_uri, name, ref).version
    c = client(tracking_uri)
    model = _require_model(c, name)
    info = get_alias(tracking_uri, name, ref)
    if info is None:
        raise RegistryError(
            f"{name!r} has no alias {ref!r}; its aliases are {sorted(model.aliases) or 'none'}. "
            f"Promote a version first (prefect-lora promote {name} VERSION --reason ...) or name a version"
        )
    return info.version


def parse_model_ref(ref: str) -> tuple[str, str | None]:
    """`NAME@ALIAS`, `NAME/VERSION` or `NAME` (the champion) -> (name, alias or version or None)."""
    if "@" in ref:
        name, _, alias = ref.partition("@")
        return name, alias or None
    if "/" in ref:
        name, _, version = ref.rpartition("/")
        return name, version or None
    return ref, None


def _write_audit(c: MlflowClient, record: AliasRecord) -> None:
    # One tag per record, keyed by time and a random suffix: concurrent writers never overwrite
    # each other's records, even without the lock.
    import uuid

    stamp = record.at.replace("-", "").replace(":", "").replace("+0000", "Z")
    key = f"{AUDIT_TAG_PREFIX}{stamp}.{uuid.uuid4().hex[:8]}"
    c.set_registered_model_tag(record.name, key, json.dumps(record.to_dict(), sort_keys=True))
    if record.to_version:
        c.set_model_version_tag(record.name, record.to_version, f"alias.{record.alias}.last_move",
                                json.dumps({k: getattr(record, k) for k in ("action", "from_version", "at", "actor", "reason")}))


def alias_history(tracking_uri: str, name: str, alias: str | None = None) -> list[dict]:
    """Every audit record of `name` (alias moves and kept decisions), oldest first."""
    c = client(tracking_uri)
    model = _require_model(c, name)
    records = [json.loads(v) for k, v in sorted(model.tags.items()) if k.startswith(AUDIT_TAG_PREFIX)]
    return [r for r in records if alias is None or r.get("alias") == alias]


def _now_iso() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f+0000")


def compare_and_set_alias(
    tracking_uri: str, name: str, to_version: str, *, expected: str | None, reason: str, action: str,
    alias: str = CHAMPION, actor: str | None = None, details: dict | None = None, lock_timeout_s: float = 120.0,
) -> AliasRecord:
    """Point `alias` at `to_version` only if it still points at `expected` (None: unset).

    Raises `ChampionChanged` (with the current version) when it moved, `AliasConflict` when a
    re-read after the write shows another writer. Writes an audit record on success."""
    c = client(tracking_uri)
    _require_model(c, name)
    get_version(tracking_uri, name, to_version)  # exists, or a clear error
    with alias_lock(tracking_uri, name, lock_timeout_s):
        current = get_alias(tracking_uri, name, alias)
        now = current.version if current else None
        if now != (str(expected) if expected is not None else None):
            raise ChampionChanged(name, alias, expected, current)
        c.set_registered_model_alias(name, alias, str(to_version))
        after = get_alias(tracking_uri, name, alias)
        if after is None or after.version != str(to_version):
            raise AliasConflict(
                f"{alias!r} of {name!r} reads {after.version if after else None} right after it was set to "
                f"{to_version}: another writer moved it without the lock"
            )
        record = AliasRecord(name, alias, action, now, str(to_version), reason, actor or default_actor(), _now_iso(),
                             dict(details or {}))
        _write_audit(c, record)
    return record


def record_evaluation(tracking_uri: str, name: str, version: str, metrics: dict[str, float], primary_metric: str) -> None:
    """Put the evaluation that justifies a version on the version itself (tags `eval.*`)."""
    c = client(tracking_uri)
    numbers = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    c.set_model_version_tag(name, version, "eval.primary_metric", primary_metric)
    c.set_model_version_tag(name, version, "eval.summary", json.dumps(numbers, sort_keys=True))
    for k, v in numbers.items():
        c.set_model_version_tag(name, version, f"eval.{k}", f"{v:.6g}")


def metric_history(tracking_uri: str, run_id: str, keys: tuple[str, ...] = ("train_loss", "learning_rate")) -> dict:
    """(step, value) pairs per metric of a run, e.g. the loss curve the workers logged."""
    c = client(tracking_uri)
    return {k: [(m.step, m.value) for m in c.get_metric_history(run_id, k)] for k in keys}


def describe_version(tracking_uri: str, name: str, version: str, text: str) -> None:
    """Set a version's description (the MLflow UI shows it on the version page)."""
    client(tracking_uri).update_model_version(name, version, description=text[:5000])


def settle_decision(
    tracking_uri: str, name: str, version: str, decision, champion: VersionInfo | None, redecide,
    *, actor: str | None = None, run_id: str | None = None, max_rounds: int = 5,
):
    """Act on a gate decision with compare-and-set; re-decide while the champion keeps moving.

    `decision` has `promote` and `reasons`; `redecide(current_champion)` returns a new decision
    for the same candidate against the champion found at write time. Returns the final
    `(decision, champion_it_was_made_against, AliasRecord)`. Every round is tagged and audited."""
    c = client(tracking_uri)
    details = {"run_id": run_id} if run_id else {}
    for round_ in range(max_rounds):
        expected = champion.version if champion else None
        reasons = "\n".join(decision.reasons)[:5000]
        c.set_model_version_tag(name, version, "promotion.decision", "promoted" if decision.promote else "rejected")
        c.set_model_version_tag(name, version, "promotion.reasons", reasons)
        c.set_model_version_tag(name, version, "promotion.champion_compared", str(expected))
        try:
            if decision.promote:
                record = compare_and_set_alias(
                    tracking_uri, name, version, expected=expected, reason=reasons, action="auto-promote",
                    actor=actor, details={**details, "round": round_},
                )
            else:  # a refusal also must hold against the champion of now: re-check it under the lock
                with alias_lock(tracking_uri, name):
                    current = get_alias(tracking_uri, name, CHAMPION)
                    if (current.version if current else None) != expected:
                        raise ChampionChanged(name, CHAMPION, expected, current)
                    record = AliasRecord(name, CHAMPION, "kept", expected, expected,
                                         f"version {version} refused: {reasons}", actor or default_actor(), _now_iso(),
                                         {**details, "candidate": version, "round": round_})
                    _write_audit(c, record)
            return decision, champion, record
        except ChampionChanged as exc:
            if exc.current is not None and exc.current.version == str(version):  # a retry after our own move
                return decision, exc.current, AliasRecord(name, CHAMPION, "already-champion", str(version), str(version),
                                                          "this version is already the champion", actor or default_actor(),
                                                          _now_iso(), details)
            champion = exc.current
            decision = redecide(champion)
    raise RegistryError(f"the champion of {name!r} kept moving during {max_rounds} attempts to settle version {version}")


def promote_version(tracking_uri: str, name: str, version: str, reason: str, actor: str | None = None) -> AliasRecord:
    """Manual promotion: make `version` the champion, whoever holds it now; audited with `reason`."""
    if not reason or not reason.strip():
        raise RegistryError("a manual promotion needs a reason: --reason 'why this version'")
    version = str(version)
    get_version(tracking_uri, name, version)
    for _ in range(5):
        current = get_alias(tracking_uri, name, CHAMPION)
        try:
            return compare_and_set_alias(tracking_uri, name, version, expected=current.version if current else None,
                                         reason=reason, action="promote", actor=actor)
        except ChampionChanged:
            continue  # someone moved it between our read and the lock; read again
    raise RegistryError(f"the champion of {name!r} kept moving; try again")


def previous_champion(tracking_uri: str, name: str) -> str | None:
    """The version that was champion before the current one, from the audit history."""
    current = get_alias(tracking_uri, name, CHAMPION)
    if current is None:
        return None
    for rec in reversed(alias_history(tracking_uri, name, CHAMPION)):
        if rec.get("to_version") == current.version and rec.get("from_version") not in (None, current.version):
            return rec["from_version"]
    return None


def rollback_champion(
    tracking_uri: str, name: str, to_version: str | None = None, reason: str | None = None, actor: str | None = None,
) -> AliasRecord:
    """Point `champion` back at `to_version`, or at the previous champion by default; audited."""
    current = get_alias(tracking_uri, name, CHAMPION)
    if to_version is None:
        _require_model(client(tracking_uri), name)
        to_version = previous_champion(tracking_uri, name)
        if to_version is None:
            raise RegistryError(
                f"{name!r} has no previous champion in its alias history"
                f" (champion is {current.version if current else 'unset'}); name one: rollback {name} --to VERSION"
            )
    reason = reason or f"rollback from version {current.version if current else None}"
    return compare_and_set_alias(tracking_uri, name, str(to_version), expected=current.version if current else None,
                                 reason=reason, action="rollback", actor=actor)


def run_url(tracking_uri: str, run_id: str) -> str:
    """Where the run is seen: a server's UI URL, or the `mlflow ui` command for a local store."""
    c = client(tracking_uri)
    exp = c.get_run(run_id).info.experiment_id
    if tracking_uri.startswith(("http://", "https://")):
        return f"{tracking_uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}"
    return f"mlflow ui --backend-store-uri {tracking_uri}  (then experiment {exp}, run {run_id})"


@dataclass(frozen=True)
class VersionFiles:
    """A registered version's files on local disk: its PEFT adapter and the pyfunc model config."""

    name: str
    version: str
    model_dir: Path
    adapter_dir: Path
    model_config: dict


def download_version(tracking_uri: str, name: str, version: str, dst: str | Path | None = None) -> VersionFiles:
    """Fetch version `version` of `name` (MLmodel + adapter) and check its adapter is safetensors."""
    import tempfile

    import yaml

    get_version(tracking_uri, name, version)  # a clear error for unknown names and versions
    client(tracking_uri)
    dst = Path(dst) if dst else Path(tempfile.mkdtemp(prefix=f"pl-{name}-v{version}-"))
    dst.mkdir(parents=True, exist_ok=True)
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=f"models:/{name}/{version}", dst_path=str(dst)))
    mlmodel = yaml.safe_load((local / "MLmodel").read_text())
    pyfunc = mlmodel.get("flavors", {}).get("python_function", {}) or {}
    model_config = pyfunc.get("model_config") or pyfunc.get("config") or {}
    adapter = local / ((pyfunc.get("artifacts") or {}).get("adapter", {}).get("path") or "artifacts/adapter")
    if not (adapter / "adapter_model.safetensors").is_file() or not (adapter / "adapter_config.json").is_file():
        raise RegistryError(
            f"version {version} of {name!r} has no adapter_config.json + adapter_model.safetensors under its "
            "artifacts/adapter; only safetensors adapters are loaded (no pickle). Re-register it with prefect-lora"
        )
    return VersionFiles(name, str(version), local, adapter, dict(model_config))


def download_adapter(tracking_uri: str, name: str, version: str, dst_dir: str | Path) -> Path:
    """The PEFT adapter folder of version `version` of `name`, downloaded under `dst_dir` (e.g.
    the champion's, to score it beside a new adapter on the same base and data)."""
    return download_version(tracking_uri, name, version, dst_dir).adapter_dir


# ---------------------------------------------------------------------------------------------
# Operations: skipped runs, retention deletes, status of every model.
# ---------------------------------------------------------------------------------------------


def record_skip(cfg: PipelineConfig, tags: dict[str, str], champion_version: str, reason: str) -> str:
    """A short, finished run tagged `promotion.decision=skipped`: the schedule ran and found nothing
    new. The champion gets `schedule.last_skip` (when, which run). Returns the run id."""
    c = client(cfg.tracking.tracking_uri)
    exp_id = ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
    run = c.create_run(exp_id, run_name=f"skipped-{tags.get('lora.run_key', '')}"[:250], tags={
        **{k: str(v) for k, v in tags.items()}, "promotion.decision": "skipped", "promotion.reasons": reason,
        "promotion.champion_compared": str(champion_version), "mlflow.note.content": reason})
    c.set_terminated(run.info.run_id, status="FINISHED")
    c.set_model_version_tag(cfg.model_name, str(champion_version), "schedule.last_skip",
                            json.dumps({"at": _now_iso(), "run_id": run.info.run_id}))
    return run.info.run_id


def list_model_names(tracking_uri: str) -> list[str]:
    """Every registered model in the store, sorted."""
    return sorted(m.name for m in client(tracking_uri).search_registered_models(max_results=1000))


def list_versions(tracking_uri: str, name: str) -> list[str]:
    """Every version number of `name` (an empty list when the model does not exist)."""
    c = client(tracking_uri)
    return sorted((str(v.version) for v in c.search_model_versions(f"name = '{name}'")), key=int)


def delete_versions(tracking_uri: str, name: str, versions: list[str]) -> list[str]:
    """Delete these versions of `name`, refusing any that an alias points at; returns those deleted."""
    c = client(tracking_uri)
    aliased = set(c.get_registered_model(name).aliases.values()) if versions else set()
    done = []
    for v in versions:
        if str(v) in {str(a) for a in aliased}:
            raise RegistryError(f"refusing to delete version {v} of {name!r}: an alias points at it")
        c.delete_model_version(name, str(v))
        done.append(str(v))
    return done


def version_status(tracking_uri: str, name: str, alias: str) -> dict | None:
    """What an operator needs about the version behind `alias`: metrics, lineage, age, decision."""
    c = client(tracking_uri)
    try:
        mv = c.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None
    tags = dict(mv.tags)
    metrics = dict(c.get_run(mv.run_id).data.metrics) if mv.run_id else {}
    primary = tags.get("eval.primary_metric")
    key = {k: metrics[k] for k in (f"adapted_{primary}", "task_gain", "reference_perplexity_ratio", "reference_kl",
                                   "self_retention_perplexity_ratio", "champion_delta") if k in metrics}
    age_s = time.time() - (mv.creation_timestamp or 0) / 1000
    return {"alias": alias, "version": str(mv.version), "run_id": mv.run_id, "created_ms": mv.creation_timestamp,
            "age_s": age_s, "primary_metric": primary, "metrics": key, "decision": tags.get("promotion.decision"),
            "lineage": {k.removeprefix("lineage."): v for k, v in tags.items() if k.startswith("lineage.")},
            "last_skip": json.loads(tags["schedule.last_skip"]) if tags.get("schedule.last_skip") else None}


def model_status(tracking_uri: str, name: str) -> dict:
    """Champion and challenger of `name` (None when unset) and its version count."""
    c = client(tracking_uri)
    _require_model(c, name)
    return {"name": name, "versions": len(list_versions(tracking_uri, name)),
            CHAMPION: version_status(tracking_uri, name, CHAMPION),
            CHALLENGER: version_status(tracking_uri, name, CHALLENGER)}


def versions_overview(tracking_uri: str, name: str) -> list[dict]:
    """Every version of `name`, oldest first: number, creation time (ms), aliases, gate decision, run."""
    c = client(tracking_uri)
    model = _require_model(c, name)
    aliases: dict[str, list[str]] = {}
    for alias, v in model.aliases.items():
        aliases.setdefault(str(v), []).append(alias)
    return [{"version": str(v.version), "created_ms": v.creation_timestamp, "aliases": sorted(aliases.get(str(v.version), [])),
             "decision": v.tags.get("promotion.decision", ""), "run_id": v.run_id}
            for v in sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))]


def protected_versions(tracking_uri: str, name: str) -> set[str]:
    """Versions retention never deletes: the champion, the previous champion, the challenger."""
    found = [get_alias(tracking_uri, name, a) for a in (CHAMPION, CHALLENGER)]
    return {v.version for v in found if v is not None} | {v for v in [previous_champion(tracking_uri, name)] if v}
