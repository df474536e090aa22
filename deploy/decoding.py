"""Text generation for a serving replica: prompts as the model reads them, one `generate` per
batch, and continuous batching.

`RunningBatch` is a decoding loop that transformers' `generate` cannot be: rows join it between
two passes and leave it as soon as they end, so a request is answered when its rows are done, not
when the batch is (`decode_continuously` runs it for a replica). transformers' own continuous
batching (`generate_batch`, `init_continuous_batching`, 5.25) runs on a CPU and with a PEFT model,
but takes no adapter per request (`adapter_names` is dropped: every row ran the active adapter)
and spent 51 s on 3 prompts of 8 tokens of the tiny test model here: rows of different adapters
in one batch are what a replica needs. No Serve, no HTTP: `deploy/serve.py`'s replicas run it.
"""

from __future__ import annotations

import contextlib
import itertools
import threading
from dataclasses import dataclass, field

import torch
from prefect_lora.lora_tasks.training.encoding import format_prompts


def prompt_texts(tokenizer, mcfg: dict, payload: dict) -> tuple[list[str], bool, list[list[int]]]:
    """A request's prompts as the model reads them (a chat through its template, completions
    formatted as in training; `payload["op"]` says which), whether the tokenizer should add
    special tokens, and their token ids."""
    texts, special = _chat_text(tokenizer, mcfg, payload["messages"]) if payload["op"] == "chat" else \
        format_prompts(payload["prompts"], tokenizer, bool(mcfg.get("chat_template")), mcfg.get("system_prompt"))
    return texts, special, tokenizer(texts, add_special_tokens=special)["input_ids"]


def _chat_text(tokenizer, mcfg: dict, messages: list[dict]) -> tuple[list[str], bool]:
    if getattr(tokenizer, "chat_template", None):
        if mcfg.get("system_prompt") and messages[0]["role"] != "system":
            messages = [{"role": "system", "content": mcfg["system_prompt"]}] + messages
        return [tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)], False
    # No chat template: the model was trained on bare prompts, so the last user turn is the prompt.
    return [next(m["content"] for m in reversed(messages) if m["role"] == "user")], True


def _answers(tokenizer, rows: list[list[int]], max_tokens: list[int], prompt_tokens: list[int]) -> dict:
    """A generation's per-row result: each row's text up to its end token and its first
    `max_tokens`, why it ended (`stop`: the end token; `length`), its tokens in and out."""
    eos = tokenizer.eos_token_id
    result = {"texts": [], "finish": [], "prompt_tokens": list(prompt_tokens), "completion_tokens": []}
    for row, most in zip(rows, max_tokens):
        row = row[:most]
        n = row.index(eos) if eos in row else len(row)
        result["completion_tokens"].append(n)
        result["finish"].append("stop" if n < most else "length")
        result["texts"].append(tokenizer.decode(row[:n], skip_special_tokens=True))
    return result


def generate_rows(model, tokenizer, texts: list[str], special: bool, max_tokens: list[int], temperature: float,
                  device, **extra) -> dict:
    """One `generate` over rows that may ask for different numbers of new tokens: it runs to the
    largest (or until every row has ended) and each row keeps its own first tokens."""
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    try:
        enc = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=special).to(device)
        sample = {"do_sample": True, "temperature": temperature, "top_k": 0} if temperature > 0 else \
            {"do_sample": False}
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max(max_tokens), pad_token_id=tokenizer.pad_token_id,
                                 eos_token_id=tokenizer.eos_token_id, **sample, **extra)
    finally:
        tokenizer.padding_side = side
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    return _answers(tokenizer, new, max_tokens, enc["attention_mask"].sum(-1).tolist())


ROWS_ATTENTION = "prefect_lora_rows"
"""The attention of a model that batches continuously (`use_rows_attention`): sdpa's, by row in a
packed pass."""


