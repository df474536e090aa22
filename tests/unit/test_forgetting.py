import math

import numpy as np
import pytest
import torch
from prefect_lora.lora_tasks.data.evidence import read_reference_texts
from prefect_lora.lora_tasks.errors import DataError
from prefect_lora.lora_tasks.measurement.forgetting import chunk_reference, token_kl


def test_kl_of_identical_logits_is_zero():
    logits = torch.randn(2, 5, 7)
    s, n = token_kl(logits, logits.clone(), torch.ones(2, 5))
    assert n == 10
    assert abs(s) < 1e-5


def test_kl_matches_closed_form():
    # p = (0.5, 0.5), q = (0.9, 0.1): KL(p||q) = 0.5 ln(0.5/0.9) + 0.5 ln(0.5/0.1)
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.9, 0.1]]]))
    s, n = token_kl(p, q, torch.ones(1, 1))
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert n == 1 and s == pytest.approx(expected, rel=1e-5)


def test_kl_is_asymmetric_and_base_first():
    p = torch.log(torch.tensor([[[0.5, 0.5]]]))
    q = torch.log(torch.tensor([[[0.9, 0.1]]]))
    forward, _ = token_kl(p, q, torch.ones(1, 1))
    backward, _ = token_kl(q, p, torch.ones(1, 1))
    assert forward == pytest.approx(0.5108, abs=1e-3)
    assert backward == pytest.approx(0.3681, abs=1e-3)


def test_kl_ignores_masked_positions():
    base = torch.zeros(1, 3, 4)
    adapted = torch.tensor([[[0.0] * 4, [0.0] * 4, [50.0, 0, 0, 0]]])
    s, n = token_kl(base, adapted, torch.tensor([[1, 1, 0]]))
    assert n == 2 and abs(s) < 1e-6


def test_reference_skips_blank_lines(tmp_path):
    path = tmp_path / "ref.txt"
    path.write_text("\n = Heading = \n\n  some text  \n\n")
    assert read_reference_texts(path) == ["= Heading =", "some text"]


@pytest.mark.parametrize("content, message", [(b"\n\n  \n", "no non-blank line"), (b"\xff\xfe bad", "not UTF-8")])
def test_reference_errors(tmp_path, content, message):
    path = tmp_path / "ref.txt"
    path.write_bytes(content)
    with pytest.raises(DataError, match=message):
        read_reference_texts(path)


def test_chunking_respects_budget_and_length(tiny_model_dir):
    from prefect_lora.lora_tasks.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    blocks = chunk_reference(["abcdefghij"] * 20, tok, max_tokens=50, seq_len=16)
    assert sum(map(len, blocks)) == 50
    assert all(len(b) <= 16 for b in blocks)
    assert len(blocks) == 4  # 16 + 16 + 16 + 2


def test_reference_on_real_wikitext(shared_data):
    texts = read_reference_texts(shared_data / "wikitext2" / "valid.txt")
    assert texts and all(t == t.strip() and t for t in texts)


