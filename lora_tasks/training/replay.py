"""Replay: general data mixed into training so the adapter keeps what its base knew.

`source: self` is self-distillation: the base model's own greedy answers to general prompts (a
set disjoint from the forgetting probes), generated once per base model and cached; training on
them pulls the adapter back towards the base on everything but the task. `source: corpus` trains
on passages of a text file as plain text. Either way the replay must not overlap what forgetting
is measured on, or the gate would read evidence the adapter was trained on (`check_disjoint`).
"""

from __future__ import annotations

import math
from pathlib import Path

from ..config import PipelineConfig
from ..data.evidence import read_mc_benchmark, read_reference_texts
from ..errors import ConfigError
from ..modeling import BaseModelInfo, describe_base_model, load_base_model, load_tokenizer
from .compute import compute_for
from .encoding import REPLAY_KEY
from .probes import GENERAL_PROBES, REPLAY_PROMPTS, base_answers, cached_answers, spread


def replay_prompts(cfg: PipelineConfig) -> list[str]:
    """The prompts whose base answers are replayed: `replay.path` (one per line) or the built-in set."""
    if cfg.replay.path:
        return read_reference_texts(cfg.replay.path)
    return list(REPLAY_PROMPTS)


def check_disjoint(cfg: PipelineConfig) -> None:
    """Refuse replay that shares text with the forgetting evidence: the probes, the reference
    corpus or a benchmark's questions. One ConfigError naming each overlap and the fix."""
    r, ref = cfg.replay, cfg.evaluation.reference
    if not r.share or ref is None:
        return
    mine = {_norm(t) for t in (replay_prompts(cfg) if r.source == "self" else read_reference_texts(r.path))}
    evidence = {"evaluation.reference.probes": GENERAL_PROBES if ref.probes else []}
    if ref.path:
        evidence["evaluation.reference.path"] = read_reference_texts(ref.path)
    for path in ref.benchmarks:
        evidence[f"benchmark {Path(path).name}"] = [q.question for q in read_mc_benchmark(path)]
    problems = []
    for where, texts in evidence.items():
        shared = sorted({t for t in texts if _norm(t) in mine})
        if shared:
            problems.append(f"replay shares {len(shared)} text(s) with {where} (e.g. {shared[0][:60]!r}): the gate would "
                            f"read evidence the adapter trained on. Fix: replay other text (replay.path) or measure "
                            f"forgetting on other text")
    if problems:
        raise ConfigError(problems, source="replay")


def _norm(text: str) -> str:
    return " ".join(str(text).lower().split())


def replay_rows(cfg: PipelineConfig, num_task_rows: int, base_info: BaseModelInfo | None = None,
                device: str = "cpu") -> list[dict]:
    """Rows to add to the `num_task_rows` task rows so that `replay.share` of the mix is replay,
    cycling through the replay set when it is smaller. Empty while `replay.share` is 0."""
    r = cfg.replay
    if not r.share or num_task_rows == 0:
        return []
    wanted = math.ceil(r.share / (1.0 - r.share) * num_task_rows)
    pool = _self_rows(cfg, base_info, device, _answers_needed(cfg, wanted)) if r.source == "self" else _corpus_rows(cfg)
    if not pool:
        raise ConfigError(["replay: the replay set is empty (no base answer or passage)"], source="replay")
    return [pool[i % len(pool)] for i in range(wanted)]


def _answers_needed(cfg: PipelineConfig, wanted: int) -> int:
    """How many replay prompts the base answers: one per replay row of the mix, but no more than
    twice the replay rows training reads in `max_steps` (unpacked): an answer never read is never
    generated, and the rows read still come from many prompts."""
    t = cfg.training
    if t.max_steps is None or t.packing:
        return wanted
    read = t.max_steps * t.batch_size * t.gradient_accumulation_steps * cfg.scaling.num_workers
    return min(wanted, 2 * math.ceil(cfg.replay.share * read))


def _self_rows(cfg: PipelineConfig, base_info: BaseModelInfo | None, device: str, limit: int) -> list[dict]:
    """The base's answers to `limit` of the replay prompts, spread over the set."""
    bm, d = cfg.base_model, cfg.data
    info = base_info or describe_base_model(bm.name_or_path, bm.revision)
    tokenizer = load_tokenizer(bm.name_or_path, bm.revision, bm.trust_remote_code)
    key, prompts = info.content_hash or f"{info.name_or_path}@{info.revision}", spread(replay_prompts(cfg), limit)
    answers = cached_answers(key, cfg.replay.max_new_tokens, prompts)
    if answers is None:  # generated once per base model and prompt set
        model = load_base_model(bm.name_or_path, cfg.task, revision=bm.revision, torch_dtype=bm.torch_dtype,
                                trust_remote_code=bm.trust_remote_code, pad_token_id=tokenizer.pad_token_id).to(device)
        with compute_for(cfg.training.precision, device).autocast():  # as the probes' answers: bf16 where the device runs it natively
            answers = base_answers(model, tokenizer, key, cfg.replay.max_new_tokens, cfg.evaluation.batch_size,
                                   prompts=prompts)
    return [{d.prompt_column: a["prompt"], d.completion_column: a["answer"], REPLAY_KEY: "chat"} for a in answers]


def _corpus_rows(cfg: PipelineConfig) -> list[dict]:
    d = cfg.data
    column = d.completion_column or d.text_column
    return [{**({d.prompt_column: ""} if d.prompt_column else {}), column: t, REPLAY_KEY: "text"}
            for t in read_reference_texts(cfg.replay.path)]
