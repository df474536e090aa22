"""Forgetting sources beside the corpus: multiple-choice benchmarks, self-retention, the config
that combines them, the gate limits that bound them, and full fine-tuning's two-model views."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from prefect_lora.lora_tasks.config import PromotionPolicy, config_from_dict
from prefect_lora.lora_tasks.data.evidence import MCQuestion, read_mc_benchmark
from prefect_lora.lora_tasks.errors import DataError
from prefect_lora.lora_tasks.gate.promotion import Candidate, candidate_from_metrics, decide_promotion
from prefect_lora.lora_tasks.measurement.evaluation import evaluate_adapter, rouge_l
from prefect_lora.lora_tasks.measurement.forgetting import mc_blocks, mc_correct
from prefect_lora.lora_tasks.training.views import SeparateViews

REPO = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- ROUGE-L


@pytest.mark.parametrize("pred, target, expected", [
    ("the cat sat on the mat", "the cat sat on the mat", 1.0),
    ("The Cat  sat", "the cat sat", 1.0),                     # lowercased, whitespace tokens
    ("dog barks", "the cat sat", 0.0),                        # nothing in common
    # LCS "the cat the" = 3 of 4 predicted and 3 of 6 target tokens: F1 = 2*.75*.5/(1.25) = 0.6
    ("the cat on the", "the cat sat by the mat", 0.6),
    ("a b c d", "d c b a", 2 * 0.25 * 0.25 / 0.5),             # order matters: LCS is 1
    ("", "", 1.0),
    ("", "something", 0.0),
])
def test_rouge_l(pred, target, expected):
    assert rouge_l(pred, target) == pytest.approx(expected)


def test_rouge_l_is_symmetric_in_f1():
    assert rouge_l("a b c x", "a c y") == pytest.approx(rouge_l("a c y", "a b c x"))


# ----------------------------------------------------------------------------- benchmarks: reading


def test_the_shipped_benchmark_reads():
    qs = read_mc_benchmark(REPO / "configs" / "data" / "mc_general.jsonl")
    assert len(qs) == 40 and all(0 <= q.answer < len(q.choices) for q in qs)


def test_answer_may_be_the_choice_text(tmp_path):
    p = tmp_path / "b.jsonl"
    p.write_text(json.dumps({"question": "2+2?", "choices": ["3", "4"], "answer": "4"}) + "\n\n")
    assert read_mc_benchmark(p) == [MCQuestion("2+2?", ["3", "4"], 1)]


@pytest.mark.parametrize("line, field", [
    ("{not json", "not valid JSON"),
    ('["a list"]', "JSON object"),
    ('{"choices": ["a", "b"], "answer": 0}', "'question'"),
    ('{"question": "q", "choices": ["only one"], "answer": 0}', "'choices'"),
    ('{"question": "q", "choices": ["a", ""], "answer": 0}', "'choices'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": 2}', "'answer'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": "c"}', "'answer'"),
    ('{"question": "q", "choices": ["a", "b"], "answer": true}', "'answer'"),
])
def test_a_bad_line_names_file_line_and_field(tmp_path, line, field):
    p = tmp_path / "bench.jsonl"
    p.write_text(json.dumps({"question": "fine", "choices": ["a", "b"], "answer": 0}) + "\n" + line + "\n")
    with pytest.raises(DataError) as err:
        read_mc_benchmark(p)
    assert str(p) in str(err.value) and "line 2" in str(err.value) and field in str(err.value)


def test_a_missing_benchmark_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_mc_benchmark(tmp_path / "nope.jsonl")


# ----------------------------------------------------------------------------- benchmarks: scoring


class _Tok:
    """Characters as token ids (a = 1, b = 2, ...); enough for choice scoring."""

    pad_token_id = 0

    def __call__(self, text, add_special_tokens=True):
        return {"input_ids": [ord(c) % 50 + 1 for c in text]}


class _Prefers(torch.nn.Module):
    """A 'model' whose next token is always `token` (logit 10, others 0)."""

    def __init__(self, token: int):
        super().__init__()
        self.token = token

    def forward(self, input_ids, attention_mask=None):
        logits = torch.zeros(*input_ids.shape, 64)
        logits[..., self.token] = 10.0
        return type("Out", (), {"logits": logits})()


def test_the_choice_with_the_highest_likelihood_wins_per_model():
    tok = _Tok()
    x, y = tok(" x")["input_ids"][1], tok(" y")["input_ids"][1]
    space = tok(" ")["input_ids"][0]
    assert space not in (x, y)
    qs = [MCQuestion("pick", ["x", "y"], 0), MCQuestion("pick", ["y", "x"], 0)]
    blocks, starts, owner = mc_blocks(qs, tok, 64)
    assert owner == [0, 0, 1, 1] and all(blocks[i][starts[i]:] == tok(" " + c)["input_ids"]
                                          for i, c in enumerate(["x", "y", "y", "x"]))
    views = SeparateViews({"base": _Prefers(x), "adapted": _Prefers(y)})
    correct = mc_correct(views, qs, tok, batch_size=3, max_len=64)
    assert correct["base"].tolist() == [1.0, 0.0]      # prefers x: right on q0, wrong on q1
    assert correct["adapted"].tolist() == [0.0, 1.0]


# ----------------------------------------------------------------------------- config


def _raw(**reference):
    return {"model_name": "t", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
            "data": {"train_path": "x", "prompt_column": "p", "completion_column": "c"},
            "training": {"max_steps": 1}, "evaluation": {"reference": reference}}


def test_reference_sources_combine_and_old_configs_still_load():
    both = config_from_dict(_raw(path="ref.txt", probes="general", benchmarks=["configs/data/mc_general.jsonl"]))
    ref = both.evaluation.reference
    assert ref.path.endswith("ref.txt") and ref.probes == "general" and Path(ref.benchmarks[0]).is_absolute()
    assert config_from_dict(_raw(probes="general")).evaluation.reference.benchmarks == []
    assert config_from_dict(_raw(benchmarks=["b.jsonl"])).evaluation.reference.path is None


def test_an_empty_reference_section_is_an_error():
    from prefect_lora.lora_tasks.errors import ConfigError

    with pytest.raises(ConfigError, match="at least one of"):
        config_from_dict(_raw())


def test_defaults_of_the_new_fields():
    cfg = config_from_dict(_raw(path="r.txt"))
    assert cfg.training.method == "lora" and cfg.evaluation.bootstrap_samples == 1000
    p = cfg.promotion
    assert (p.confidence, p.max_self_retention_ratio, p.max_benchmark_accuracy_drop) == (0.95, 1.2, 0.05)


def test_full_fine_tuning_changes_the_training_hash():
    raw = _raw(path="r.txt")
    lora = config_from_dict(raw)
    raw["training"]["method"] = "full"
    assert config_from_dict(raw).training_hash() != lora.training_hash()


# ----------------------------------------------------------------------------- the gate on the new metrics


POLICY = PromotionPolicy(min_task_gain=0.05, max_self_retention_ratio=1.2, max_benchmark_accuracy_drop=0.05,
                         max_perplexity_ratio=1.13, max_kl=0.5)
GAIN = {"task_gain": (0.3, 0.7)}


def cand(forgetting: dict, intervals: dict) -> Candidate:
    return Candidate("eval_loss", False, 2.0, 1.5, forgetting, "2", {**GAIN, **intervals})


BENCH = "benchmark_mc_general_accuracy_drop"
NEW_CASES = [
    ("self-retention within the limit", {"self_retention_perplexity_ratio": 1.05}, {"self_retention_perplexity_ratio": (1.0, 1.1)}, True, []),
    ("self-retention may exceed the limit", {"self_retention_perplexity_ratio": 1.1}, {"self_retention_perplexity_ratio": (1.0, 1.3)}, False, ["self_retention_perplexity_ratio"]),
    ("benchmark drop straddles the limit", {BENCH: 0.02}, {BENCH: (-0.05, 0.1)}, False, [BENCH]),
    ("benchmark drop within the limit", {BENCH: 0.0}, {BENCH: (-0.03, 0.03)}, True, []),
    ("benchmark drop NaN", {BENCH: math.nan}, {BENCH: (math.nan, math.nan)}, False, [BENCH]),
    ("benchmark bound NaN though the point is fine", {BENCH: 0.0}, {BENCH: (0.0, math.nan)}, False, [BENCH]),
    ("self-retention KL beside a corpus is informative, not a gate",
     {"self_retention_kl": 9.0, "reference_kl": 0.1, BENCH: 0.0}, {"reference_kl": (0.05, 0.2), BENCH: (0.0, 0.0)},
     True, []),
    ("without a corpus the probes stand in for it: max_kl bounds their KL",
     {"self_retention_kl": 0.6, BENCH: 0.0}, {"self_retention_kl": (0.55, 0.65), BENCH: (0.0, 0.0)}, False,
     ["self_retention_kl"]),
    ("without a corpus the tighter of the two ratio limits bounds the probes' ratio",
     {"self_retention_perplexity_ratio": 1.12}, {"self_retention_perplexity_ratio": (1.1, 1.14)}, False,
     ["self_retention_perplexity_ratio"]),
]


@pytest.mark.parametrize("name, forgetting, intervals, promote, failed", NEW_CASES, ids=[c[0] for c in NEW_CASES])
def test_gate_on_self_retention_and_benchmarks(name, forgetting, intervals, promote, failed):
    d = decide_promotion(cand(forgetting, intervals), None, POLICY)
    assert d.promote is promote, d.reasons
    assert d.failed_checks == failed
    for f in failed:  # the reason names the metric, its interval and the limit
        reason = next(r for r in d.reasons if r.startswith(f))
        assert "limit" in reason and ("[" in reason or "not a finite" in reason)


def test_disabled_benchmark_limit_is_not_checked_but_still_counts_as_measured():
    policy = POLICY.model_copy(update={"max_benchmark_accuracy_drop": None})
    assert decide_promotion(cand({BENCH: 0.5}, {BENCH: (0.4, 0.6)}), None, policy).promote


def test_only_unbounded_forgetting_metrics_do_not_satisfy_the_requirement():
    d = decide_promotion(cand({"self_retention_perplexity_adapted": 30.0}, {}), None, POLICY)
    assert not d.promote and d.failed_checks == ["forgetting"]


@pytest.mark.parametrize("names, corpus, expected", [
    (["self_retention_perplexity_ratio", "self_retention_kl"], None,
     {"self_retention_perplexity_ratio": 1.13, "self_retention_kl": 0.5}),
    (["self_retention_perplexity_ratio", "self_retention_kl", "reference_kl"], None,
     {"self_retention_perplexity_ratio": 1.2, "self_retention_kl": None, "reference_kl": 0.5}),
    (["self_retention_kl"], True, {"self_retention_kl": None}),
    (["self_retention_kl"], False, {"self_retention_kl": 0.5}),
], ids=["probes alone", "beside a corpus", "a corpus, said", "no corpus, said"])
def test_the_probes_take_the_corpus_limits_only_when_they_stand_in_for_it(names, corpus, expected):
    from prefect_lora.lora_tasks.measurement.forgetting_table import forgetting_limits

    assert forgetting_limits(POLICY, names, corpus) == expected


def test_candidate_from_flat_metrics_reads_benchmark_intervals():
    flat = {"base_eval_loss": 2.0, "adapted_eval_loss": 1.5, f"{BENCH}_ci_low": -0.1, f"{BENCH}_ci_high": 0.2}
    c = candidate_from_metrics(flat, "eval_loss", False, {BENCH: 0.05})
    assert c.intervals[BENCH] == (-0.1, 0.2)
    assert BENCH in decide_promotion(c, None, POLICY).failed_checks


# ----------------------------------------------------------------------------- full fine-tuning views


def test_full_model_equal_to_its_base_forgets_nothing(tiny_model_dir, tmp_path):
    from prefect_lora.lora_tasks.modeling import load_base_model

    ref = tmp_path / "ref.txt"
    ref.write_text("General text about rivers and bridges.\nAnother line of ordinary prose.\n" * 5)
    bench = tmp_path / "mc.jsonl"
    bench.write_text("".join(json.dumps({"question": f"q{i}?", "choices": ["a", "bb", "c"], "answer": i % 3}) + "\n"
                             for i in range(6)))
    raw = _raw(path=str(ref), benchmarks=[str(bench)], max_tokens=200)
    raw["data"] = {"train_path": "x", "prompt_column": "prompt", "completion_column": "completion"}
    raw["training"] = {"max_steps": 1, "max_seq_length": 32, "method": "full"}
    raw["evaluation"]["bootstrap_samples"] = 50
    cfg = config_from_dict(raw)
    load_base_model(cfg.base_model.name_or_path, "causal_lm").save_pretrained(tmp_path / "full")  # "trained" = base
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(8)]
    report = evaluate_adapter(cfg, str(tmp_path / "full"), rows)
    assert report.method == "full"
    assert report.task_gain == pytest.approx(0.0, abs=1e-6)
    assert report.forgetting["reference_perplexity_ratio"] == pytest.approx(1.0, abs=1e-5)
    assert report.forgetting["reference_kl"] == pytest.approx(0.0, abs=1e-5)
    assert report.forgetting["benchmark_mc_accuracy_drop"] == 0.0
    assert report.intervals["benchmark_mc_accuracy_drop"] == [0.0, 0.0, 0.0]
    flat = report.flat_metrics()
    assert {"eval_seconds", "eval_forgetting_seconds", "reference_kl_ci_high", "task_gain_ci_low"} <= set(flat)


# ----------------------------------------------------------------------------- staged benchmark checks


def _staged_run(tmp_path, pattern: str, **promotion) -> tuple[dict, dict]:
    """A 600-question benchmark through `_measure_benchmarks` with `promotion.more_evidence`: per
    question of `pattern` (repeated), `+` base right and adapted wrong, `-` the reverse, `.` both right."""
    from prefect_lora.lora_tasks.measurement.forgetting import _measure_benchmarks, _Measurement

    tok = _Tok()
    x, y = tok(" x")["input_ids"][1], tok(" y")["input_ids"][1]
    kinds = {"+": (["x", "y"], 0), "-": (["x", "y"], 1), ".": (["z", "w"], 0)}
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}", "choices": kinds[c][0], "answer": kinds[c][1]}) + "\n"
                            for i, c in enumerate((pattern * 600)[:600])))
    raw = _raw(benchmarks=[str(path)], max_benchmark_questions=100)
    raw["promotion"] = {"more_evidence": 6, "max_benchmark_accuracy_drop": 0.05, **promotion}
    m = _Measurement(config_from_dict(raw), SeparateViews({"base": _Prefers(x), "adapted": _Prefers(y)}), tok, "cpu",
                     {"resamples": 200}, None)
    _measure_benchmarks(m)
    return m.metrics["adapted"], m.intervals["adapted"]


def test_a_clearly_harmless_adapter_stops_at_the_first_look(tmp_path):
    metrics, intervals = _staged_run(tmp_path, ".")
    assert metrics["benchmark_mc_questions"] == 100 and metrics["benchmark_mc_looks"] == 1
    assert intervals["benchmark_mc_accuracy_drop"] == [0.0, 0.0, 0.0]


def test_a_close_harmless_adapter_scores_more_questions_until_it_passes(tmp_path):
    metrics, intervals = _staged_run(tmp_path, "+....-....")  # 20% of answers changed, no drop
    point, _, high = intervals["benchmark_mc_accuracy_drop"]
    assert 100 < metrics["benchmark_mc_questions"] <= 600 and metrics["benchmark_mc_looks"] > 1
    assert point == pytest.approx(0.0, abs=0.01) and high <= 0.05  # shown within the limit
    # the fixed-size gate on the first 100 questions could not have shown it
    fixed, _ = _staged_run(tmp_path, "+....-....", more_evidence=None)
    assert fixed["benchmark_mc_questions"] == 100


def test_a_forgetting_adapter_stops_early_and_is_refused(tmp_path):
    metrics, intervals = _staged_run(tmp_path, "+.+..-....")  # drop 0.1, twice the limit
    decision = decide_promotion(
        Candidate("eval_loss", False, 2.0, 1.0, {"benchmark_mc_accuracy_drop": metrics["benchmark_mc_accuracy_drop"]},
                  intervals={"benchmark_mc_accuracy_drop": tuple(intervals["benchmark_mc_accuracy_drop"][1:])}),
        None, PromotionPolicy())
    assert metrics["benchmark_mc_questions"] < 600 and not decision.promote
    assert "benchmark_mc_accuracy_drop" in decision.failed_checks


# ----------------------------------------------------------------------------- staged probe checks


def _staged_probes(log_ratio: float, spread: float, limit: float = 1.2, **promotion) -> tuple[dict, dict, list]:
    """352 probes of 40 tokens through `_staged_comparison`: per probe, the adapted model's NLL
    exceeds the base's by `log_ratio` per token on average, with a per-probe spread `spread`."""
    import numpy as np
    from prefect_lora.lora_tasks.measurement.forgetting import _Measurement, _staged_comparison, staged_sizes

    rng = np.random.default_rng(0)
    diff = rng.normal(log_ratio, spread, 352) * 40
    raw = _raw(probes="general", max_probes=48)
    raw["promotion"] = {"more_evidence": 6, "max_self_retention_ratio": limit, "max_perplexity_ratio": None,
                        "max_kl": None, **promotion}
    cfg = config_from_dict(raw)
    m = _Measurement(cfg, SeparateViews({"base": None, "adapted": None}), None, "cpu", {"resamples": 200}, None)
    asked: list = []

    def units_of(items):
        asked.append(items)
        i = np.array(items)
        return {"tokens": np.full(len(i), 40.0), "nll": {"base": np.full(len(i), 80.0), "adapted": 80.0 + diff[i]},
                "kl": {"adapted": np.abs(diff[i]) / 10}}

    stages = staged_sizes(cfg, 352, 48, True)
    _staged_comparison(m, list(range(352)), stages, units_of, ["self_retention"])
    return m.metrics["adapted"], m.intervals["adapted"], asked


