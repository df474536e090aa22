"""A classifier's forgetting: the share of the base's retrieval hits its encoder loses."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch
from prefect_lora.lora_tasks.config import config_from_dict
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.measurement.forgetting import retrieval_by_view, retrieval_correct, retrieval_pairs


class _Encoder(torch.nn.Module):
    """Final hidden states = a fixed embedding of each token; `collapse` maps every text to one point."""

    def __init__(self, vocab: int = 300, dim: int = 16, collapse: bool = False):
        super().__init__()
        self.emb = torch.nn.Embedding(vocab, dim)
        torch.nn.init.normal_(self.emb.weight, generator=torch.Generator().manual_seed(0))
        self.collapse = collapse

    def forward(self, input_ids, attention_mask, output_hidden_states=True):
        h = self.emb(input_ids)
        if self.collapse:
            h = torch.ones_like(h)
        return SimpleNamespace(hidden_states=(h,))


class _Views:
    def __init__(self, models):
        self.models = models
        self.names = list(models)

    def use(self, name):
        import contextlib

        return contextlib.nullcontext(self.models[name])


class _ByteTokenizer:
    def __call__(self, text, add_special_tokens=True, truncation=False, max_length=None):
        ids = list(text.encode())[: max_length if truncation else None]
        return {"input_ids": ([1] if add_special_tokens else []) + ids}


def _paragraphs(n: int) -> list[str]:
    """Lines whose two halves share words of their own (as a paragraph keeps to its topic)."""
    rng = np.random.default_rng(0)
    letters = list("abcdefghijklmnopqrstuvwxyz")
    out = []
    for _ in range(n):
        topic = ["".join(rng.choice(letters, 6)) for _ in range(3)]
        out.append(" ".join(rng.choice(topic, 40)))
    return out


def test_pairs_cut_each_long_enough_line_in_two_with_the_special_tokens():
    texts = ["short line", "x" * 40, "y" * 100]
    pairs = retrieval_pairs(texts, _ByteTokenizer(), seq_len=20, max_tokens=10_000)
    assert len(pairs) == 2  # "short line" is under 1.5 passages
    (a, b), (c, d) = pairs
    assert a[0] == 1 and len(a) == 20 and b[0] == 1 and 1 + 19 // 2 <= len(b) <= 20
    assert c == [1] + [ord("y")] * 19 and len(retrieval_pairs(texts, _ByteTokenizer(), 20, max_tokens=30)) == 1


def test_an_encoder_that_keeps_its_geometry_loses_nothing_and_a_collapsed_one_loses_every_hit():
    pairs = retrieval_pairs(_paragraphs(30), _ByteTokenizer(), seq_len=40, max_tokens=10_000)
    base = _Encoder()
    hits = retrieval_correct(base, pairs, pad_id=0, batch_size=8)
    assert hits.shape == (30,) and hits.mean() > 0.2  # the halves of one paragraph share its words
    by_view = retrieval_by_view(_Views({"base": base, "adapted": base, "broken": _Encoder(collapse=True)}), pairs, 0, 8)
    assert np.array_equal(by_view["adapted"], by_view["base"])
    assert by_view["broken"].sum() == 0  # every opening is as near to every continuation: a tie is no hit


def test_the_base_side_is_read_back_from_the_cache(tmp_path, monkeypatch):
    from prefect_lora.lora_tasks.measurement.block_cache import BlockCache

    monkeypatch.setenv("PREFECT_LORA_CACHE", str(tmp_path))
    pairs = retrieval_pairs(_paragraphs(10), _ByteTokenizer(), seq_len=40, max_tokens=10_000)
    cache = BlockCache(identities={"base": "base-model-v1"})
    first = retrieval_by_view(_Views({"base": _Encoder()}), pairs, 0, 8, cache=BlockCache(identities=cache.identities))
    # a base that would now score nothing is not run: its kept hits come back
    again = retrieval_by_view(_Views({"base": _Encoder(collapse=True)}), pairs, 0, 8, cache=cache)
    assert np.array_equal(again["base"], first["base"])


def test_the_replaced_drift_limit_says_what_replaced_it():
    raw = {"model_name": "m", "task": "sequence_classification", "base_model": {"name_or_path": "builtin:tiny-llama"},
           "data": {"train_path": "x", "labels": [0, 1]}, "training": {"max_steps": 1},
           "promotion": {"max_representation_drift": 0.5}}
    with pytest.raises(ConfigError, match="max_retrieval_loss"):
        config_from_dict(raw)


def test_a_classifier_power_plan_counts_reference_paragraphs(tmp_path):
    from prefect_lora.lora_tasks.measurement.power import plan

    ref = tmp_path / "ref.txt"
    ref.write_text("".join(p + "\n" for p in _paragraphs(200)))
    cfg = config_from_dict({
        "model_name": "m", "task": "sequence_classification", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x", "labels": [0, 1]}, "training": {"max_steps": 1, "max_seq_length": 64},
        "evaluation": {"reference": {"path": str(ref), "max_tokens": 100_000}},
    })
    (check,) = [p for p in plan(cfg, 500) if p.check == "reference_retrieval_loss"]
    assert check.unit == "reference paragraphs" and check.size == 200 and check.limit == 0.7
    assert check.verdict(0.95) == "ok" and check.measured is None


def test_a_corpus_where_the_base_finds_nothing_is_a_clear_error(tmp_path):
    from prefect_lora.lora_tasks.errors import DataError
    from prefect_lora.lora_tasks.measurement.forgetting import _measure_retrieval, _Measurement

    cfg = config_from_dict({
        "model_name": "m", "task": "sequence_classification", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x", "labels": [0, 1]}, "training": {"max_steps": 1, "max_seq_length": 40},
        "evaluation": {"reference": {"path": str(tmp_path / "ref.txt"), "max_tokens": 100_000}},
    })
    views = _Views({"base": _Encoder(collapse=True), "adapted": _Encoder()})
    m = _Measurement(cfg, views, _ByteTokenizer(), "cpu", {"resamples": 10, "confidence": 0.95, "seed": 0}, None)
    m.tokenizer.pad_token_id = 0
    with pytest.raises(DataError, match="finds none of the 30 reference paragraphs"):
        _measure_retrieval(m, _paragraphs(30))
