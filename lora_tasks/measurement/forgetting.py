"""How much the adapter changed what the base model knew, measured on a general reference corpus.

Base and adapted outputs come from the same PeftModel (adapter on, then `disable_adapter()`),
so only one copy of the base weights is ever in memory.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..config import PipelineConfig
from ..data.evidence import MCQuestion, read_mc_benchmark, read_reference_texts
from ..errors import DataError
from ..modeling import BaseModelInfo, describe_base_model
from ..training.encoding import kl_per_position
from ..training.probes import base_answers, probe_blocks, probe_prompts
from ..training.views import BASE
from . import sequential, stats
from .block_cache import BlockCache
from .embeddings import pooled_embeddings
from .evidence_split import Part
from .forgetting_table import forgetting_limits, forgetting_metric


def token_kl(base_logits: torch.Tensor, adapted_logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over masked positions of KL(base || adapted) of the next-token distributions, and the count."""
    kl = kl_per_position(F.log_softmax(base_logits.float(), dim=-1), F.log_softmax(adapted_logits.float(), dim=-1))
    m = mask.bool()
    return float(kl[m].sum()), int(m.sum())


def chunk_reference(texts: list[str], tokenizer, max_tokens: int, seq_len: int) -> list[list[int]]:
    """Concatenate the corpus into token blocks of `seq_len`, up to a budget of `max_tokens`."""
    blocks, current, used = [], [], 0
    eos = tokenizer.eos_token_id
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False)["input_ids"] + ([eos] if eos is not None else [])
        for tok in ids:
            current.append(tok)
            used += 1
            if len(current) == seq_len:
                blocks.append(current)
                current = []
            if used >= max_tokens:
                return blocks + ([current] if len(current) > 1 else [])
    return blocks + ([current] if len(current) > 1 else [])


def _batches(blocks: list[list[int]], batch_size: int, pad_id: int, score_from: list[int] | None = None):
    """Right-padded batches: ids, attention mask, and the mask of positions that are scored."""
    for i in range(0, len(blocks), batch_size):
        chunk = blocks[i : i + batch_size]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        scored = torch.zeros((len(chunk), width), dtype=torch.long)
        for j, b in enumerate(chunk):
            ids[j, : len(b)] = torch.tensor(b)
            mask[j, : len(b)] = 1
            scored[j, (score_from[i + j] if score_from else 0) : len(b)] = 1
        yield ids, mask, scored


def causal_lm_forgetting(peft_model, tokenizer, blocks: list[list[int]], batch_size: int, device="cpu",
                         score_from: list[int] | None = None) -> dict:
    """Reference perplexity of base and adapted, their ratio, mean per-token KL(base || adapted)
    and the scored tokens, of one PeftModel (its adapter on, then off). `score_from[i]`
    (optional) is the first scored token of block i, e.g. where an answer starts."""
    from ..training.views import PeftViews

    units = compare_on_blocks(PeftViews(peft_model), blocks, batch_size, tokenizer.pad_token_id or 0, device, score_from)
    return summarize_comparison(units, "adapted", "reference")


# ----------------------------------------------------------------------------- several models at once


