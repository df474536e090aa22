"""Sequence packing: examples share rows without seeing each other, and the loss is unchanged."""

import itertools
import json

import pytest
import torch
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.training.encoding import causal_lm_loss, collate, encode_examples, pack
from prefect_lora.lora_tasks.training.loop import WorkerContext, make_optimizer, train_worker
from test_training import ROWS
from test_training import make_cfg as _cfg


def _examples(tok, n=8):
    # lengths that differ a lot, so several examples share a row
    rows = [{"prompt": "1 + 2 =" * (1 + i % 4), "completion": " 3" * (1 + i % 3)} for i in range(n)]
    return encode_examples(rows, tok, _cfg())


def _model(path, attn):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


def test_pack_fills_rows_no_wider_than_the_longest_example():
    batch = [{"input_ids": [1] * n, "labels": [7] * n} for n in (6, 2, 3, 1, 4)]
    packed = pack(batch, pad_id=0)
    assert packed["input_ids"].shape == (3, 6)  # 16 tokens in 3 rows of 6, instead of 5 rows
    assert packed["position_ids"].tolist() == [[0, 1, 2, 3, 4, 5], [0, 1, 2, 3, 0, 1], [0, 1, 2, 0, 0, 1]]
    # each example's first token is no target (the previous example must not predict it); padding has none
    assert packed["labels"].tolist() == [[-100, 7, 7, 7, 7, 7], [-100, 7, 7, 7, -100, 7], [-100, 7, 7, -100, -100, -100]]
    assert packed["input_ids"][2].tolist() == [1, 1, 1, 1, 0, 0]


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_packed_row_logits_equal_each_example_alone(tiny_model_dir, attn):
    """No attention across example boundaries: a packed row's logits are each example's own."""
    from prefect_lora.lora_tasks.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = _model(tiny_model_dir, attn)
    examples = _examples(tok)
    packed = pack(examples, tok.pad_token_id)
    assert packed["input_ids"].shape[0] < len(examples)
    with torch.no_grad():
        logits = model(input_ids=packed["input_ids"], position_ids=packed["position_ids"], use_cache=False).logits
        for row in range(packed["input_ids"].shape[0]):
            starts = (packed["position_ids"][row] == 0).nonzero().squeeze(1).tolist() + [packed["input_ids"].shape[1]]
            for a, b in itertools.pairwise(starts):
                ids = packed["input_ids"][row, a:b]
                if (ids == tok.pad_token_id).all():
                    continue
                alone = model(input_ids=ids[None]).logits[0]
                torch.testing.assert_close(logits[row, a:b], alone, atol=1e-4, rtol=1e-4)


def test_packed_loss_equals_padded_loss(tiny_model_dir):
    """The same eval loss (sum and token count) whether the batch is padded or packed."""
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    model = load_base_model(tiny_model_dir, "causal_lm").eval()
    examples = encode_examples(ROWS[:16], tok, _cfg())
    with torch.no_grad():
        padded, n_padded = causal_lm_loss(model, collate(examples, tok.pad_token_id, "causal_lm"))
        packed, n_packed = causal_lm_loss(model, pack(examples, tok.pad_token_id))
    assert n_packed == n_padded
    assert float(packed) == pytest.approx(float(padded), rel=1e-5)


def test_packing_trains_the_same_steps(tiny_model_dir):
    """Same examples per step, same loss: the trajectory matches padding's, step by step."""
    def losses(cfg):
        seen = []
        train_worker(cfg, ROWS[:64], WorkerContext(log=lambda m, step: seen.append(m["train_loss"])))
        return seen

    padded, packed = losses(_cfg()), losses(_cfg(packing=True))
    assert len(packed) == 6
    assert packed == pytest.approx(padded, rel=1e-4, abs=1e-5)


def test_packing_is_refused_for_classification():
    with pytest.raises(ConfigError, match="packing"):
        _cfg("sequence_classification", packing=True)


def test_fused_adamw_is_chosen_where_torch_has_it():
    p = torch.nn.Parameter(torch.zeros(3))
    opt = make_optimizer([p], 1e-3, 0.0, torch.device("cpu"))
    from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

    if "cpu" in _get_fused_kernels_supported_devices():
        assert opt.defaults["fused"] is True
    else:
        assert opt.defaults["foreach"] is True
    p.grad = torch.ones(3)
    opt.step()
    assert (p.detach() < 0).all()


def test_packing_off_leaves_config_hashes_as_before_the_setting_existed():
    import hashlib

    cfg = _cfg()
    d = cfg.model_dump(mode="json", include={"task", "base_model", "data", "lora", "training"})
    d["num_workers"], d["strategy"] = cfg.scaling.num_workers, cfg.scaling.strategy
    del d["training"]["packing"], d["training"]["attention"], d["data"]["validation"]["check_conflicts"]
    blob = json.dumps(d, sort_keys=True, separators=(",", ":"))
    assert cfg.training_hash() == hashlib.sha256(blob.encode()).hexdigest()
    assert _cfg(packing=True).training_hash() != cfg.training_hash()
    assert _cfg(packing=True).config_hash() != cfg.config_hash()
