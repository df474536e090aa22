"""Task scores of models that do not change between runs, kept on disk and reused.

The base model's scores on an eval split depend only on the base's weights, the rows and how
they are scored; a champion's only on its adapter besides. A scheduled pipeline scores both
again every run; here they are computed once, keyed by all of that, and read back after. The
new adapter's scores (as trained) are stored too: when it is promoted, its registered files are
the same bytes, so the next run finds them as the champion's.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..config import PipelineConfig
from ..modeling import cache_dir, write_cache_file


def model_identity(base_hash: str | None, adapter_dir: str | None, precision: str, device: str) -> str | None:
    """One model as it scores: base weights, adapter weights (None: the base itself), precision,
    device and code versions. None when the base has no content hash (a hub id at a branch or
    tag, which may move: pin `base_model.revision` to a commit): then nothing of it is cached."""
    if not base_hash:
        return None
    return json.dumps({"base": base_hash, "adapter": _files_hash(adapter_dir) if adapter_dir else None,
                       "precision": precision, "device": str(device), "torch": torch.__version__,
                       "prefect_lora": __version__}, sort_keys=True)


def scores_key(cfg: PipelineConfig, model: str, rows: list[dict]) -> str:
    """The identity of one model's (`model_identity`) scores on `rows`: the model, the rows and
    every setting that changes a score."""
    d = cfg.data
    settings = {
        "task": cfg.task, "columns": [d.prompt_column, d.completion_column, d.text_column, d.label_column],
        "labels": d.labels, "chat_template": d.chat_template, "system_prompt": d.system_prompt,
        "max_seq_length": cfg.training.max_seq_length, "batch_size": cfg.evaluation.batch_size,
        "generation": cfg.evaluation.generation.model_dump(mode="json") if cfg.evaluation.generation else None,
    }
    blob = json.dumps({"model": model, "settings": settings, "rows": rows}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load(key: str) -> tuple[dict, dict, list[str]] | None:
    """(metrics, per-unit values, generated answers) stored under `key`, or None."""
    try:
        d = json.loads(_path(key).read_text())
    except (OSError, ValueError):  # never stored (or removed meanwhile): score again
        return None
    return d["metrics"], {k: np.array(v) for k, v in d["units"].items()}, d["answers"]


def save(key: str, scores: tuple[dict, dict, list[str]]) -> None:
    """Store `scores` under `key`, atomically (a reader never sees half a file)."""
    metrics, units, answers = scores
    blob = json.dumps({"metrics": metrics, "units": {k: np.asarray(v).tolist() for k, v in units.items()},
                       "answers": answers})
    write_cache_file(_path(key), lambda f: f.write(blob.encode()))


def _path(key: str) -> Path:
    return cache_dir() / "scores" / f"{key[:32]}.json"


def _files_hash(folder: str) -> str:
    """sha256 over the names and bytes of a folder's files (an adapter: its weights and config)."""
    h = hashlib.sha256()
    for p in sorted(Path(folder).rglob("*")):
        if p.is_file():
            h.update(p.relative_to(folder).as_posix().encode())
            with p.open("rb") as f:
                for chunk in iter(lambda: f.read(1 << 20), b""):
                    h.update(chunk)
    return h.hexdigest()
