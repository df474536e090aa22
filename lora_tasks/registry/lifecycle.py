"""Operating a scheduled model: skip a run that would retrain on the same inputs, apply
retention, keep what a failed registration needs to be completed later, and say what a run did.

Selection logic and plain files; the MLflow calls it needs are `registry.py`'s and `aliases.py`'s,
the wiring is in `flows/`."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path

from ..config import PipelineConfig
from ..errors import LoraTaskError
from . import aliases, registry

SKIP_KEYS = ("lineage.data_fingerprint", "lineage.config_hash")
"""The lineage a run must share with a decided version to be skipped: same validated data, same config."""

SKIPPED_MESSAGE = "skipped: no new data"
REGISTRATION_FILE = "registration.json"
BASELINE_REASON = "training.method is full: a baseline run, evaluated and logged but never registered or promoted"
DECISIONS = {"promoted": "promoted", "rejected": "not promoted"}
"""The gate's decisions as a version records them (tag `promotion.decision`, `aliases.settle_decision`),
and as people read them. A version without one was not decided: its run failed before the gate
(`prefect-lora register RUN_DIR` completes it), or it waits for its fleet's gate."""


def unchanged_since(version_tags: dict[str, str] | None, lineage: dict[str, str]) -> bool:
    """Whether a version was trained on exactly this data and config (then retraining is waste).

    Missing or empty values never match: a version without lineage is always retrained against."""
    if not version_tags:
        return False
    return all(lineage.get(k) and version_tags.get(k) == lineage.get(k) for k in SKIP_KEYS)


@dataclass(frozen=True)
class Decided:
    """A registered version and its tags (lineage, `promotion.decision`)."""

    version: str
    tags: dict[str, str]


@dataclass(frozen=True)
class Repeat:
    """The registered version a run would repeat, trained on the same data and config: the run is skipped."""

    version: str
    champion: bool
    """The current champion (it stays)."""
    decision: str = ""
    """What the gate decided of it (`DECISIONS`' words); empty for a champion without the tag."""


def latest_decided(versions: list[Decided]) -> Decided | None:
    """The newest version whose gate decided it, promoted or not (`DECISIONS`); None when none was."""
    decided = [v for v in versions if v.tags.get("promotion.decision") in DECISIONS]
    return max(decided, key=lambda v: int(v.version), default=None)


def repeated_version(lineage: dict[str, str], champion, latest: Decided | None) -> Repeat | None:
    """The version a run on `lineage` would repeat, so the run is skipped: the champion (anything
    with `version` and `tags`) when it was trained on this data and config, else the latest decided
    version when it was, whatever its decision: the same inputs would be evaluated again to the
    same end, and a refused config would register a duplicate version on every scheduled run.
    None: something changed, train."""
    if champion is not None and unchanged_since(champion.tags, lineage):
        return Repeat(champion.version, True, DECISIONS.get(champion.tags.get("promotion.decision"), ""))
    if latest is not None and unchanged_since(latest.tags, lineage):
        return Repeat(latest.version, False, DECISIONS[latest.tags["promotion.decision"]])
    return None


def read_latest_decided(tracking_uri: str, name: str) -> Decided | None:
    """The newest decided version of `name` in the registry (`latest_decided`)."""
    return latest_decided([Decided(v, tags) for v, tags in registry.versions_with_tags(tracking_uri, name)])


def skip_reason(lineage: dict[str, str], repeat: Repeat) -> str:
    """Why a run is skipped: the lineage it shares with the version it would repeat, that
    version and its decision, and what runs it again."""
    if repeat.champion:
        what = f"champion version {repeat.version}"
    else:
        what = f"version {repeat.version}, which the gate {'promoted' if repeat.decision == 'promoted' else 'did not promote'}"
    return (f"{SKIPPED_MESSAGE}: data fingerprint {lineage['lineage.data_fingerprint'][:12]} and config hash "
            f"{lineage['lineage.config_hash'][:12]} equal those of {what}; new data, a changed config or force "
            "(--force, the flow's force=True) runs it again")


def skip_headline(model_name: str, repeat: Repeat) -> str:
    """`demo-orders skipped: no new data (champion version 3 has the same data and config)`: a skipped
    run in one line (a flow run's state message)."""
    what = f"champion version {repeat.version}" if repeat.champion else f"version {repeat.version}"
    return f"{model_name} {SKIPPED_MESSAGE} ({what} has the same data and config)"


# ----------------------------------------------------------------------------- retention


