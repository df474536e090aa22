"""Text to tokens and back, shared by training, evaluation, probes, comparison and serving.

Prompt formatting (chat template or plain), encoding rows into ids and labels, collation
(left-padded with explicit positions, or packed), the token losses computed only where there
are targets, and batched greedy generation. Plain arguments only: no config stand-ins.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from ..config import PipelineConfig

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
PROGRESS_EVERY_S = 30.0
"""Long loops (training steps, generated answers) say where they are at least this often."""
REPLAY_KEY = "_replay"
"""Marks a replay row (`lora_tasks/training/replay.py`): `chat`, a prompt/answer pair formatted without the
task's system prompt (as the base answered it), or `text`, a passage trained as plain text."""


def format_prompts(prompts: list[str], tokenizer, chat_template: bool = False,
                   system_prompt: str | None = None) -> tuple[list[str], bool]:
    """Prompts as the model sees them, and whether the tokenizer should add special tokens.

    With `chat_template` each prompt becomes a user turn (after `system_prompt`, when set)
    followed by the assistant header, and the template already holds the special tokens."""
    if not chat_template:
        return prompts, True
    if not getattr(tokenizer, "chat_template", None):
        raise ValueError("data.chat_template is set but the tokenizer has no chat template")
    system = [{"role": "system", "content": system_prompt}] if system_prompt else []
    texts = [
        tokenizer.apply_chat_template(system + [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
        for p in prompts
    ]
    return texts, False


def encode_examples(rows: list[dict], tokenizer, cfg: PipelineConfig) -> list[dict]:
    """Turn validated rows into token ids and labels for the task."""
    d, max_len = cfg.data, cfg.training.max_seq_length
    if cfg.task == "sequence_classification":
        index = {str(label): i for i, label in enumerate(d.labels)}
        enc = tokenizer([r[d.text_column] for r in rows], truncation=True, max_length=max_len)
        return [
            {"input_ids": ids, "labels": index[str(r[d.label_column])]}
            for ids, r in zip(enc["input_ids"], rows)
        ]
    if not any(REPLAY_KEY in r for r in rows):
        return _encode_kind(rows, None, tokenizer, cfg)
    out: list[dict] = [{}] * len(rows)
    for kind in (None, "chat", "text"):  # task rows, then replay of each kind, back in the rows' order
        idx = [i for i, r in enumerate(rows) if r.get(REPLAY_KEY) == kind]
        if not idx:  # a tokenizer given no text at all raises
            continue
        for i, x in zip(idx, _encode_kind([rows[i] for i in idx], kind, tokenizer, cfg)):
            out[i] = x if kind is None else {**x, "replay": True}
    return out


def _encode_kind(rows: list[dict], kind: str | None, tokenizer, cfg: PipelineConfig) -> list[dict]:
    """Causal LM rows of one kind: task rows (None), replayed chat pairs, or replayed plain text."""
    d, max_len, eos = cfg.data, cfg.training.max_seq_length, tokenizer.eos_token_id
    if d.prompt_column and kind != "text":
        system = d.system_prompt if kind is None else None
        texts, special = format_prompts([r[d.prompt_column] for r in rows], tokenizer, d.chat_template, system)
        prompts = tokenizer(texts, add_special_tokens=special)["input_ids"]
        answers = tokenizer([r[d.completion_column] for r in rows], add_special_tokens=False)["input_ids"]
        out = []
        for p, a in zip(prompts, answers):
            a = (a + [eos])[:max_len - 1] if eos is not None else a[:max_len - 1]
            p = p[-(max_len - len(a)):]  # keep the end of a long prompt, next to the answer
            out.append({"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a})
        return out
    column = d.text_column if kind is None else (d.completion_column or d.text_column)
    texts = tokenizer([r[column] for r in rows], add_special_tokens=True)["input_ids"]
    return [{"input_ids": (t + [eos])[:max_len], "labels": (t + [eos])[:max_len]} for t in texts]


def collate(batch: list[dict], pad_id: int, task: str) -> dict[str, torch.Tensor]:
    """Pad a batch; padded positions carry no loss.

    Causal LM batches are left-padded with explicit position ids, so every row's target tokens
    sit at the end and logits are computed only there (see `causal_lm_loss`). Classification
    batches are right-padded, where the classifier reads the last real token."""
    width = max(len(x["input_ids"]) for x in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    if task == "sequence_classification":
        for i, x in enumerate(batch):
            ids[i, : len(x["input_ids"])] = torch.tensor(x["input_ids"])
            mask[i, : len(x["input_ids"])] = 1
        labels = torch.tensor([x["labels"] for x in batch], dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for i, x in enumerate(batch):
        n = len(x["input_ids"])
        ids[i, width - n :] = torch.tensor(x["input_ids"])
        mask[i, width - n :] = 1
        labels[i, width - n :] = torch.tensor(x["labels"])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    out = {"input_ids": ids, "attention_mask": mask, "position_ids": position_ids, "labels": labels}
    return _flag_replay(out, [[x] for x in batch])


def _flag_replay(out: dict[str, torch.Tensor], rows: list[list[dict]]) -> dict[str, torch.Tensor]:
    """Add `replay`, which rows hold replayed examples (see `causal_lm_loss`), when any does."""
    if any(x.get("replay") for row in rows for x in row):
        out["replay"] = torch.tensor([bool(row) and all(x.get("replay") for x in row) for row in rows])
    return out


def pack(batch: list[dict], pad_id: int) -> dict[str, torch.Tensor]:
    """Pack causal LM examples into as few rows as fit the longest of them (first fit,
    longest first), instead of padding each to it.

    Position ids restart at 0 for every example: with no `attention_mask`, transformers reads
    the restarts as packed sequences and masks attention block-diagonally, so an example sees
    only itself. Each example's first token carries no label (the previous example's last token
    must not predict it). The tail of the last rows is padding, a segment of its own with no
    labels. Rows and examples are in a fixed order for a given batch (exact resume). Replayed
    examples get rows of their own (flagged `replay`), so a row is all task or all replay."""
    width = max(len(x["input_ids"]) for x in batch)
    rows = _first_fit([x for x in batch if not x.get("replay")], width) + _first_fit([x for x in batch if x.get("replay")], width)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    labels = torch.full((len(rows), width), IGNORE_INDEX, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        at = 0
        for x in row:
            n = len(x["input_ids"])
            ids[i, at : at + n] = torch.tensor(x["input_ids"])
            labels[i, at + 1 : at + n] = torch.tensor(x["labels"][1:])
            position_ids[i, at : at + n] = torch.arange(n)
            at += n
        position_ids[i, at:] = torch.arange(width - at)  # padding: its own segment
    return _flag_replay({"input_ids": ids, "position_ids": position_ids, "labels": labels}, rows)


def _first_fit(examples: list[dict], width: int) -> list[list[dict]]:
    """Examples into rows of `width` tokens: longest first, each into the first row with room."""
    rows: list[list[dict]] = []
    room: list[int] = []
    for x in sorted(examples, key=lambda x: -len(x["input_ids"])):  # stable: ties keep batch order
        n = len(x["input_ids"])
        i = next((j for j, r in enumerate(room) if r >= n), None)
        if i is None:
            rows.append([])
            room.append(width)
            i = len(rows) - 1
        rows[i].append(x)
        room[i] -= n
    return rows


def causal_lm_loss(model, batch: dict[str, torch.Tensor], base=None, kl_weight: float = 0.0
                   ) -> tuple[torch.Tensor, int]:
    """(sum of token losses, number of target tokens) of a left-padded or packed batch.

    With `base` (the same model with its adapter disabled, called without gradients) and a
    `kl_weight`, the target tokens of the rows flagged `replay` (see `collate`, `pack`) also pay
    `kl_weight x KL(base || model)` of the next-token distributions: replay then pulls towards
    the base's whole distribution, not only its greedy token."""
    keep = _target_positions(batch["labels"], packed="attention_mask" not in batch)
    logits, targets = _logits_at(model, batch, keep)
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="sum")
    rows = batch.get("replay")
    if base is not None and kl_weight and rows is not None and rows.any():
        with torch.no_grad():
            base_logits, _ = _logits_at(base, {k: v[rows] for k, v in batch.items()}, keep)
        mask = targets[rows] != IGNORE_INDEX
        kl = kl_per_position(F.log_softmax(base_logits.float(), -1), F.log_softmax(logits[rows].float(), -1))
        loss = loss + kl_weight * kl[mask].sum()
    return loss, int((targets != IGNORE_INDEX).sum())


def kl_per_position(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p || q) = sum_v p(v) (log p(v) - log q(v)) at each position, from log-probabilities
    (p the base model's distribution)."""
    return (logp.exp() * (logp - logq)).sum(-1)


def _target_positions(labels: torch.Tensor, packed: bool) -> torch.Tensor | int:
    """Which logits a batch's loss needs. Left-padded: the number of last positions (targets all
    sit at the end; the first token has no position before it). Packed: the positions, anywhere
    in the row, that predict a target token (position p predicts p + 1)."""
    if packed:
        keep = (labels[:, 1:] != IGNORE_INDEX).any(0).nonzero().squeeze(1)
        return keep if keep.numel() else torch.tensor([0], device=labels.device)
    has_label = (labels != IGNORE_INDEX).any(0)
    first = max(int(has_label.nonzero()[0]), 1) if has_label.any() else labels.shape[1] - 1
    return labels.shape[1] - first + 1  # the position before the first target predicts it


def _logits_at(model, batch: dict[str, torch.Tensor], keep: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(logits, targets), aligned position for position, at the positions `keep` names. The
    vocabulary projection (and its softmax) runs only there, not over every prompt token."""
    labels = batch["labels"]
    if isinstance(keep, int):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                       position_ids=batch["position_ids"], logits_to_keep=keep).logits
        return logits[:, :-1], labels[:, labels.shape[1] - keep + 1 :]
    # use_cache=False matters: with a cache transformers does not look for packed sequences
    # and examples would attend to the ones before them in their row.
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"],
                   logits_to_keep=keep.to(labels.device), use_cache=False).logits
    return logits, labels[:, keep + 1]


def causal_lm_row_losses(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of a left-padded batch: (sum of its token losses, its number of target tokens, how
    many of its first target tokens are the model's own greedy choice given the targets before)."""
    logits, targets = _logits_at(model, batch, _target_positions(batch["labels"], packed=False))
    loss = F.cross_entropy(logits.float().transpose(1, 2), targets, ignore_index=IGNORE_INDEX, reduction="none")
    scored = targets != IGNORE_INDEX  # left padding: a row's targets are its last positions
    agreed = ((logits.argmax(-1) == targets) | ~scored).int().cumprod(1).bool() & scored
    return loss.sum(1), scored.sum(1), agreed.sum(1)


def greedy_answers_read_off(examples: list[dict], agreed: list[int], prompts: list[str], tokenizer, max_new_tokens: int,
                            *, chat_template: bool = False, system_prompt: str | None = None) -> dict[int, str]:
    """The greedy answers a loss pass has already shown, by row. Where the model's own next-token
    choice is every target token in turn (the reference answer, then its end token), greedy
    decoding from the prompt writes exactly that answer, so it need not be generated; likewise
    when the first `max_new_tokens` targets agree (decoding stops there). A row qualifies only
    when the loss pass saw the prompt generation sees (`prompts`, formatted as `generate_answers`
    formats them), not one cut to fit max_seq_length. The answers are `generate_answers`' up to
    the rounding that already tells two batchings of it apart (a near-tie of two tokens)."""
    eos, out = tokenizer.eos_token_id, {}
    lengths = _formatted(prompts, tokenizer, chat_template, system_prompt)[2]
    for i, (ex, n, prompt) in enumerate(zip(examples, agreed, lengths)):
        target = [t for t in ex["labels"] if t != IGNORE_INDEX]
        need = min(len(target), max_new_tokens)
        ends = bool(target) and target[-1] == eos
        if len(ex["input_ids"]) - len(target) == prompt and n >= need and (ends or len(target) >= max_new_tokens):
            out[i] = tokenizer.decode(target[:need], skip_special_tokens=True)
    return out


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int, device="cpu", *,
                     chat_template: bool = False, system_prompt: str | None = None, label: str | None = None,
                     batch_tokens: int | None = None, progress: Callable[[str], None] | None = None) -> list[str]:
    """Greedy answers to `prompts` (formatted by `format_prompts`), in their order. Batches hold
    prompts of similar length (sorted by tokens: little padding), left-padded so every row
    continues from its last token; a batch stops as soon as every row has ended. A batch holds
    `batch_size` prompts or, with `batch_tokens`, as many as fit that many tokens (prompt and new
    tokens, at the batch's longest prompt): a decoding step reads every weight once for the whole
    batch, so fewer, fuller batches cost less. With `label`, a progress line (`label: 48/120
    answers, 25 s`) goes to `progress` (default: this module's logger) every `PROGRESS_EVERY_S` seconds."""
    started = last = time.perf_counter()
    texts, special, lengths = _formatted(prompts, tokenizer, chat_template, system_prompt)
    order = sorted(range(len(texts)), key=lambda i: lengths[i])
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers: list[str] = [""] * len(texts)
    done = 0
    try:
        for rows in _generation_batches(order, lengths, max_new_tokens, batch_size, batch_tokens):
            enc = tokenizer([texts[j] for j in rows], return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            for j, text in zip(rows, tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
                answers[j] = text
            done, now = done + len(rows), time.perf_counter()
            if label and now - last >= PROGRESS_EVERY_S and done < len(order):
                line = f"{label}: {done}/{len(order)} answers, {now - started:.0f} s"
                if progress:
                    progress(line)
                else:
                    log.info("%s", line)
                last = now
    finally:
        tokenizer.padding_side = side
    return answers


def _formatted(prompts: list[str], tokenizer, chat_template: bool, system_prompt: str | None
               ) -> tuple[list[str], bool, list[int]]:
    """`format_prompts`'s (texts, special) and each text's length in tokens."""
    texts, special = format_prompts(prompts, tokenizer, chat_template, system_prompt)
    return texts, special, [len(ids) for ids in tokenizer(texts, add_special_tokens=special)["input_ids"]]


def _generation_batches(order: list[int], lengths: list[int], max_new_tokens: int, batch_size: int,
                        batch_tokens: int | None) -> Iterator[list[int]]:
    """`order` (prompts by length, shortest first) cut into batches of `batch_size` prompts, or
    of as many as fit `batch_tokens` at the batch's longest prompt (at least one)."""
    if batch_tokens is None:
        yield from (order[i : i + batch_size] for i in range(0, len(order), batch_size))
        return
    batch: list[int] = []
    for i in order:  # ascending length: the newest prompt is the batch's longest
        if batch and (len(batch) + 1) * (lengths[i] + max_new_tokens) > batch_tokens:
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch
