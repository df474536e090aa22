"""What a pipeline's first run computes of the base model alone, computed ahead of it.

The base's answers to the replay prompts and the probes, its task scores on the eval split and
its side of the forgetting comparison depend only on the base, the data and the settings that
score them: every run reads them from the caches under `~/.cache/prefect-lora` (`probes`,
`score_cache`, `block_cache`) and only the first computes them. `prefect-lora warm CONFIG` (and
`prefect-lora demo prepare`) computes them at set-up, so the first scheduled run costs what
later runs do."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from .config import PipelineConfig
from .measurement.evaluation import keep_base_scores
from .modeling import describe_base_model
from .training.launcher import baseline_rows, prepare_data
from .training.replay import replay_rows


@dataclass(frozen=True)
class Warmed:
    replay_prompts: int
    """Replay prompts the base has answered (0 without `replay.share` or with passages to replay)."""
    eval_rows: int
    scores_kept: bool
    """Whether the task scores and forgetting states were kept: a base without a content hash (a
    hub id at a branch or tag) keeps only its answers, keyed by id and revision."""
    seconds: float


def warm_base(cfg: PipelineConfig, out_dir: str | Path) -> Warmed:
    """Validate `cfg`'s data (its report goes to `out_dir`), then compute and keep the base's
    replay answers and everything its evaluation reads of the base alone. Trains nothing."""
    started = time.perf_counter()
    data = prepare_data(cfg, out_dir)
    base = describe_base_model(cfg.base_model.name_or_path, cfg.base_model.revision)
    replay = replay_rows(cfg, len(data.train_rows), base)
    keep_base_scores(cfg, data.eval_rows, base_info=base, train_rows=baseline_rows(cfg, data))
    answered = len({r[cfg.data.prompt_column] for r in replay}) if cfg.replay.source == "self" else 0
    return Warmed(answered, len(data.eval_rows), base.content_hash is not None, time.perf_counter() - started)