def use_rows_attention(model) -> bool:
    """Let `model` run packed passes (`RunningBatch`): its attention becomes `ROWS_ATTENTION`,
    which is sdpa's (its masks too) except in a packed pass, where it attends by row. Only a
    model on sdpa whose every layer's cache is a plain growing one (no sliding window, no linear
    attention); False, and the model unchanged, for any other."""
    from transformers import AttentionInterface, DynamicCache
    from transformers.cache_utils import DynamicLayer
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    config = getattr(model, "config", None)
    if getattr(config, "_attn_implementation", None) not in ("sdpa", ROWS_ATTENTION):
        return False
    try:
        plain = all(type(layer) is DynamicLayer for layer in DynamicCache(config=config).layers)
    except Exception:  # noqa: BLE001  (a config transformers cannot read a cache from: not ours to run)
        return False
    if plain:
        AttentionInterface.register(ROWS_ATTENTION, _rows_attention)
        AttentionMaskInterface.register(ROWS_ATTENTION, sdpa_mask)
        config._attn_implementation = ROWS_ATTENTION
    return plain


@dataclass
class _PassRows:
    """How a packed pass's tokens attend (`_rows_attention`): the first tokens are those of the
    `reading` rows that have cached tokens (each its last token, then its draft, if any), read as
    one padded batch: row i's queries are the pass's tokens `queries[i]`, its keys `keys[i]`
    (positions in the cache and this pass), `mask` true where a query sees a key (its cached
    tokens, and its own in this pass causally), `real` the queries that are not padding (None:
    all are); then the prompts of rows that joined, each `(start, end)` of the pass, attending to
    the cached prefix it shares (`RunningBatch.admit`), if any, and causally to itself."""

    reading: int
    queries: torch.Tensor  # [rows, most read]
    keys: torch.Tensor  # [rows, longest]
    mask: torch.Tensor  # [rows, 1, most read, longest]
    real: torch.Tensor | None  # [tokens read], indices into the flattened [rows * most read]
    prompts: list[tuple[int, int, torch.Tensor | None]]  # (start, end, cached prefix slots)
    past: int  # cached tokens before the pass


def _rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, packed_rows=None, **kwargs):
    """sdpa's attention; in a packed pass (`packed_rows`), each row attends to its own tokens
    only: the running rows as one padded batch, each joining row's prompt causally."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    if packed_rows is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                      **kwargs)
    rows, outs = packed_rows, []
    if rows.reading:
        q = query[0][:, rows.queries].transpose(0, 1)  # [rows, heads, most read, dim]
        k, v = (x[0][:, rows.keys].transpose(0, 1) for x in (key, value))  # [rows, kv heads, longest, dim]
        out, _ = sdpa_attention_forward(module, q, k, v, rows.mask, scaling=scaling, is_causal=False)
        out = out.flatten(0, 1)  # [rows * most read, heads, dim]
        outs.append((out if rows.real is None else out[rows.real])[None])
    for start, end, prefix in rows.prompts:
        own = slice(rows.past + start, rows.past + end)
        k, v = key[:, :, own], value[:, :, own]
        if prefix is None:
            out, _ = sdpa_attention_forward(module, query[:, :, start:end], k, v, None, scaling=scaling, is_causal=True)
        else:  # the shared prefix's keys, all seen, then its own, causally
            k, v = torch.cat([key[:, :, prefix], k], dim=2), torch.cat([value[:, :, prefix], v], dim=2)
            n = end - start
            mask = torch.ones(n, len(prefix) + n, dtype=torch.bool, device=query.device).tril(len(prefix))
            out, _ = sdpa_attention_forward(module, query[:, :, start:end], k, v, mask[None, None], scaling=scaling,
                                            is_causal=False)
        outs.append(out)
    return torch.cat(outs, dim=1), None


MIN_SHARED = 8
"""The fewest leading prompt tokens a row reads from the cache instead of computing them."""
MAX_PROMPTS = 64
"""Cached prompts a batch remembers for sharing (the newest)."""
NGRAM = 3
"""A draft follows an earlier occurrence of a row's last `NGRAM` tokens (`RunningBatch` with `draft_tokens`)."""
MAX_NGRAMS = 200_000
"""N-grams a batch remembers for drafts; past that it starts afresh."""