def _scored_logits(model, ids: torch.Tensor, mask: torch.Tensor, pos: torch.Tensor,
                   hidden: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits at the positions `pos` marks, the final hidden states there). The output layer runs
    on those positions only (not on every prompt and padding token); given `hidden` (the states of
    an earlier call on the same batch), the transformer is skipped and only the output layer runs."""
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hidden is None:
        hidden = inner.get_decoder()(input_ids=ids, attention_mask=mask).last_hidden_state[:, :-1][pos]
    logits = inner.get_output_embeddings()(hidden).float()
    cap = getattr(inner.config, "final_logit_softcapping", None)
    return (torch.tanh(logits / cap) * cap if cap else logits), hidden


@torch.no_grad()
def compare_on_blocks(views, blocks: list[list[int]], batch_size: int, pad_id: int, device="cpu",
                      score_from: list[int] | None = None, cache: BlockCache | None = None) -> dict:
    """Per-block units of every view against `base` on token blocks: `tokens` (scored), `nll`
    per view (base included) and `kl` per non-base view (KL(base || view) summed over tokens).

    Blocks are batched by length (little padding); each batch's base distribution is computed
    once and compared with each other view in turn. With `cache` (`BlockCache`), a view whose
    units an earlier run kept is not run at all, and the base's final states at the scored
    positions are reused: only its output layer runs again."""
    cache = cache if cache is not None else BlockCache()
    key = hashlib.sha256(json.dumps([blocks, score_from, batch_size]).encode()).hexdigest()
    stored = {n: u for n in views.names if (u := cache.units(n, key)) is not None}
    out = {"tokens": np.zeros(len(blocks)), "nll": {n: np.zeros(len(blocks)) for n in views.names},
           "kl": {n: np.zeros(len(blocks)) for n in views.names if n != BASE}}
    todo = [n for n in views.names if n != BASE and n not in stored]
    if todo or BASE not in stored:
        _compare(views, blocks, batch_size, pad_id, device, score_from, todo, cache, key, out)
        for n in [BASE, *todo] if BASE not in stored else todo:
            cache.keep_units(n, key, {"tokens": out["tokens"], "nll": out["nll"][n], **({"kl": out["kl"][n]} if n != BASE else {})})
    for n, units in stored.items():
        out["tokens"] = units["tokens"]
        out["nll"][n] = units["nll"]
        if n != BASE:
            out["kl"][n] = units["kl"]
    if out["tokens"].sum() == 0:
        raise DataError("the forgetting text gave no tokens to score; give it more text")
    return out


def _compare(views, blocks: list[list[int]], batch_size: int, pad_id: int, device, score_from: list[int] | None,
             todo: list[str], cache: BlockCache, key: str, out: dict) -> None:
    """`compare_on_blocks`'s model runs: the base (from its kept states when there are some) and
    each view of `todo`, filling `out` in place."""
    order = sorted(range(len(blocks)), key=lambda i: len(blocks[i]))
    starts = [score_from[i] for i in order] if score_from else None
    states, kept = cache.base_states(key), []
    for b, (ids, mask, scored) in enumerate(_batches([blocks[i] for i in order], batch_size, pad_id, starts)):
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        pos = (scored[:, 1:] * mask[:, :-1]).bool()  # position p predicts token p + 1
        target, rows = ids[:, 1:][pos], pos.nonzero()[:, 0]
        where = order[b * batch_size : b * batch_size + len(ids)]

        def per_block(values: torch.Tensor) -> np.ndarray:
            return torch.zeros(len(ids), device=values.device).index_add_(0, rows, values).cpu().numpy()

        with views.use(BASE) as m:
            base, hidden = _scored_logits(m, ids, mask, pos, states[b].to(device) if states else None)
        kept.append(hidden.cpu())
        logp = F.log_softmax(base, dim=-1)
        del base
        out["nll"][BASE][where] = per_block(F.nll_loss(logp, target, reduction="none"))
        for name in todo:
            with views.use(name) as m:
                logq = F.log_softmax(_scored_logits(m, ids, mask, pos)[0], dim=-1)
            out["nll"][name][where] = per_block(F.nll_loss(logq, target, reduction="none"))
            out["kl"][name][where] = per_block(kl_per_position(logp, logq))
            del logq
        out["tokens"][where] = pos.sum(1).cpu().numpy()
    if not states:
        cache.keep_states(key, kept)


def summarize_comparison(units: dict, name: str, prefix: str) -> dict[str, float]:
    """`<prefix>_perplexity_base/_adapted/_ratio`, `<prefix>_kl`, `<prefix>_tokens` of view `name`."""
    n = float(units["tokens"].sum())
    base, other = units["nll"]["base"].sum() / n, units["nll"][name].sum() / n
    return {
        f"{prefix}_perplexity_base": math.exp(min(base, 50.0)),
        f"{prefix}_perplexity_adapted": math.exp(min(other, 50.0)),
        f"{prefix}_perplexity_ratio": math.exp(min(other - base, 50.0)),
        f"{prefix}_kl": float(units["kl"][name].sum() / n),
        f"{prefix}_tokens": n,
    }


RETRIEVAL_PASSAGE_TOKENS = 32
"""Tokens of each passage of a retrieval pair (special tokens included; fewer when
`training.max_seq_length` is shorter): short enough that ~600 pairs cost one forward pass over
~40k tokens, long enough that a base encoder finds many continuations (MiniLM: 16% of 1,000)."""


def retrieval_pairs(texts: list[str], tokenizer, seq_len: int, max_tokens: int) -> list[tuple[list[int], list[int]]]:
    """Each paragraph (line) of the corpus long enough to cut in two, as (its opening, what follows
    it): passages of up to `seq_len` tokens with the tokenizer's special tokens, the second at
    least half as long as the first; until `max_tokens` tokens are used."""
    prefix, suffix = _special_tokens(tokenizer)
    part = max(seq_len - len(prefix) - len(suffix), 2)
    pairs, used = [], 0
    for text in texts:
        ids = tokenizer(text, add_special_tokens=False, truncation=True, max_length=2 * part)["input_ids"]
        if len(ids) < part + part // 2:
            continue
        pairs.append((prefix + ids[:part] + suffix, prefix + ids[part:] + suffix))
        used += len(ids)
        if used >= max_tokens:
            break
    return pairs


def _special_tokens(tokenizer) -> tuple[list[int], list[int]]:
    """The ids the tokenizer puts before and after a text's own (BERT: [CLS] and [SEP]; Llama: BOS)."""
    full, plain = tokenizer("a")["input_ids"], tokenizer("a", add_special_tokens=False)["input_ids"]
    at = next((i for i in range(len(full) - len(plain) + 1) if full[i : i + len(plain)] == plain), 0)
    return full[:at], full[at + len(plain):]


