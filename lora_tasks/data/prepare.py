"""Steps shared by every entry point: the run folder, in-memory data preparation and lineage."""

from __future__ import annotations

import hashlib
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

from .. import __version__
from ..config import PipelineConfig
from ..modeling import BaseModelInfo
from .sources import fingerprints, load_table, sample_rows, source_fingerprint, split_train_eval
from .validation import ValidationReport, enforce_policy, validate_splits

LOCAL_RUNS = ".prefect-lora/runs"
"""Local home of reports and adapters when `scaling.storage_path` is a URI."""


def run_key(cfg: PipelineConfig) -> str:
    """A run's identity: its training settings and the raw bytes of its data.

    A retried or re-run flow with the same config and data gets the same key, hence the same run
    folder, where Ray Train finds the latest checkpoint and continues from it."""
    blob = f"{cfg.training_hash()}:{source_fingerprint(cfg.data.train_path, cfg.data.eval_path)}"
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def run_dir_for(cfg: PipelineConfig) -> Path:
    """The local folder of the run `run_key(cfg)`: `storage_path/MODEL/run-KEY` (created).

    With a URI storage path it is the same relative folder under `.prefect-lora/runs`; the
    checkpoints themselves go to the URI (see `checkpoint_storage`)."""
    root = cfg.scaling.storage_path
    base = Path(LOCAL_RUNS).resolve() if "://" in root else Path(root)
    path = base / cfg.model_name / f"run-{run_key(cfg)}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def checkpoint_storage(cfg: PipelineConfig, run_dir: str | Path) -> str:
    """Where Ray Train keeps this run's checkpoints: the run folder, or the same place under a URI."""
    root = cfg.scaling.storage_path
    if "://" in root:
        return f"{root.rstrip('/')}/{cfg.model_name}/{Path(run_dir).name}"
    return str(run_dir)


def columns(cfg: PipelineConfig) -> list[str]:
    d = cfg.data
    if cfg.task == "sequence_classification":
        return [d.text_column, d.label_column]
    return [d.prompt_column, d.completion_column] if d.prompt_column else [d.text_column]


@dataclass(frozen=True)
class StreamSpec:
    """A train split that Ray Data streams to the workers instead of shipping rows."""

    path: str
    format: str
    num_rows: int
    """Valid train rows (counted by the validation pass): fixes the steps of an epoch."""
    eval_fraction: float | None
    """Rows whose content hash falls below this share are the eval split; None when `eval_path` is set."""


@dataclass
class PreparedData:
    """The validated splits as plain records, their fingerprint and the contract's report."""

    train_rows: list[dict]
    eval_rows: list[dict]
    fingerprint: str
    report: ValidationReport
    quarantine_path: str | None = None
    files: dict[str, str] = field(default_factory=dict)
    train_stream: StreamSpec | None = None
    """Set when the train split streams through Ray Data (`train_rows` is then empty)."""
    digests: dict[str, str] = field(default_factory=dict)
    """Each split's own digest, `train` and `eval` (`fingerprint` is of both): its MLflow dataset's."""

    @property
    def train_count(self) -> int:
        return self.train_stream.num_rows if self.train_stream else len(self.train_rows)


def contract_kwargs(cfg: PipelineConfig) -> dict:
    """The data contract's settings, as `validate_splits` takes them."""
    d, v, gen = cfg.data, cfg.data.validation, cfg.evaluation.generation
    return dict(
        task=cfg.task, text_column=d.text_column, prompt_column=d.prompt_column,
        completion_column=d.completion_column, label_column=d.label_column, labels=d.labels,
        min_chars=v.min_chars, max_chars=v.max_chars, check_duplicates=v.check_duplicates,
        check_overlap=v.check_overlap, check_conflicts=v.check_conflicts,
        # exact-match and JSON scoring assume one right completion per prompt; ROUGE-L (summaries) does not
        one_answer_per_prompt=gen is not None and gen.metric in ("exact", "json"),
    )


def prepare_in_memory(cfg: PipelineConfig, out_dir: str | Path) -> PreparedData:
    """Load, split, sample and validate the data in memory (pandas); write the report (and
    quarantine) to `out_dir`. Raises ValidationFailed (with the report) when the contract's policy
    stops the run. `launcher.prepare_data` decides between this and streaming on Ray Data."""
    d = cfg.data
    seed = cfg.training.seed
    train = load_table(d.train_path, d.format)
    if d.eval_path:
        eval_ = load_table(d.eval_path, d.format)
    else:
        train, eval_ = split_train_eval(train, d.eval_fraction, seed)
    train = sample_rows(train, d.max_train_rows, seed)
    eval_ = sample_rows(eval_, d.max_eval_rows, seed)
    v = d.validation
    result = validate_splits(train, eval_, **contract_kwargs(cfg))
    files = result.report.write(out_dir)
    result, quarantine = enforce_policy(
        result, policy=v.policy, max_invalid_fraction=v.max_invalid_fraction, quarantine_dir=out_dir
    )
    cols = columns(cfg)
    train_v, eval_v = result.train[cols], result.eval[cols]
    both, (train_fp, eval_fp) = fingerprints(train_v, eval_v)
    return PreparedData(
        train_rows=train_v.to_dict("records"),
        eval_rows=eval_v.to_dict("records"),
        fingerprint=both,
        digests={"train": train_fp, "eval": eval_fp},
        report=result.report,
        quarantine_path=str(quarantine) if quarantine else None,
        files=files,
    )


def code_version() -> str:
    """The package version, plus the git commit when running from a checkout (not the commit of a
    project whose virtual environment holds the installed package)."""
    checkout = Path(__file__).resolve().parents[2]
    if not (checkout / ".git").exists():
        return __version__
    try:
        sha = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=checkout, capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{__version__}+{sha}" if sha else __version__


def lineage_tags(cfg: PipelineConfig, base: BaseModelInfo, data_fingerprint: str) -> dict[str, str]:
    """What every registered version carries to say exactly where it came from; a value that does
    not apply (no revision of a local base, no content hash of a hub id) is left out, not blank."""
    tags = {
        "lineage.base_model": base.label,  # a hub id, not a local cache path (`modeling.base_model_name`)
        "lineage.base_model_revision": base.revision or "",
        "lineage.base_model_hash": base.content_hash or "",
        "lineage.data_fingerprint": data_fingerprint,
        "lineage.config_hash": cfg.config_hash(),
        "lineage.code_version": code_version(),
        "lineage.task": cfg.task,
    }
    return {k: v for k, v in tags.items() if v}


def same_base(champion_tags: dict[str, str], lineage: dict[str, str]) -> bool:
    """Whether a registered version was trained on this run's base model (same id and revision,
    or same content hash), so its adapter can be scored beside the new one on this base."""
    keys = ("lineage.base_model_hash",) if lineage.get("lineage.base_model_hash") else (
        "lineage.base_model", "lineage.base_model_revision")
    return all(champion_tags.get(k) == lineage.get(k) for k in keys)