def test_probes_in_stages_score_more_probes_only_while_the_ratio_is_undecided():
    clear, clear_ci, asked = _staged_probes(0.0, 0.05)  # harmless, little spread: shown at once
    assert clear["self_retention_looks"] == 1 and asked == [list(range(48))]
    assert clear_ci["self_retention_perplexity_ratio"][2] < 1.2

    close, close_ci, asked = _staged_probes(0.12, 0.35)  # ratio ~1.13 under 1.2, too spread for 48 probes
    assert close["self_retention_looks"] > 1 and close_ci["self_retention_perplexity_ratio"][2] <= 1.2
    assert [a[0] for a in asked] == [0, *[a[-1] + 1 for a in asked[:-1]]], "each look adds the next probes, none twice"
    assert close["self_retention_tokens"] == 40 * (asked[-1][-1] + 1)
    _, fixed_ci, _ = _staged_probes(0.12, 0.35, more_evidence=None)
    assert fixed_ci["self_retention_perplexity_ratio"][2] > 1.2, "48 probes alone could not show it"

    bad, bad_ci, asked = _staged_probes(0.4, 0.35)  # ratio ~1.5: shown beyond the limit at the first look
    assert bad["self_retention_looks"] == 1 and bad_ci["self_retention_perplexity_ratio"][1] > 1.2
    assert bad["self_retention_perplexity_ratio"] == pytest.approx(bad_ci["self_retention_perplexity_ratio"][0])


