"""A batch that mixes adapters of one base: in one pass PEFT routes each row through its own
adapter, and each row answers as its adapter does alone. The replica's inference code on a real
tiny PEFT model, with no Ray and no HTTP."""

import threading
from types import SimpleNamespace

import pytest
import torch
from prefect_lora.deploy.decoding import generate_rows


@pytest.fixture(scope="module")
def replica(tmp_path_factory, tiny_model_dir):
    """The replica's inference code (`_Replica`) over an `AdapterSet` of three random adapters."""
    from prefect_lora.deploy.adapters import AdapterSet
    from prefect_lora.deploy.serve import _Replica
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import make_random_adapter
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer

    work = tmp_path_factory.mktemp("mixed")
    dirs = {f"m/{i}": make_random_adapter(tiny_model_dir, work / f"a{i}", 40 + i) for i in range(3)}
    r = object.__new__(_Replica)  # no Serve replica: the inference methods on a hand-set replica
    r.cfg, r.device, r.task, r._lock = ServeConfig(model_name="m"), torch.device("cpu"), "causal_lm", threading.Lock()
    r.tokenizer = load_tokenizer(tiny_model_dir)
    r.adapters = AdapterSet(load_base_model(tiny_model_dir, "causal_lm"), "causal_lm",
                            lambda key: SimpleNamespace(adapter_dir=str(dirs[key])), max_count=2, max_bytes=None)
    return r


PROMPTS = ["What is 12 plus 30? Answer:", "Add 40 and 2.", "Sum of 7 and 8 is"]


def test_each_row_of_a_mixed_batch_answers_as_its_adapter_alone(replica):
    alone = {}
    for key in ("m/0", "m/1", "m/2"):
        model, names = replica.adapters.activate([key])
        assert names is None, "one adapter: made the active one"
        alone[key] = generate_rows(model, replica.tokenizer, PROMPTS, True, [8] * 3, 0.0, "cpu")["texts"]
    assert len({tuple(t) for t in alone.values()}) == 3, "the three adapters answer differently"
    assert replica.adapters.stats()["evictions"] >= 1, "at most 2 attached: the least recently used went"
    keys = ["m/2", "m/0", "m/1", "m/0"]
    model, names = replica.adapters.activate(keys)
    assert len(set(names)) == 3 and replica.adapters.stats()["adapters"] == 3, "a batch's adapters stay while it runs"
    texts = [PROMPTS[0], PROMPTS[1], PROMPTS[2], PROMPTS[0]]
    with replica.adapters.by_row(names) as extra:
        assert extra == {}, "plain LoRA layers: routed by our hooks, not PEFT's"
        out = generate_rows(model, replica.tokenizer, texts, True, [8, 8, 4, 8], 0.0, "cpu", **extra)
    expected = [alone["m/2"][0], alone["m/0"][1], alone["m/1"][2], alone["m/0"][0]]
    assert out["texts"][:2] + out["texts"][3:] == expected[:2] + expected[3:]
    assert expected[2].startswith(out["texts"][2]) and out["completion_tokens"][2] <= 4, "its own max_tokens"
    assert len(out["prompt_tokens"]) == 4 and out["finish"][2] in {"stop", "length"}


@pytest.mark.parametrize("attention, window, joins", [("sdpa", None, True), ("eager", None, False),
                                                       ("flash_attention_2", None, False), ("sdpa", 8, False)])
def test_a_model_batches_continuously_only_on_sdpa_with_a_cache_that_only_grows(attention, window, joins):
    """`use_rows_attention`: packed rows attend by row through sdpa, over a cache that only grows."""
    from prefect_lora.deploy.decoding import ROWS_ATTENTION, use_rows_attention
    from transformers import MistralConfig

    config = MistralConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=100, sliding_window=window)
    config._attn_implementation = attention
    assert use_rows_attention(SimpleNamespace(config=config)) is joins
    assert config._attn_implementation == (ROWS_ATTENTION if joins else attention)