@torch.no_grad()
def retrieval_correct(model, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, device="cpu"
                      ) -> np.ndarray:
    """Per pair: 1.0 when the model's pooled embedding of the pair's opening is nearer (cosine) to
    its own continuation than to every other pair's, else 0.0. A general retrieval task any text
    encoder can be scored on, with no labels beyond the corpus's own paragraphs."""
    q = pooled_embeddings(model, [a for a, _ in pairs], pad_id, batch_size, device)
    k = pooled_embeddings(model, [b for _, b in pairs], pad_id, batch_size, device)
    q /= np.linalg.norm(q, axis=1, keepdims=True).clip(1e-12)
    k /= np.linalg.norm(k, axis=1, keepdims=True).clip(1e-12)
    sims = q @ k.T
    own = np.diag(sims).copy()
    np.fill_diagonal(sims, -np.inf)
    return (own > sims.max(axis=1)).astype(float)  # a tie is no hit: an encoder that maps all text to one point finds none


def retrieval_by_view(views, pairs: list[tuple[list[int], list[int]]], pad_id: int, batch_size: int, device="cpu",
                      cache: BlockCache | None = None) -> dict[str, np.ndarray]:
    """`retrieval_correct` of every view; a view that does not change between runs (the base, a
    champion) is read back from `cache` when an earlier run kept it."""
    cache = cache if cache is not None else BlockCache()
    key = "retrieval:" + hashlib.sha256(json.dumps(pairs).encode()).hexdigest()
    out = {}
    for name in views.names:
        kept = cache.units(name, key)
        if kept is not None:
            out[name] = kept["correct"]
            continue
        with views.use(name) as m:
            out[name] = retrieval_correct(m, pairs, pad_id, batch_size, device)
        cache.keep_units(name, key, {"correct": out[name]})
    return out