def test_probe_answers_are_cached_and_scored_on_answers_only(tiny_model_dir, tmp_path, monkeypatch):
    from prefect_lora.lora_tasks.training import probes
    from prefect_lora.lora_tasks.measurement.forgetting import causal_lm_forgetting
    from prefect_lora.lora_tasks.modeling import apply_lora, load_base_model, load_tokenizer

    monkeypatch.setattr(probes, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(probes, "GENERAL_PROBES", probes.GENERAL_PROBES[:4])
    tok = load_tokenizer(tiny_model_dir)
    model = apply_lora(load_base_model(tiny_model_dir, "causal_lm"), "causal_lm", r=2, alpha=4, dropout=0.0,
                       target_modules="all-linear")
    rows = probes.base_answers(model, tok, "h" * 16, max_new_tokens=8)
    assert rows and all(r["answer"] for r in rows)
    cached = list((tmp_path / "probes").glob("*.jsonl"))
    assert len(cached) == 1
    assert probes.base_answers(None, tok, "h" * 16, max_new_tokens=8) == rows  # no model needed: cache hit
    blocks, starts = probes.probe_blocks(rows, tok, 256)
    assert all(0 < s < len(b) for b, s in zip(blocks, starts))
    out = causal_lm_forgetting(model, tok, blocks, 2, score_from=starts)
    assert out["reference_tokens"] == sum(len(b) - s for b, s in zip(blocks, starts))
    assert out["reference_kl"] == pytest.approx(0.0, abs=1e-6)  # fresh adapter: B = 0


def test_probe_answers_are_kept_per_prompt_so_fewer_or_more_prompts_generate_only_the_new_ones(tiny_model_dir, tmp_path,
                                                                                               monkeypatch):
    from prefect_lora.lora_tasks.training import probes
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer

    monkeypatch.setattr(probes, "cache_dir", lambda: tmp_path)
    asked: list[list[str]] = []
    real = probes.generate_answers
    monkeypatch.setattr(probes, "generate_answers", lambda m, t, prompts, *a, **k: asked.append(prompts) or real(m, t, prompts, *a, **k))
    tok, model = load_tokenizer(tiny_model_dir), load_base_model(tiny_model_dir, "causal_lm")
    first = probes.base_answers(model, tok, "h" * 16, 8, prompts=probes.probe_prompts(4))
    assert probes.cached_answers("h" * 16, 8, probes.probe_prompts(2)) == [r for r in first if r["prompt"] in probes.probe_prompts(2)]
    assert probes.cached_answers("h" * 16, 8, probes.probe_prompts(6)) is None  # two never asked
    more = probes.base_answers(model, tok, "h" * 16, 8, prompts=probes.probe_prompts(6))
    assert asked == [probes.probe_prompts(4), [p for p in probes.probe_prompts(6) if p not in probes.probe_prompts(4)]]
    common = set(probes.probe_prompts(4)) & set(probes.probe_prompts(6))
    assert common
    answers = lambda rows: {r["prompt"]: r["answer"] for r in rows if r["prompt"] in common}
    assert answers(more) == answers(first)  # the same answers, not generated again
    assert probes.base_answers(None, tok, "h" * 16, 8, prompts=probes.probe_prompts(6)) == more


def test_the_comparison_on_scored_positions_matches_full_logits_and_its_cache(changed_tiny):
    """`compare_on_blocks` runs the output layer on scored positions only, batches blocks by
    length and reuses the base's states: each must leave every per-block figure as the plain
    computation (full logits of every position, block by block) gives it."""
    import torch.nn.functional as F
    from prefect_lora.lora_tasks.measurement.block_cache import BlockCache
    from prefect_lora.lora_tasks.measurement.forgetting import compare_on_blocks
    from prefect_lora.lora_tasks.training.views import PeftViews

    model = changed_tiny(seed=0)  # a trained-looking update, not the zero of a fresh adapter
    blocks = [list(torch.randint(3, 200, (n,)).tolist()) for n in (9, 30, 17, 5, 24, 12)]
    starts = [3, 10, 1, 2, 20, 6]
    views = PeftViews(model)

    def plain(block, start):
        ids = torch.tensor([block])
        with torch.no_grad():
            q = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
            with model.disable_adapter():
                p = F.log_softmax(model(input_ids=ids).logits[0, :-1].float(), -1)
        tgt, keep = ids[0, 1:], torch.arange(len(block) - 1) >= start - 1
        nll = lambda lp: float(-lp[keep].gather(1, tgt[keep, None]).sum())  # noqa: E731
        return nll(p), nll(q), float((p.exp() * (p - q)).sum(-1)[keep].sum()), int(keep.sum())

    want = np.array([plain(b, s) for b, s in zip(blocks, starts)])
    cache = BlockCache()
    got = compare_on_blocks(views, blocks, 4, 0, score_from=starts, cache=cache)
    for col, got_col in enumerate((got["nll"]["base"], got["nll"]["adapted"], got["kl"]["adapted"], got["tokens"])):
        np.testing.assert_allclose(got_col, want[:, col], rtol=1e-4, atol=1e-4)
    assert len(cache.states) == 1
    with views.scaled("adapted", 0.5):
        cached = compare_on_blocks(views, blocks, 4, 0, score_from=starts, cache=cache)
        fresh = compare_on_blocks(views, blocks, 4, 0, score_from=starts)
    for k in ("nll", "kl"):
        np.testing.assert_allclose(cached[k]["adapted"], fresh[k]["adapted"], rtol=1e-5, atol=1e-6)
    assert (cached["kl"]["adapted"] < got["kl"]["adapted"]).all(), "half the update, less divergence"


def test_the_next_run_reads_unchanging_models_units_and_the_base_states_from_disk(changed_tiny, tmp_path, monkeypatch):
    """A later run (a fresh `BlockCache`) runs no model whose units were kept (the base, the
    adapter that became champion) and, for a new adapter, only the base's output layer: the
    figures are those a run without any cache computes."""
    from prefect_lora.lora_tasks.measurement import block_cache
    from prefect_lora.lora_tasks.measurement.block_cache import BlockCache
    from prefect_lora.lora_tasks.measurement.forgetting import compare_on_blocks
    from prefect_lora.lora_tasks.training.views import PeftViews

    monkeypatch.setattr(block_cache, "cache_dir", lambda: tmp_path)
    model = changed_tiny(seed=1)
    decoder_runs = []
    model.get_base_model().get_decoder().register_forward_hook(lambda *a: decoder_runs.append(1))
    blocks = [list(torch.randint(3, 200, (n,)).tolist()) for n in (9, 30, 17, 5)]
    starts = [3, 10, 1, 2]
    views = PeftViews(model)
    first = compare_on_blocks(views, blocks, 2, 0, score_from=starts, cache=BlockCache({"base": "b", "adapted": "a"}))
    assert len(decoder_runs) == 4  # two batches, base and adapted
    assert len(list(tmp_path.glob("forgetting/*.npz"))) == 2 and len(list(tmp_path.glob("forgetting/*.pt"))) == 1

    with views.scaled("adapted", 0.5):  # had the adapted model run, its figures would differ
        again = compare_on_blocks(views, blocks, 2, 0, score_from=starts, cache=BlockCache({"base": "b", "adapted": "a"}))
        assert len(decoder_runs) == 4, "kept units: no model ran"
        for k in ("nll", "kl"):
            np.testing.assert_array_equal(again[k]["adapted"], first[k]["adapted"])
        other = compare_on_blocks(views, blocks, 2, 0, score_from=starts, cache=BlockCache({"base": "b", "adapted": None}))
        assert len(decoder_runs) == 6, "a new adapter runs; the base only its output layer"
        fresh = compare_on_blocks(views, blocks, 2, 0, score_from=starts)
    for k in ("nll", "kl"):
        np.testing.assert_allclose(other[k]["adapted"], fresh[k]["adapted"], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(other["nll"]["base"], first["nll"]["base"], rtol=1e-6, atol=1e-6)
    assert (other["kl"]["adapted"] < first["kl"]["adapted"]).all()