def checkpoints_to_delete(runs: list[tuple[str, float]], keep: int | None, current: str | None = None) -> list[str]:
    """Of the checkpoint folders of a model's runs `(path, age key)` (higher key = newer), those
    beyond the newest `keep`; never `current` (the run that just finished). `keep` None keeps all.

    Whole `train/` folders go, never single checkpoints: Ray Train refuses to resume from a
    folder whose snapshot names a checkpoint that is gone."""
    if keep is None:
        return []
    others = [(p, k) for p, k in runs if p != current]
    newest_first = sorted(others, key=lambda c: c[1], reverse=True)
    room = max(keep - (1 if current is not None and any(p == current for p, _ in runs) else 0), 0)
    return [path for path, _ in newest_first[room:]]


def versions_to_delete(versions: list[str], keep: int | None, protected: set[str | None]) -> list[str]:
    """Registered versions beyond the newest `keep`, never a protected one (champion, previous
    champion, challenger, the version this run registered). `keep` None keeps everything."""
    if keep is None:
        return []
    newest_first = sorted({str(v) for v in versions}, key=int, reverse=True)
    keep_set = set(newest_first[:keep]) | {str(p) for p in protected if p is not None}
    return [v for v in newest_first if v not in keep_set]


@dataclass
class Retention:
    """What retention deleted: whole checkpoint folders (`RUN_DIR/train`) and registered versions."""

    checkpoints: list[str] = field(default_factory=list)
    versions: list[str] = field(default_factory=list)


class RetentionStopped(LoraTaskError):
    """Retention failed part way; `deleted` is what it deleted before (the next run tries again)."""

    def __init__(self, message: str, deleted: Retention):
        self.deleted = deleted
        super().__init__(message)


def apply_retention(cfg: PipelineConfig, run_dir: str, version: str | None) -> Retention:
    """Delete checkpoint folders and registered versions beyond `cfg.retention`; never this run's
    checkpoints or `version`, the champion, the previous champion or the challenger.

    Raises RetentionStopped (carrying what was deleted so far) when a deletion fails."""
    deleted = Retention()
    try:
        deleted.checkpoints = delete_old_checkpoints(cfg, run_dir)
        deleted.versions = delete_old_versions(cfg, version)
    except Exception as exc:
        raise RetentionStopped(str(exc), deleted) from exc
    return deleted


def delete_old_checkpoints(cfg: PipelineConfig, run_dir: str) -> list[str]:
    """Delete the `train/` folders of this model's local runs beyond `retention.keep_checkpoints`.

    A storage URI is left alone: its checkpoints are the store's to expire."""
    keep, root = cfg.retention.keep_checkpoints, cfg.scaling.storage_path
    if not keep or "://" in root:
        return []
    found = [(str(t), t.stat().st_mtime) for t in (Path(root) / cfg.model_name).glob("run-*/train")]
    doomed = checkpoints_to_delete(found, keep, str(Path(run_dir) / "train"))
    for path in doomed:
        shutil.rmtree(path, ignore_errors=True)
    return doomed


def delete_old_versions(cfg: PipelineConfig, version: str | None) -> list[str]:
    """Delete registered versions beyond `retention.keep_versions`; returns those deleted."""
    keep, uri, name = cfg.retention.keep_versions, cfg.tracking.tracking_uri, cfg.model_name
    if not keep:
        return []
    protected = aliases.protected_versions(uri, name) | {version}
    return registry.delete_versions(uri, name, versions_to_delete(registry.list_versions(uri, name), keep, protected))


# ----------------------------------------------------------------------------- pending registration


@dataclass
class DataSummary:
    """What the summary and the MLflow run need of the validated data, without the rows."""

    train_count: int
    eval_count: int
    fingerprint: str
    report_summary: str
    quarantine_path: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    digests: dict[str, str] = field(default_factory=dict)
    """Each split's own digest (`PreparedData.digests`)."""

    @classmethod
    def of(cls, data) -> DataSummary:
        """From a `pipeline.PreparedData`."""
        return cls(data.train_count, len(data.eval_rows), data.fingerprint, data.report.summary(),
                   data.quarantine_path, dict(data.files), dict(data.digests))

    def digest(self, split: str) -> str:
        """The digest of split `split`'s own rows (`train`, `eval`); the whole data's fingerprint
        for a run recorded before the splits had their own."""
        return self.digests.get(split, self.fingerprint)


