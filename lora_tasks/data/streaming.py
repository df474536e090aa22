"""The data contract on streamed data: the same checks as `validation`, one pandas batch at a time.

Pure functions of a batch, which Ray Data runs with `map_batches` on the cluster (see
`distributed.py`, the only module that touches Ray), plus the rule that decides whether a train
split streams at all (`data.loader`). A row's split comes from its content hash, so it is the same
in every pass and on every worker."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import PipelineConfig
from ..errors import ValidationFailed
from .prepare import columns, contract_kwargs
from .sources import canonical_value
from .validation import Issue, ValidationReport, ValidationResult, validate_splits

STREAM_FORMATS = ("jsonl", "parquet", "csv")


def streams_train_data(cfg: PipelineConfig) -> bool:
    """Whether the train split goes through Ray Data (see `data.loader`)."""
    d = cfg.data
    if d.loader != "auto":
        return d.loader == "ray_data"
    if "://" in d.train_path:
        return True
    p = Path(d.train_path)
    if not p.exists() or stream_format(cfg) not in STREAM_FORMATS:
        return False
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return size > d.streaming_threshold_mb * 2**20


def stream_format(cfg: PipelineConfig) -> str:
    """The train source's format for Ray Data (from `data.format` or the file extensions)."""
    d = cfg.data
    if d.format != "auto":
        return d.format
    name = d.train_path.rstrip("/")
    p = Path(name)
    if "://" not in name and p.is_dir():
        exts = {f.suffix.lower() for f in p.rglob("*") if f.is_file() and not f.name.startswith((".", "_"))}
        name = "x" + (exts.pop() if len(exts) == 1 else "")
    suffix = Path(name).suffix.lower()
    return {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl", ".parquet": "parquet", ".pq": "parquet",
            ".csv": "csv"}.get(suffix, "unknown")



PATH_COLUMN = "path"
"""Column Ray Data adds with `include_paths=True`: the source file of each row."""


def eval_mask(df: pd.DataFrame, cols: list[str], eval_fraction: float | None) -> np.ndarray:
    """Rows in the eval split: those whose content hash falls below `eval_fraction`.

    A row's split depends on its content alone, so it is the same in every pass and on every
    worker, and identical rows always land in the same split (no train/eval overlap)."""
    if not eval_fraction:
        return np.zeros(len(df), dtype=bool)
    return content_share(df, cols) < eval_fraction


def content_share(df: pd.DataFrame, cols: list[str], salt: bytes = b"") -> np.ndarray:
    """Each row's content hash (salted) as a number in [0, 1): the same in every pass and run."""
    keys = [salt + _dump_row([canonical_value(v) for v in row]) for row in df[cols].itertuples(index=False, name=None)]
    return np.array([int.from_bytes(hashlib.sha256(k).digest()[:8], "big") / 2**64 for k in keys], dtype=float)


SAMPLE_ORDER = "_sample_order"
"""Column of `sample_batch`: the row's place in the sample (its salted content hash)."""


def sample_batch(df: pd.DataFrame, cfg: PipelineConfig, share: float) -> pd.DataFrame:
    """The rows of a (valid) batch whose content hash, salted apart from the eval split's, falls
    below `share`, with it in `SAMPLE_ORDER`: a sample that is the same in every run."""
    order = content_share(df, columns(cfg), salt=b"sample:")
    out = df[order < share].copy()
    out[SAMPLE_ORDER] = order[order < share]
    return out


def _dump_row(values: list) -> bytes:
    return json.dumps(values, ensure_ascii=False, separators=(",", ":"), default=str).encode()


def check_batch(
    df: pd.DataFrame, cfg: PipelineConfig, eval_fraction: float | None
) -> tuple[ValidationResult, pd.DataFrame, pd.DataFrame]:
    """The contract on one batch, split by content hash: (result, train part, eval part).

    Duplicates, overlap and conflicts are not checked: a batch does not see the whole split, so a
    per-batch check would find some of them and pass the rest (the hash split keeps identical rows
    in one split, but rows with one input and two answers may land in either)."""
    cols = columns(cfg)
    missing = [c for c in cols if c not in df.columns]
    if missing:
        raise ValidationFailed(
            f"the train source has no column(s) {missing} (columns: {[c for c in df.columns if c != PATH_COLUMN]}). "
            "Fix: rename the columns or set data.text_column / prompt_column / completion_column / label_column."
        )
    is_eval = eval_mask(df, cols, eval_fraction)
    train, eval_ = df[~is_eval].reset_index(drop=True), df[is_eval].reset_index(drop=True)
    train.index, eval_.index = pd.RangeIndex(1, len(train) + 1), pd.RangeIndex(1, len(eval_) + 1)
    kwargs = {**contract_kwargs(cfg), "check_duplicates": False, "check_overlap": False, "check_conflicts": False}
    return validate_splits(train.drop(columns=[PATH_COLUMN], errors="ignore"),
                           eval_.drop(columns=[PATH_COLUMN], errors="ignore"), **kwargs), train, eval_


def summarise_batch(df: pd.DataFrame, cfg: PipelineConfig, eval_fraction: float | None, max_issues: int = 20) -> pd.DataFrame:
    """One row per batch: rows and valid rows per split, failing rows per check, the first issues
    (each naming its source file, since Ray Data keeps no row numbers)."""
    result, train, eval_ = check_batch(df, cfg, eval_fraction)
    parts = {"train": train, "eval": eval_}
    issues = []
    for i in result.report.issues[:max_issues]:
        part = parts[i.split]
        where = f" (in {part[PATH_COLUMN].iloc[i.row - 1]})" if i.row and PATH_COLUMN in part else ""
        issues.append({**asdict(i), "row": None, "reason": i.reason + where})
    r = result.report
    return pd.DataFrame([{
        "rows": json.dumps(r.rows), "valid": json.dumps(r.valid_rows), "counts": json.dumps(r.counts_by_check),
        "issues": json.dumps(issues, default=str),
    }])


def merge_summaries(summaries: list[dict], task: str, max_issues: int = 1000) -> ValidationReport:
    """One report from the per-batch summaries of `summarise_batch`."""
    parts = [ValidationReport(task=task, rows=json.loads(s["rows"]), valid_rows=json.loads(s["valid"]),
                              issues=[Issue(**i) for i in json.loads(s["issues"])], counts_by_check=json.loads(s["counts"]))
             for s in summaries]
    return ValidationReport.combine(task, parts, max_issues)


def valid_batch(df: pd.DataFrame, cfg: PipelineConfig, eval_fraction: float | None, split: str) -> pd.DataFrame:
    """The valid rows of one split in a batch, cleaned as the contract cleans them, model columns only."""
    result, _, _ = check_batch(df, cfg, eval_fraction)
    return (result.train if split == "train" else result.eval)[columns(cfg)].reset_index(drop=True)


def invalid_batch(df: pd.DataFrame, cfg: PipelineConfig, eval_fraction: float | None) -> pd.DataFrame:
    """The invalid rows of a batch with the checks they failed, for the quarantine files."""
    result, _, _ = check_batch(df, cfg, eval_fraction)
    return result.invalid.drop(columns=["row"]).astype(str).reset_index(drop=True)
