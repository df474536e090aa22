"""A built-in general probe set: forgetting measured on the base model's own answers.

The base model answers a few hundred general prompts once (greedy); the answers are cached next
to the model cache, keyed by the base's content hash. Forgetting is then the adapted model's
NLL and KL on those answers against the base: a model that kept what it knew still finds its
old answers likely. Needs no download and no corpus.

Enough probes that a sound adapter's interval is narrower than the effects the gate bounds
(32 gave a self-retention ratio interval ~0.09 wide on the demo). A second prompt set on other
topics, `REPLAY_PROMPTS`, feeds replay (self-distillation) and is disjoint from the probes:
training on the probes would fake the evidence the gate reads.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

from ..modeling import cache_dir, write_cache_file
from .encoding import format_prompts, generate_answers

GENERAL_PROBES = [
    "Explain why the sky looks blue during the day.",
    "Give three tips for staying focused while studying.",
    "What is the difference between weather and climate?",
    "Write a short, friendly email declining a meeting invitation.",
    "How does a refrigerator keep food cold?",
    "Summarise the plot of a typical detective story in two sentences.",
    "What are the main causes of the seasons on Earth?",
    "Suggest a simple recipe for a vegetable soup.",
    "Why do people learn foreign languages?",
    "Describe how a bill becomes a law in a parliament, in general terms.",
    "What is photosynthesis?",
    "List some ways to reduce household energy use.",
    "Explain what a computer program is to a ten-year-old.",
    "What should someone pack for a weekend hiking trip?",
    "Why is sleep important for health?",
    "Translate 'good morning, how are you?' into French.",
    "What is 15 multiplied by 12? Explain your steps.",
    "Write a haiku about autumn leaves.",
    "What are the benefits of regular exercise?",
    "How do vaccines help the immune system?",
    "Give an example of a metaphor and explain it.",
    "What is the capital of Japan, and what is it known for?",
    "Describe the water cycle.",
    "How can a small business find new customers?",
    "Explain the rules of chess for the pawn.",
    "What is the difference between a virus and a bacterium?",
    "Write two sentences encouraging a friend before an exam.",
    "Why do leaves change colour in the autumn?",
    "What makes a good password?",
    "Explain supply and demand in simple terms.",
    "How does a bicycle stay upright when moving?",
    "Name three famous painters and one work by each.",
]

TEMPLATES = [
    "Explain {} in simple terms.",
    "Give three interesting facts about {}.",
    "What are common misconceptions about {}?",
    "Write a short paragraph introducing {} to a beginner.",
    "Why does {} matter in everyday life?",
    "Describe the history of {} in a few sentences.",
    "What questions would a curious child ask about {}, and how would you answer one of them?",
    "Summarise the pros and cons of {}.",
    "How would you teach {} to a friend in five minutes?",
    "Write a two-line poem about {}.",
]

PROBE_TOPICS = [
    "volcanoes", "the moon", "rainbows", "honey bees", "the human heart", "electric cars", "the printing press",
    "chess", "coffee", "the internet", "glaciers", "the Roman Empire", "recycling", "earthquakes", "jazz music",
    "solar panels", "the immune system", "penguins", "democracy", "the piano", "bread baking", "the ocean tides",
    "dinosaurs", "libraries", "gravity", "the Olympic Games", "mushrooms", "bridges", "time zones", "vitamins",
    "trains", "deserts",
]

REPLAY_TOPICS = [
    "thunderstorms", "the sun", "whales", "the human brain", "bicycles", "the telephone", "tennis", "tea",
    "email", "rivers", "ancient Egypt", "composting", "hurricanes", "classical music", "wind turbines",
    "bacteria", "elephants", "elections", "the guitar", "cheese making", "the seasons", "sharks", "museums",
    "magnetism",
]

GENERAL_PROBES = GENERAL_PROBES + [t.format(topic) for topic in PROBE_TOPICS for t in TEMPLATES]
"""352 prompts: 32 written by hand, 320 from templates over topics."""

REPLAY_PROMPTS = [t.format(topic) for topic in REPLAY_TOPICS for t in TEMPLATES]
"""240 prompts on other topics than the probes (same templates), for self-distillation replay."""


def probe_prompts(limit: int | None = None) -> list[str]:
    """The first `limit` probes (all without one) in `spread` order: every topic and template
    kind, and a larger limit only adds probes (the stages of `promotion.more_evidence`)."""
    return spread(GENERAL_PROBES, limit)


def spread(prompts: list[str], limit: int | None = None) -> list[str]:
    """The first `limit` of `prompts` (all without one) in an order whose every prefix is spread
    evenly over the list: positions in van der Corput order (0, 1/2, 1/4, 3/4, 1/8, ...)."""
    n = len(prompts)
    order, seen, k = [], set(), 0
    while len(order) < min(n, limit or n):
        x, f, i = 0.0, 0.5, k
        while i:
            x, f, i = x + f * (i & 1), f / 2, i >> 1
        if (j := int(x * n)) not in seen:
            seen.add(j)
            order.append(j)
        k += 1
    return [prompts[j] for j in order]


def _has_chat_template(tokenizer) -> bool:
    """Probes are asked as a user turn wherever the tokenizer has a chat template (instruct models)."""
    return bool(getattr(tokenizer, "chat_template", None))


def _cache_file(base_hash: str, max_new_tokens: int) -> Path:
    """One file per base and answer length; `base_hash` may also be `hub-id@revision` (hashed here:
    two ids of one organisation must not share a file, and a `/` is no file name)."""
    return cache_dir() / "probes" / f"{hashlib.sha256(base_hash.encode()).hexdigest()[:16]}-{max_new_tokens}.jsonl"


def _stored(base_hash: str, max_new_tokens: int) -> dict[str, str]:
    """Every answer of this base generated so far (empty ones included: not asked again), by prompt."""
    try:
        lines = _cache_file(base_hash, max_new_tokens).read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    return {r["prompt"]: r["answer"] for r in map(json.loads, lines)}


def _rows(prompts: list[str], stored: dict[str, str]) -> list[dict]:
    return [{"prompt": p, "answer": stored[p]} for p in prompts if stored[p].strip()]


def cached_answers(base_hash: str, max_new_tokens: int, prompts: list[str]) -> list[dict] | None:
    """`base_answers` from the cache, or None when some prompt was never answered by this base."""
    stored = _stored(base_hash, max_new_tokens)
    return _rows(prompts, stored) if all(p in stored for p in prompts) else None


def base_answers(model, tokenizer, base_hash: str, max_new_tokens: int = 64, batch_size: int = 8,
                 prompts: list[str] | None = None, progress: Callable[[str], None] | None = None) -> list[dict]:
    """The base model's greedy answers to `prompts` (the probes by default), in their order, without
    empty ones. Each prompt is answered once per base and kept: a later call asking for fewer,
    more or other prompts generates only those never asked (progress lines to `progress`)."""
    prompts = GENERAL_PROBES if prompts is None else prompts
    stored = _stored(base_hash, max_new_tokens)
    missing = list(dict.fromkeys(p for p in prompts if p not in stored))
    if missing:
        # A PeftModel answers with its adapters off; a plain model (the base itself) as it is.
        with model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext():
            answers = generate_answers(model, tokenizer, missing, max_new_tokens, batch_size,
                                       chat_template=_has_chat_template(tokenizer),
                                       label="the base's answers to the general prompts (once per base model)",
                                       progress=progress)
        stored = {**_stored(base_hash, max_new_tokens), **dict(zip(missing, answers))}  # another run may have added some
        text = "".join(json.dumps({"prompt": p, "answer": a}) + "\n" for p, a in stored.items())
        write_cache_file(_cache_file(base_hash, max_new_tokens), lambda f: f.write(text.encode("utf-8")))
    return _rows(prompts, stored)


def probe_blocks(rows: list[dict], tokenizer, max_len: int) -> tuple[list[list[int]], list[int]]:
    """Token blocks prompt+answer, and where each answer starts (only answers are scored)."""
    texts, special = format_prompts([r["prompt"] for r in rows], tokenizer, _has_chat_template(tokenizer))
    blocks, starts = [], []
    for text, row in zip(texts, rows):
        p = tokenizer(text, add_special_tokens=special)["input_ids"]
        a = tokenizer(row["answer"], add_special_tokens=False)["input_ids"]
        ids = (p + a)[:max_len]
        if len(ids) > len(p):
            blocks.append(ids)
            starts.append(len(p))
    return blocks, starts