@dataclass
class PendingRegistration:
    """Everything a run had when it reached registration: written to `RUN_DIR/registration.json`
    before the first MLflow write after training, so `prefect-lora register RUN_DIR` can complete
    a registration that a tracking-server outage stopped, without training or evaluating again."""

    config: dict
    """The resolved config (`PipelineConfig.model_dump(mode="json")`, absolute paths)."""
    run_id: str
    """The MLflow run opened before training."""
    run_dir: str
    adapter_dir: str
    base_model: str
    tags: dict[str, str]
    """Lineage and run tags for the version."""
    data: DataSummary
    report: dict
    """`EvalReport.to_dict()`."""
    train_metrics: dict = field(default_factory=dict)
    champion_version: str | None = None
    """The champion the evaluation compared against (None: there was none)."""
    created_at: str = ""
    version: str | None = None
    """Set once the version is registered (a later `register` does not register it twice)."""
    status: str = "pending"
    """`pending`, `registered` (version exists, gate not applied yet) or `done`."""

    def save(self) -> Path:
        path = Path(self.run_dir) / REGISTRATION_FILE
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(asdict(self), indent=2, default=str))
        tmp.replace(path)  # atomic: a crash never leaves half a file
        return path


def new_pending(config: dict, run_id: str, run_dir: str, adapter_dir: str, base_model: str, tags: dict[str, str],
                data: DataSummary, report: dict, train_metrics: dict, champion_version: str | None) -> PendingRegistration:
    numbers = {k: v for k, v in train_metrics.items() if isinstance(v, (int, float, str, bool)) or v is None}
    return PendingRegistration(config, run_id, str(run_dir), str(adapter_dir), base_model, dict(tags), data, report,
                               numbers, champion_version, datetime.now(timezone.utc).isoformat(timespec="seconds"))


def read_pending(run_dir: str | Path) -> PendingRegistration:
    """The pending registration of a run folder, or a clear error saying what is missing."""
    run_dir = Path(run_dir)
    path = run_dir / REGISTRATION_FILE
    if not path.is_file():
        raise LoraTaskError(
            f"{path} does not exist: RUN_DIR must be a run folder (storage_path/MODEL/run-KEY) whose run "
            "trained and evaluated an adapter; the flow writes registration.json before registering it"
        )
    try:
        raw = json.loads(path.read_text())
        raw["data"] = DataSummary(**raw["data"])
        pending = PendingRegistration(**raw)
    except (ValueError, TypeError, KeyError) as exc:
        raise LoraTaskError(f"{path} is not a registration record prefect-lora wrote ({exc}); run the flow again") from None
    if not (Path(pending.adapter_dir) / "adapter_model.safetensors").is_file():
        raise LoraTaskError(f"the adapter of {run_dir} is missing ({pending.adapter_dir}); run the flow again to retrain it")
    return pending


# ----------------------------------------------------------------------------- what a run did


@dataclass
class RunResult:
    """What a retraining or registration run did: the flows' return value, which the CLI prints
    and schedulers, tests and benchmarks read."""

    model_name: str
    version: str | None
    """The version registered (a skipped run: the version it would repeat, the champion or the latest
    decided one; a baseline: None)."""
    promoted: bool
    reasons: list[str]
    """Every reason the gate gave, or why nothing was trained or registered."""
    run_id: str
    """The MLflow run (of a skipped run: the short run that records the skip)."""
    run_dir: str
    tracking_uri: str
    metrics: dict[str, float] = field(default_factory=dict)
    """Flat evaluation metrics (`EvalReport.flat_metrics()`); empty when nothing was evaluated."""
    skipped: bool = False
    """True when nothing was trained (data and config unchanged since the champion or the latest
    decided version) or nothing was left to register."""
    champion_before: str | None = None
    summary: str = ""
    """The run's Markdown summary, as the Prefect artifact shows it."""
    method: str = "lora"
    """`training.method`: `full` marks a baseline run, logged but never registered."""
    failed_checks: list[str] = field(default_factory=list)
    """The gate's checks that did not pass (shown to fail, or undecided)."""
    gate_p_value: float | None = None
    """The gate as one test: its p-value (`promotion.Decision.p_value`); None when not gated."""
    held: bool = False
    """Evaluated and held for the fleet's gate: registration.json written, nothing registered yet."""


def already_registered(pending: PendingRegistration, run_dir: str, model_name: str, tracking_uri: str) -> RunResult:
    """The result of completing the registration of `run_dir` once more: there is nothing to do."""
    reason = f"{run_dir}: already registered as version {pending.version} and gated; nothing to do"
    return RunResult(model_name, pending.version, False, [reason], pending.run_id, run_dir, tracking_uri, skipped=True)
