"""How much the adapter changed what the base model knew, measured on a general reference corpus.

Base and adapted outputs come from the same PeftModel (adapter on, then `disable_adapter()`),
so only one copy of the base weights is ever in memory.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .errors import DataError


def token_kl(base_logits: torch.Tensor, adapted_logits: torch.Tensor, mask: torch.Tensor) -> tuple[float, int]:
    """Sum over masked positions of KL(base || adapted) of the next-token distributions, and the count.

    KL(p || q) = sum_v p(v) (log p(v) - log q(v)), with p the base model's distribution."""
    logp = F.log_softmax(base_logits.float(), dim=-1)
    logq = F.log_softmax(adapted_logits.float(), dim=-1)
    kl = (logp.exp() * (logp - logq)).sum(-1)
    m = mask.bool()
    return float(kl[m].sum()), int(m.sum())


def read_reference_texts(path: str | Path) -> list[str]:
    """Non-blank lines of a plain-text corpus, stripped (WikiText's blank lines are skipped)."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"reference corpus {p} does not exist; set evaluation.reference.path to a text file")
    try:
        lines = p.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError as exc:
        raise DataError(f"reference corpus {p} is not UTF-8 text (byte {exc.start}); re-encode it as UTF-8") from None
    texts = [line.strip() for line in lines if line.strip()]
    if not texts:
        raise DataError(f"reference corpus {p} has no non-blank line")
    return texts


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


@torch.no_grad()
def causal_lm_forgetting(
    peft_model, tokenizer, blocks: list[list[int]], batch_size: int, device="cpu", score_from: list[int] | None = None
) -> dict:
    """Reference perplexity of base and adapted, their ratio, and mean per-token KL(base || adapted).

    `score_from[i]` (optional) is the first token of block i that is scored, e.g. where an
    answer starts after its prompt."""
    return causal_lm_forgetting_scores(peft_model, tokenizer, blocks, batch_size, device, score_from)[0]


@torch.no_grad()
def causal_lm_forgetting_scores(
    peft_model, tokenizer, blocks: list[list[int]], batch_size: int, device="cpu", score_from: list[int] | None = None
) -> tuple[dict, dict]:
    """(`causal_lm_forgetting`'s metrics, per-block units: NLL sums of base and adapted, KL sums, tokens)."""
    peft_model.eval()
    units = {"nll_base": [], "nll_adapted": [], "kl": [], "tokens": []}
    for ids, mask, scored in _batches(blocks, batch_size, tokenizer.pad_token_id or 0, score_from):
        ids, mask, scored = ids.to(device), mask.to(device), scored.to(device)
        adapted = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids, attention_mask=mask).logits[:, :-1]
        target, tmask = ids[:, 1:], scored[:, 1:] * mask[:, :-1]
        for name, logits in (("nll_base", base), ("nll_adapted", adapted)):
            ce = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none")
            units[name] += (ce * tmask).sum(1).tolist()
        units["kl"] += [token_kl(base[j : j + 1], adapted[j : j + 1], tmask[j : j + 1])[0] for j in range(len(ids))]
        units["tokens"] += tmask.sum(1).tolist()
    n_tokens = sum(units["tokens"])
    if n_tokens == 0:
        raise DataError("reference corpus gave no tokens to score; give it more text")
    base_ppl = math.exp(sum(units["nll_base"]) / n_tokens)
    adapted_ppl = math.exp(sum(units["nll_adapted"]) / n_tokens)
    metrics = {
        "reference_perplexity_base": base_ppl,
        "reference_perplexity_adapted": adapted_ppl,
        "reference_perplexity_ratio": adapted_ppl / base_ppl,
        "reference_kl": sum(units["kl"]) / n_tokens,
        "reference_tokens": n_tokens,
    }
    return metrics, {k: np.array(v, dtype=float) for k, v in units.items()}


@torch.no_grad()
def representation_drift(peft_model, tokenizer, blocks: list[list[int]], batch_size: int, device="cpu") -> dict:
    """Mean cosine distance between base and adapted final hidden states on the reference text.

    For encoders and classifiers, which have no next-token distribution to compare."""
    return representation_drift_scores(peft_model, tokenizer, blocks, batch_size, device)[0]


@torch.no_grad()
def representation_drift_scores(peft_model, tokenizer, blocks: list[list[int]], batch_size: int, device="cpu") -> tuple[dict, dict]:
    """(`representation_drift`'s metrics, per-block units: summed cosine distance, tokens)."""
    peft_model.eval()
    drift, tokens = [], []
    for ids, mask, _ in _batches(blocks, batch_size, tokenizer.pad_token_id or 0):
        ids, mask = ids.to(device), mask.to(device)
        adapted = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        with peft_model.disable_adapter():
            base = peft_model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1]
        dist = 1.0 - F.cosine_similarity(base.float(), adapted.float(), dim=-1)
        drift += (dist * mask).sum(1).tolist()
        tokens += mask.sum(1).tolist()
    count = sum(tokens)
    if count == 0:
        raise DataError("reference corpus gave no tokens to score; give it more text")
    metrics = {"reference_representation_drift": sum(drift) / count, "reference_tokens": count}
    return metrics, {"drift": np.array(drift, dtype=float), "tokens": np.array(tokens, dtype=float)}