# ----------------------------------------------------------------------------- multiple-choice benchmarks


def mc_blocks(questions: list[MCQuestion], tokenizer, max_len: int) -> tuple[list[list[int]], list[int], list[int]]:
    """(token blocks "Question: ...\\nAnswer: <choice>", where each choice starts, question index
    of each block). Only the choice's tokens are scored."""
    blocks, starts, owner = [], [], []
    for qi, q in enumerate(questions):
        prompt = tokenizer(f"Question: {q.question}\nAnswer:", add_special_tokens=True)["input_ids"]
        for choice in q.choices:
            c = tokenizer(" " + choice, add_special_tokens=False)["input_ids"][: max_len - 1]
            p = prompt[-(max_len - len(c)):]
            blocks.append(p + c)
            starts.append(len(p))
            owner.append(qi)
    return blocks, starts, owner


@torch.no_grad()
def mc_correct(views, questions: list[MCQuestion], tokenizer, batch_size: int, max_len: int, device="cpu") -> dict[str, np.ndarray]:
    """Per view, per question: 1.0 when the right choice has the highest log-likelihood (summed
    over the choice's tokens; ties go to the first), else 0.0."""
    blocks, starts, owner = mc_blocks(questions, tokenizer, max_len)
    pad = tokenizer.pad_token_id or 0
    loglik: dict[str, list[float]] = {n: [] for n in views.names}
    for ids, mask, scored in _batches(blocks, batch_size, pad, starts):
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        target, tmask = ids[:, 1:], scored[:, 1:] * mask[:, :-1]
        for name in views.names:
            with views.use(name) as m:
                logits = m(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            loglik[name] += (-(ce * tmask).sum(1)).tolist()
    out = {}
    owner_arr = np.array(owner)
    for name, ll in loglik.items():
        ll = np.array(ll)
        out[name] = np.array([float(int(np.argmax(ll[owner_arr == qi])) == q.answer) for qi, q in enumerate(questions)])
    return out


# ----------------------------------------------------------------------------- every source a config names


@dataclass
class _Measurement:
    """What one evaluation measures forgetting with, and what it found so far, per non-base view."""

    cfg: PipelineConfig
    views: object
    tokenizer: object
    device: str
    stats_kw: dict
    base_info: BaseModelInfo | None
    part: Part | None = None
    """One side of the split evidence (a remedy's search or confirm part), or None for all of it."""
    cache: BlockCache | None = None
    """What `compare_on_blocks` reuses: the base's states, the units of models that do not change."""
    say: Callable[[str], None] | None = None
    """Where progress lines go (the base's probe answers, while they are generated)."""
    metrics: dict[str, dict] = field(default_factory=dict)
    intervals: dict[str, dict] = field(default_factory=dict)

    def __post_init__(self):
        self.others = [n for n in self.views.names if n != BASE]
        self.metrics = {n: {} for n in self.others}
        self.intervals = {n: {} for n in self.others}

    def keep(self, items: list, keys: list[str]) -> list:
        """The items on this measurement's side of the split (all of them without a part)."""
        return items if self.part is None else self.part.keep(items, keys)

    def add_comparison(self, units: dict, prefix: str) -> None:
        """`<prefix>_perplexity_*`, `<prefix>_kl` of every view, with intervals of the ratio and the KL."""
        for n in self.others:
            self.metrics[n].update(summarize_comparison(units, n, prefix))
            self.intervals[n][f"{prefix}_perplexity_ratio"] = stats.perplexity_ratio_ci(
                units["nll"][n], units["nll"][BASE], units["tokens"], **self.stats_kw).to_list()
            self.intervals[n][f"{prefix}_kl"] = stats.ratio_ci(units["kl"][n], units["tokens"], **self.stats_kw).to_list()


def _measure_corpus(m: _Measurement) -> None:
    """`evaluation.reference.path`: perplexity ratio and KL (causal LM), or retrieval (classifier).
    A causal LM's ratio and KL are staged like the probes' (`_staged_comparison`) over the
    corpus's blocks in file order, from `max_tokens` up to `corpus_token_budget` tokens."""
    cfg, ref = m.cfg, m.cfg.evaluation.reference
    bs, pad, seq = cfg.evaluation.batch_size, m.tokenizer.pad_token_id or 0, cfg.training.max_seq_length
    texts = read_reference_texts(ref.path)
    if cfg.task != "causal_lm":
        _measure_retrieval(m, texts)
        return
    blocks = chunk_reference(texts, m.tokenizer, ref.max_tokens, seq)

    def units_of(part: list[list[int]]) -> dict | None:
        kept = m.keep(part, [",".join(map(str, b)) for b in part])
        return compare_on_blocks(m.views, kept, bs, pad, m.device, cache=m.cache) if kept else None

    budget = corpus_token_budget(cfg)
    if budget > ref.max_tokens and (m.part is None or m.part.name == "confirm"):
        more = chunk_reference(texts, m.tokenizer, budget, seq)
        if len(more) > len(blocks):
            _staged_comparison(m, more, sequential.looks(len(blocks), len(more)), units_of, ["reference"])
            return
    if (units := units_of(blocks)) is None:
        raise DataError("the forgetting text gave no tokens to score; give it more text")
    m.add_comparison(units, "reference")


def _measure_retrieval(m: _Measurement, texts: list[str]) -> None:
    """A classifier's encoder on the reference corpus: the share of the base's retrieval hits
    (`retrieval_correct`) the adapted encoder loses, `1 - adapted / base`, paired per paragraph."""
    cfg, ref = m.cfg, m.cfg.evaluation.reference
    seq = min(cfg.training.max_seq_length, RETRIEVAL_PASSAGE_TOKENS)
    pairs = retrieval_pairs(texts, m.tokenizer, seq, ref.max_tokens)
    pairs = m.keep(pairs, [",".join(map(str, a)) for a, _ in pairs])
    if len(pairs) < 2:
        raise DataError(f"the reference corpus {ref.path} gave {len(pairs)} paragraph(s) long enough to score retrieval "
                        f"(a line needs about {seq * 3 // 2} tokens): give it more, or longer, lines, or raise "
                        f"evaluation.reference.max_tokens")
    correct = retrieval_by_view(m.views, pairs, m.tokenizer.pad_token_id or 0, cfg.evaluation.batch_size, m.device,
                                m.cache)
    base = correct[BASE]
    if not base.sum():
        raise DataError(f"the base model finds none of the {len(pairs)} reference paragraphs' continuations in {ref.path}, "
                        f"so there is no retrieval to lose: give the corpus paragraphs that keep to their topic (a line "
                        f"each), or set promotion.max_retrieval_loss: null")
    for n in m.others:
        lost = base - correct[n]
        m.metrics[n].update({"reference_retrieval_base": float(base.mean()), "reference_retrieval_adapted": float(correct[n].mean()),
                             "reference_retrieval_loss": float(lost.sum() / base.sum()),
                             "reference_retrieval_pairs": float(len(pairs))})
        m.intervals[n]["reference_retrieval_loss"] = stats.ratio_ci(lost, base, **m.stats_kw).to_list()


def corpus_token_budget(cfg: PipelineConfig) -> int:
    """Reference tokens a run may score: `max_tokens`, or with `promotion.more_evidence` and a
    limit on the corpus's ratio or KL, that multiple of it (a causal LM's staged comparison)."""
    ref, more = cfg.evaluation.reference, cfg.promotion.more_evidence
    if cfg.task != "causal_lm" or not more or not _bounded(cfg, ["reference"]):
        return ref.max_tokens
    return math.ceil(ref.max_tokens * more)


def _measure_probes(m: _Measurement) -> None:
    """`evaluation.reference.probes`: self-retention on the base model's own (cached) answers, in
    one look or, with `promotion.more_evidence` and a limit that reads them, in stages of more
    probes (`_staged_comparison`; not on a remedy's search part, which only chooses)."""
    cfg, bs = m.cfg, m.cfg.evaluation.batch_size
    info = m.base_info or describe_base_model(cfg.base_model.name_or_path, cfg.base_model.revision)
    prompts, prefixes = probe_prompts(), [PROBES]

    def units_of(asked: list[str]) -> dict | None:
        with m.views.use(BASE) as model:
            rows = base_answers(model, m.tokenizer, info.content_hash or f"{info.name_or_path}@{info.revision}",
                                batch_size=bs, prompts=asked, progress=m.say)
        rows = m.keep(rows, [r["prompt"] for r in rows])
        blocks, starts = probe_blocks(rows, m.tokenizer, max(cfg.training.max_seq_length, 256))
        if not blocks:
            return None
        return compare_on_blocks(m.views, blocks, bs, m.tokenizer.pad_token_id or 0, m.device, score_from=starts,
                                 cache=m.cache)

    stages = probe_stages(cfg)
    if len(stages) > 1 and (m.part is None or m.part.name == "confirm"):
        _staged_comparison(m, prompts, stages, units_of, prefixes)
        return
    units = units_of(prompts[: stages[0]])
    if units is None:
        raise DataError("the probes gave no tokens to score: the base answered none of them")
    for prefix in prefixes:
        m.add_comparison(units, prefix)


PROBES = "self_retention"
"""The probes' figures' prefix. Without a reference corpus they stand in for it: measured once, under
this name, and bounded by the corpus's limits too (`forgetting_table.ForgettingMetric.stands_in`)."""


def probe_stages(cfg: PipelineConfig) -> list[int]:
    """How many probes each look scores (`staged_sizes` from `max_probes`)."""
    bounded = bool(_bounded(cfg, [PROBES]))
    return staged_sizes(cfg, len(probe_prompts()), cfg.evaluation.reference.max_probes, bounded)


def staged_sizes(cfg: PipelineConfig, available: int, first: int | None, bounded: bool) -> list[int]:
    """How many of `available` units (questions, probes) each look scores: `first` (all without
    it) once, or, with `promotion.more_evidence` and a limit bounding the check, growing stages
    up to that multiple of it (`sequential.looks`)."""
    first = min(available, first or available)
    more = cfg.promotion.more_evidence if bounded else None
    return sequential.looks(first, min(available, math.ceil(first * more))) if more and first < available else [first]


def _bounded(cfg: PipelineConfig, prefixes: list[str]) -> dict[str, float]:
    """The comparison checks of `prefixes` that a limit bounds, with their limits."""
    names = [f"{p}_{k}" for p in prefixes for k in ("perplexity_ratio", "kl")]
    limits = forgetting_limits(cfg.promotion, names, corpus=bool(cfg.evaluation.reference.path))
    return {n: v for n, v in limits.items() if v is not None}


def _staged_comparison(m: _Measurement, items: list, stages: list[int], units_of, prefixes: list[str]) -> None:
    """Compare on the first `stages[k]` items, look by look (`sequential.look`), until each view's
    bounded checks have ended. A check keeps the point and interval of the look that ended it
    (a ratio's on the log scale, linearised as `sequential.ratio_values`); the rest of the view's
    figures are those of its last look, with `<prefix>_looks`."""
    bounded, confidence = _bounded(m.cfg, prefixes), m.cfg.promotion.confidence
    units, ends = None, {n: {} for n in m.others}
    running = list(m.others)
    for k, n in enumerate(stages):
        units = _joined(units, units_of(items[stages[k - 1] if k else 0 : n]))
        if units is None:
            continue
        for view in list(running):
            for name, limit in bounded.items():
                if name in ends[view]:
                    continue
                ratio = name.endswith("_perplexity_ratio")
                num = units["nll"][view] - units["nll"][BASE] if ratio else units["kl"][view]
                end = sequential.look(sequential.ratio_values(num, units["tokens"]), k, stages,
                                      math.log(limit) if ratio else limit, True, confidence)
                if end is not None:
                    ends[view][name] = (end, ratio)
            if len(ends[view]) == len(bounded) or k == len(stages) - 1:
                running.remove(view)
                _end_view(m, view, units, prefixes, ends[view], k + 1)
        if not running:
            return
    if units is None:
        raise DataError("the forgetting text gave no tokens to score; give it more text")


def _end_view(m: _Measurement, view: str, units: dict, prefixes: list[str], ends: dict, looks: int) -> None:
    for prefix in prefixes:
        m.metrics[view].update(summarize_comparison(units, view, prefix))
        m.metrics[view][f"{prefix}_looks"] = float(looks)
        if f"{prefix}_perplexity_ratio" not in ends:  # a staged check keeps the interval of its last look
            m.intervals[view][f"{prefix}_perplexity_ratio"] = stats.perplexity_ratio_ci(
                units["nll"][view], units["nll"][BASE], units["tokens"], **m.stats_kw).to_list()
        if f"{prefix}_kl" not in ends:
            m.intervals[view][f"{prefix}_kl"] = stats.ratio_ci(units["kl"][view], units["tokens"], **m.stats_kw).to_list()
    for name, (end, ratio) in ends.items():
        interval = [math.exp(min(x, 50.0)) for x in end.interval.to_list()] if ratio else end.interval.to_list()
        m.metrics[view][name], m.intervals[view][name] = interval[0], interval


def _joined(a: dict | None, b: dict | None) -> dict | None:
    """Two `compare_on_blocks` results as one, units of `b` after those of `a`."""
    if a is None or b is None:
        return a or b
    return {"tokens": np.concatenate([a["tokens"], b["tokens"]]),
            **{k: {n: np.concatenate([a[k][n], b[k][n]]) for n in a[k]} for k in ("nll", "kl")}}


def benchmark_stages(cfg: PipelineConfig, questions: int) -> list[int]:
    """How many of a benchmark's `questions` each look scores (`staged_sizes`)."""
    ref = cfg.evaluation.reference
    return staged_sizes(cfg, questions, ref.max_benchmark_questions, cfg.promotion.max_benchmark_accuracy_drop is not None)


def _measure_benchmarks(m: _Measurement) -> None:
    """`evaluation.reference.benchmarks`: accuracy drop base minus adapted, per file, in one look
    (a bootstrap interval) or, with `promotion.more_evidence`, in stages (`_staged_benchmark`)."""
    cfg, ref = m.cfg, m.cfg.evaluation.reference
    score = lambda qs: mc_correct(m.views, qs, m.tokenizer, cfg.evaluation.batch_size, cfg.training.max_seq_length, m.device)
    for path in ref.benchmarks:
        questions = read_mc_benchmark(path)
        stages = benchmark_stages(cfg, len(questions))
        if m.part is not None:  # a remedy's split evidence: one look at the configured size
            stages = stages[:1]
        key = f"benchmark_{safe_name(path)}"
        if len(stages) > 1:
            _staged_benchmark(m, key, questions, stages, score)
            continue
        questions = m.keep(questions[: stages[0]], [q.question for q in questions[: stages[0]]])
        correct = score(questions)
        for n in m.others:
            _benchmark_metrics(m, key, n, correct[BASE], correct[n])
            m.intervals[n][f"{key}_accuracy_drop"] = stats.paired_diff_ci(correct[BASE], correct[n], **m.stats_kw).to_list()


def _benchmark_metrics(m: _Measurement, key: str, view: str, base: np.ndarray, adapted: np.ndarray) -> None:
    m.metrics[view].update({f"{key}_accuracy_base": float(base.mean()), f"{key}_accuracy_adapted": float(adapted.mean()),
                            f"{key}_accuracy_drop": float(base.mean() - adapted.mean()), f"{key}_questions": float(len(base))})


def _staged_benchmark(m: _Measurement, key: str, questions: list[MCQuestion], stages: list[int], score) -> None:
    """Score `questions` stage by stage until every view's accuracy-drop check has ended
    (`sequential.look`); each view keeps the figures and interval of the look that ended it."""
    limit, confidence = m.cfg.promotion.max_benchmark_accuracy_drop, m.cfg.promotion.confidence
    correct: dict[str, np.ndarray] = {n: np.empty(0) for n in m.views.names}
    running = list(m.others)
    for k, n in enumerate(stages):
        new = score(questions[len(correct[BASE]) : n])
        correct = {v: np.concatenate([correct[v], new[v]]) for v in correct}
        for view in list(running):
            drop = correct[BASE] - correct[view]
            end = sequential.look(drop, k, stages, limit, True, confidence)
            if end is None:
                continue
            running.remove(view)
            _benchmark_metrics(m, key, view, correct[BASE], correct[view])
            m.metrics[view][f"{key}_looks"] = float(end.looks)
            m.intervals[view][f"{key}_accuracy_drop"] = end.interval.to_list()
        if not running:
            return


def safe_name(path: str) -> str:
    """A benchmark file's stem as a metric name's part: lowercase letters, digits and underscores."""
    return "".join(c if c.isalnum() else "_" for c in Path(path).stem.lower()).strip("_") or "mc"


SOURCE_NAMES = {"corpus": "the reference corpus", "probes": "the probes", "benchmark": "the benchmarks"}


def _measured_line(m: _Measurement, source: str, before: dict[str, set], seconds: float) -> str:
    """`forgetting on the probes (12 s): adapted self_retention_perplexity_ratio 0.889 [0.876, 0.906]`:
    the bounded figures `source` added to each view, rounded, with their intervals."""
    said = []
    for view in m.others:
        for name in sorted(set(m.metrics[view]) - before[view]):
            if forgetting_metric(name):
                low, high = (m.intervals[view].get(name) or [None] * 3)[1:]
                said.append(f"{view} {name} {stats.figure(m.metrics[view][name], low, high)}")
    return f"forgetting on {SOURCE_NAMES[source]} ({seconds:.0f} s)" + (f": {', '.join(said)}" if said else "")


SOURCES = {
    "corpus": (lambda ref: bool(ref.path), _measure_corpus),
    "probes": (lambda ref: bool(ref.probes), _measure_probes),
    "benchmark": (lambda ref: bool(ref.benchmarks), _measure_benchmarks),
}
"""The `source` column of `forgetting_table.FORGETTING_METRICS`: whether the reference section turns the
source on, and what measures it. Probes and benchmarks score causal LMs only (a config check)."""


def measure_forgetting(cfg: PipelineConfig, views, tokenizer, device, base_info: BaseModelInfo | None,
                       stats_kw: dict, part: Part | None = None, cache: BlockCache | None = None,
                       sources: tuple[str, ...] = tuple(SOURCES), progress: Callable[[str], None] | None = None
                       ) -> tuple[dict, dict]:
    """Forgetting of every non-base view against the base on each of `sources` that
    `evaluation.reference` turns on, on `part` of its evidence (all without one), reusing what
    `cache` holds: ({view: {metric: value}}, {view: {metric: [point, low, high]}}). With
    `progress`, a line per source with its figures (`_measured_line`)."""
    m = _Measurement(cfg, views, tokenizer, device, stats_kw, base_info, part, cache, progress)
    ref = cfg.evaluation.reference
    for source, (enabled, measure) in SOURCES.items():
        if source in sources and ref is not None and enabled(ref):
            before, started = {n: set(m.metrics[n]) for n in m.others}, time.perf_counter()
            measure(m)
            if progress:
                progress(_measured_line(m, source, before, time.perf_counter() - started))
    return m.metrics, m.intervals