def _leading(flags) -> int:
    """How many of the first `flags` are true in a row."""
    return sum(1 for _ in itertools.takewhile(bool, flags))


@dataclass
class Row:
    """One prompt in a running batch: who asked (`owner`, with its index among the request's
    rows), its sampling, the tokens it has so far, those its next pass reads (`pending`: its
    prompt, then its last token) and where its tokens sit in the batch's cache (`slots`)."""

    owner: object
    index: int
    max_tokens: int
    temperature: float
    pending: list[int]
    tokens: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    weights: object = None
    """What its tokens run through (a version): rows of the same weights share cached prompt
    tokens; None shares none."""
    shared: int = 0
    """Leading prompt tokens it reads from another row's cache instead of its own pass."""
    prompt: list[int] = field(default_factory=list)
    """Its whole prompt (set by `RunningBatch.admit`)."""
    sequence: list[int] = field(default_factory=list)
    """Its prompt and tokens so far, as drafts read them."""
    drafted: int = 0
    """Tokens of `pending`, after its last one, that are a draft the next pass checks."""

    def ended(self, eos: int | None) -> bool:
        return len(self.tokens) >= self.max_tokens or (eos is not None and self.tokens[-1:] == [eos])


class RunningBatch:
    """Rows decoding together, packed: one forward pass reads every row's pending tokens side by
    side in one sequence (the rows that run: their last token; a row that joined: its whole
    prompt), so a join costs its prompt's tokens, not a pass of its own (on a CPU a pass costs
    mostly reading the weights, once for all its tokens). The KV cache is one sequence too; each
    row attends to its own tokens only (`_rows_attention`: the model must `use_rows_attention`),
    at its own positions. `admit` adds rows, `step` runs a pass, `drop_ended` takes out the rows
    that ended. Greedy rows (temperature 0) take the most likely token; others sample at their
    own temperature from the whole distribution (as `generate` with `top_k=0`).

    With `draft_tokens`, a greedy row also reads, after its last token, up to that many tokens
    that followed the first earlier occurrence of its last `NGRAM` tokens, in its own prompt and
    answer or in another row's of the same weights (prompt lookup, as transformers'
    `prompt_lookup_num_tokens` and vLLM's n-gram drafts; across rows as SuffixDecoding): the pass
    checks them as a prompt's tokens are read, and the row keeps those the model would have
    chosen one by one, and the token after them. A draft costs its tokens' compute, never a pass,
    and an answer stays the one the row gets without drafts."""

    def __init__(self, eos_id: int | None, device, draft_tokens: int = 0):
        self.eos, self.device, self.draft_tokens = eos_id, device, draft_tokens
        self._ngrams: dict[tuple, tuple[list[int], int]] = {}  # (weights, n-gram) -> (sequence, where its follower is)
        self.drafts = (0, 0)  # the last pass's draft tokens read, and kept
        self.rows: list[Row] = []
        self.cache = self._cache_arg = None  # made by the first pass, for its model
        self.cached = 0  # tokens in the cache, those of rows gone included
        self._dead = 0  # cached tokens of rows gone: dropped from the cache when they are half of it
        self.prompts: list[tuple[object, list[int], list[int]]] = []
        """(weights, prompt, its slots) of the prompts in the cache, newest last (`admit` reads them)."""

    def __len__(self) -> int:
        return len(self.rows)

    def admit(self, rows: list[Row]) -> None:
        """Add rows (their `pending` tokens: the prompt); their first token comes with the next `step`.
        Rows that joined come last: the rows that run are always the first ones. A row whose
        prompt begins as a cached one of the same weights does (a system prompt, a chat
        template's head: at least `MIN_SHARED` tokens) reads that prefix from the cache: its
        pass computes only the rest (the prefix's keys and values are the same, computed at the
        same positions through the same weights)."""
        for row in rows:
            row.prompt, row.sequence = list(row.pending), list(row.pending)
            self._remember(row, 0)
            if row.weights is not None:
                same = [(_leading(x == y for x, y in zip(prompt, row.pending)), slots)
                        for weights, prompt, slots in self.prompts if weights == row.weights]
                n, slots = max(same, key=lambda x: x[0], default=(0, []))
                n = min(n, len(row.pending) - 1)  # its last prompt token is read: it gives the first logits
                if n >= MIN_SHARED:
                    row.slots, row.pending, row.shared = slots[:n], row.pending[n:], n
        self.rows += rows

    def tokens_per_row(self) -> list[int]:
        """How many tokens of each row the next pass reads."""
        return [len(r.pending) for r in self.rows]

    @torch.no_grad()
    def step(self, model, **extra) -> None:
        """One pass of `model`: every row reads its pending tokens and takes its next one (or,
        with a draft, the draft's tokens it agrees with and the one after them).
        `extra`: the forward's arguments for this pass (each token's adapter)."""
        from transformers import DynamicCache

        if self.cache is None:
            self.cache, self._cache_arg = DynamicCache(config=model.config), _cache_argument(model)
        lengths = self.tokens_per_row()
        ids = torch.tensor([t for r in self.rows for t in r.pending], device=self.device)
        positions = torch.tensor([p for r in self.rows for p in range(len(r.slots), len(r.slots) + len(r.pending))],
                                 device=self.device)
        ends = torch.tensor(lengths).cumsum(0)
        keep = torch.cat([torch.arange(end - 1 - r.drafted, end) for r, end in zip(self.rows, ends.tolist())])
        out = model(input_ids=ids[None], position_ids=positions[None], use_cache=True,
                    logits_to_keep=keep.to(self.device),
                    attention_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool, device=self.device),  # (unread: by row)
                    packed_rows=self._pass_rows(lengths), **{self._cache_arg: self.cache}, **extra)
        chosen = self._choose(out.logits[0], [r.temperature for r in self.rows for _ in range(r.drafted + 1)]).tolist()
        at, read, kept_all = self.cached, 0, 0
        for row, n in zip(self.rows, lengths):
            picks, chosen = chosen[:row.drafted + 1], chosen[row.drafted + 1:]
            kept = _leading(d == c for d, c in zip(row.pending[n - row.drafted:], picks))  # (a prompt: no draft)
            read, kept_all = read + row.drafted, kept_all + kept
            row.slots += range(at, at + n - row.drafted + kept)  # a draft's tokens after the first it got wrong are gone
            self._dead += row.drafted - kept
            at += n
            if not row.tokens and row.weights is not None:  # its prompt is cached now
                self.prompts.append((row.weights, row.prompt, row.slots[:]))
            for token in picks[:kept + 1]:
                row.tokens.append(token)
                row.sequence.append(token)
                if row.ended(self.eos):
                    break
            self._remember(row, len(row.sequence) - kept - 2)
            row.pending, row.drafted = [row.tokens[-1]], 0
            if self.draft_tokens and row.temperature == 0 and not row.ended(self.eos):
                draft = self._draft(row)
                row.pending += draft
                row.drafted = len(draft)
        self.cached, self.drafts = at, (read, kept_all)
        del self.prompts[:-MAX_PROMPTS]

    def _remember(self, row: Row, since: int) -> None:
        """Note where each n-gram of `row.sequence` that ends at or after `since` and has a
        follower sits, unless it is known already (the first occurrence has the longest follower:
        a repeating answer drafts its whole period)."""
        if not self.draft_tokens:
            return
        if len(self._ngrams) > MAX_NGRAMS:
            self._ngrams.clear()
        seq = row.sequence
        for end in range(max(since, NGRAM), len(seq)):
            self._ngrams.setdefault((row.weights, tuple(seq[end - NGRAM:end])), (seq, end))

    def _draft(self, row: Row) -> list[int]:
        """The tokens that followed the first earlier occurrence of the row's last n-gram, up to
        `draft_tokens` and what the row may still take."""
        found = self._ngrams.get((row.weights, tuple(row.sequence[-NGRAM:]))) if len(row.sequence) >= NGRAM else None
        if found is None:
            return []
        seq, at = found
        return seq[at:at + min(self.draft_tokens, row.max_tokens - len(row.tokens) - 1)]

    def _pass_rows(self, lengths: list[int]) -> _PassRows:
        reading = sum(1 for r in self.rows if r.tokens)  # (they come first)
        most = max(lengths[:reading], default=1)
        longest = max((len(r.slots) + n for r, n in zip(self.rows, lengths[:reading])), default=1)
        queries = torch.zeros(reading, most, dtype=torch.long)
        keys = torch.zeros(reading, longest, dtype=torch.long)
        mask = torch.zeros(reading, 1, most, longest, dtype=torch.bool)
        at = 0
        for i, (row, n) in enumerate(zip(self.rows[:reading], lengths)):
            seen = len(row.slots)
            keys[i, : seen + n] = torch.tensor([*row.slots, *range(self.cached + at, self.cached + at + n)])
            for q in range(most):  # (a padding query repeats the row's last one)
                queries[i, q] = at + min(q, n - 1)
                mask[i, 0, q, : seen + min(q, n - 1) + 1] = True
            at += n
        real = None if most == 1 else torch.tensor(
            [i * most + q for i, n in enumerate(lengths[:reading]) for q in range(n)], dtype=torch.long)
        prompts = []
        for row, n in zip(self.rows[reading:], lengths[reading:]):
            prefix = torch.tensor(row.slots, dtype=torch.long, device=self.device) if row.slots else None
            prompts.append((at, at + n, prefix))
            at += n
        return _PassRows(reading, queries.to(self.device), keys.to(self.device), mask.to(self.device),
                         None if real is None else real.to(self.device), prompts, self.cached)

    def drop_ended(self, gone=lambda row: False) -> list[Row]:
        """Take out the rows that ended (or whose caller is `gone`) and return them. Their cached
        tokens stay until they are half of the cache, which then keeps only the others'."""
        out = [bool(r.tokens) and r.ended(self.eos) or gone(r) for r in self.rows]
        ended = [r for r, o in zip(self.rows, out) if o]
        self.rows = [r for r, o in zip(self.rows, out) if not o]
        self._dead += sum(len(r.slots) - r.shared for r in ended)
        if self._dead and 2 * self._dead >= self.cached:
            keep = sorted({s for r in self.rows for s in r.slots})  # (rows may share a prefix's slots)
            moved = {old: new for new, old in enumerate(keep)}
            index = torch.tensor(keep, dtype=torch.long, device=self.device)
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, index], layer.values[:, :, index]
            for row in self.rows:
                row.slots = [moved[s] for s in row.slots]
            self.prompts = [(w, p[:n], [moved[s] for s in slots[:n]]) for w, p, slots in self.prompts
                            if (n := _leading(s in moved for s in slots)) >= MIN_SHARED]
            self.cached, self._dead = len(keep), 0
        return ended

    @staticmethod
    def _choose(logits: torch.Tensor, temperatures: list[float]) -> torch.Tensor:
        chosen = logits.argmax(-1)
        sampled = [i for i, t in enumerate(temperatures) if t > 0]
        if sampled:
            t = torch.tensor([temperatures[i] for i in sampled], device=logits.device, dtype=torch.float32)[:, None]
            probs = (logits[sampled].float() / t).softmax(-1)
            chosen[sampled] = torch.multinomial(probs, 1).squeeze(1)
        return chosen