def test_a_ratio_looked_at_as_a_mean_has_the_bootstrap_spread():
    import numpy as np
    from prefect_lora.lora_tasks.measurement import stats
    from prefect_lora.lora_tasks.measurement.sequential import _interval, ratio_values

    rng = np.random.default_rng(3)
    tokens = rng.integers(10, 80, 400).astype(float)
    kl = rng.gamma(2.0, 0.05, 400) * tokens
    values = ratio_values(kl, tokens)
    assert values.mean() == pytest.approx(kl.sum() / tokens.sum())
    boot = stats.ratio_ci(kl, tokens, resamples=4000, confidence=0.95, seed=0)
    normal = _interval(values, 1.959964)
    assert normal.high - normal.low == pytest.approx(boot.high - boot.low, rel=0.1)


def test_the_reference_corpus_is_staged_too_reading_more_of_the_file_only_while_undecided(changed_tiny, tiny_model_dir):
    from prefect_lora.lora_tasks.measurement.forgetting import _measure_corpus, _Measurement
    from prefect_lora.lora_tasks.modeling import load_tokenizer
    from prefect_lora.lora_tasks.training.views import PeftViews

    model = changed_tiny(seed=0, std=0.02)

    def measure(ratio_limit: float) -> dict:
        raw = _raw(path="configs/data/reference_general.txt", max_tokens=256)
        raw["training"]["max_seq_length"] = 32
        raw["promotion"] = {"more_evidence": 4, "max_perplexity_ratio": ratio_limit, "max_kl": None}
        m = _Measurement(config_from_dict(raw), PeftViews(model), load_tokenizer(tiny_model_dir), "cpu", {"resamples": 200}, None)
        _measure_corpus(m)
        return m.metrics["adapted"]

    clear = measure(100.0)
    assert clear["reference_looks"] == 1 and clear["reference_tokens"] <= 256 + 32
    close = measure(clear["reference_perplexity_ratio"])  # the limit at the estimate: undecided at every look
    assert close["reference_looks"] > 1 and 3 * clear["reference_tokens"] < close["reference_tokens"] <= 4 * 256 + 32