class ModelLock:
    """A replica's model, one user at a time. A long holder (a continuous batch, `held`) lets the
    users that wait (an adapter load, `with lock:`) go first between two of its steps (`give_way`)."""

    def __init__(self):
        self._lock, self._turn, self._wanted = threading.Lock(), threading.Condition(), 0

    def __enter__(self):
        with self._turn:
            self._wanted += 1
        self._lock.acquire()
        with self._turn:
            self._wanted -= 1
            self._turn.notify_all()
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    @property
    def waiting(self) -> int:
        """How many users wait for it now."""
        return self._wanted

    @contextlib.contextmanager
    def held(self):
        """Hold it as a long holder: one that gives way."""
        with self._lock:
            yield self

    def give_way(self) -> bool:
        """(Held.) Let every user that waits now have it first; whether any did (the model's
        state, its active adapter say, may have changed meanwhile)."""
        if not self.waiting:
            return False
        self._lock.release()
        try:
            with self._turn:
                self._turn.wait_for(lambda: not self._wanted)
        finally:
            self._lock.acquire()
        return True


@dataclass
class _Request:
    """A request in a continuous batch: its rows' tokens as they end, and the rows still running."""

    ticket: int
    max_tokens: list[int]
    prompt_tokens: list[int]
    running: int
    tokens: dict[int, list[int]] = field(default_factory=dict)


def decode_continuously(intake, prepare, route, lock: ModelLock, tokenizer, device, draft_tokens: int = 0) -> None:
    """Run a continuous batch (`RunningBatch`) until no row runs and none waits, taking in
    requests from `intake` (`serve_core.Intake`) before every step and answering each as soon as
    its last row ends. `prepare(item)` gives a request's prompts' token ids, each row's
    `max_tokens`, its temperature and what its tokens run through (`Row.weights`), or the
    exception that refuses it alone; `route(items)`, a
    context manager, readies the model for a pass whose token i is of the request `items[i]`
    (its adapter), and yields `(model, forward arguments)`. `draft_tokens`: `RunningBatch`'s.
    Holds `lock`, giving way between steps."""
    batch, requests, routed = RunningBatch(tokenizer.eos_token_id, device, draft_tokens), {}, None
    with lock.held(), contextlib.ExitStack() as routing:
        while True:
            for ticket, item, _ in intake.take(len(batch)):
                prepared = prepare(item)
                if isinstance(prepared, Exception):
                    intake.answer(ticket, prepared)
                    continue
                prompt_ids, max_tokens, temperature, weights = prepared
                requests[ticket] = _Request(ticket, max_tokens, [len(x) for x in prompt_ids], len(prompt_ids))
                batch.admit([Row((ticket, item), i, n, temperature, list(x), weights=weights)
                             for i, (x, n) in enumerate(zip(prompt_ids, max_tokens))])
            if not batch:
                return
            tokens = [r.owner for r, n in zip(batch.rows, batch.tokens_per_row()) for _ in range(n)]
            if routed != [ticket for ticket, _ in tokens]:  # rows joined or left: the model readied for these
                routing.close()
                routed = [ticket for ticket, _ in tokens]
                model, extra = routing.enter_context(route([item for _, item in tokens]))
            batch.step(model, **extra)
            intake.stepped(len(batch), batch.drafts)
            for row in batch.drop_ended(lambda r: intake.gone(r.owner[0])):
                _row_ended(row, requests, intake, tokenizer)
            if lock.give_way():  # an adapter load went first: ready the model again
                routing.close()
                routed = None


def _row_ended(row: Row, requests: dict[int, _Request], intake, tokenizer) -> None:
    """Keep an ended row's tokens; answer its request when it was the last of its rows."""
    request = requests.get(row.owner[0])
    if request is None:
        return
    request.tokens[row.index] = row.tokens
    request.running -= 1
    if intake.gone(request.ticket):
        del requests[request.ticket]
    elif not request.running:
        del requests[request.ticket]
        rows = [request.tokens[i] for i in range(len(request.max_tokens))]
        result = _answers(tokenizer, rows, request.max_tokens, request.prompt_tokens)
        intake.answer(request.ticket, {**result, "prompt_tokens": sum(result["prompt_tokens"]),
                                       "completion_tokens": sum(result["completion_tokens"])})


def _cache_argument(model) -> str:
    """What the model's forward calls its KV cache: `cache` from transformers 5.x (where
    `past_key_values` is deprecated), `past_key_values` before."""
    import inspect

    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
