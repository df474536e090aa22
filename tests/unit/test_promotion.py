import math

import pytest
from prefect_lora.lora_tasks.config import PromotionPolicy
from prefect_lora.lora_tasks.gate.promotion import Candidate, decide_promotion

POLICY = PromotionPolicy(min_task_gain=0.05, max_perplexity_ratio=1.2, max_kl=0.5, champion_tolerance=0.0)
GOOD_FORGETTING = {"reference_perplexity_ratio": 1.05, "reference_kl": 0.1}


def loss_candidate(base=2.0, adapted=1.5, forgetting=GOOD_FORGETTING, version="2"):
    return Candidate("eval_loss", False, base, adapted, dict(forgetting), version)


def acc_candidate(base=0.5, adapted=0.8, forgetting=None, version="2"):
    return Candidate("accuracy", True, base, adapted, forgetting or {"reference_retrieval_loss": 0.1}, version)


# (name, candidate, champion, promote, failed checks)
CASES = [
    ("sound adapter, no champion", loss_candidate(), None, True, []),
    ("gain below minimum", loss_candidate(adapted=1.99), None, False, ["task_gain"]),
    ("worse than base", loss_candidate(adapted=2.5), None, False, ["task_gain"]),
    ("perplexity ratio too high", loss_candidate(forgetting={"reference_perplexity_ratio": 1.5, "reference_kl": 0.1}), None, False, ["reference_perplexity_ratio"]),
    ("kl too high", loss_candidate(forgetting={"reference_perplexity_ratio": 1.0, "reference_kl": 0.9}), None, False, ["reference_kl"]),
    ("both forgetting limits broken", loss_candidate(forgetting={"reference_perplexity_ratio": 3.0, "reference_kl": 2.0}), None, False, ["reference_perplexity_ratio", "reference_kl"]),
    ("no forgetting measured", loss_candidate(forgetting={}), None, False, ["forgetting"]),
    ("nan adapted metric", loss_candidate(adapted=math.nan), None, False, ["task_gain"]),
    ("missing base metric", loss_candidate(base=None), None, False, ["task_gain"]),
    ("nan forgetting", loss_candidate(forgetting={"reference_perplexity_ratio": math.nan, "reference_kl": 0.1}), None, False, ["reference_perplexity_ratio"]),
    ("inf kl", loss_candidate(forgetting={"reference_perplexity_ratio": 1.0, "reference_kl": math.inf}), None, False, ["reference_kl"]),
    ("beats champion", loss_candidate(adapted=1.4), loss_candidate(adapted=1.5, version="1"), True, []),
    ("ties champion", loss_candidate(adapted=1.5), loss_candidate(adapted=1.5, version="1"), True, []),
    ("worse than champion though better than base", loss_candidate(adapted=1.6), loss_candidate(adapted=1.5, version="1"), False, ["champion"]),
    ("champion without metric is not compared", loss_candidate(), loss_candidate(adapted=None, version="1"), True, []),
    ("classifier better", acc_candidate(), acc_candidate(adapted=0.75, version="1"), True, []),
    ("classifier worse than champion", acc_candidate(adapted=0.7), acc_candidate(adapted=0.75, version="1"), False, ["champion"]),
    ("classifier forgets how to retrieve", acc_candidate(forgetting={"reference_retrieval_loss": 0.85}), None, False, ["reference_retrieval_loss"]),
]


@pytest.mark.parametrize("name, candidate, champion, promote, failed", CASES, ids=[c[0] for c in CASES])
def test_promotion_table(name, candidate, champion, promote, failed):
    decision = decide_promotion(candidate, champion, POLICY)
    assert decision.promote is promote
    assert decision.failed_checks == failed
    assert len(decision.reasons) >= 2  # every check that ran says why


def test_tolerance_admits_small_regression():
    policy = POLICY.model_copy(update={"champion_tolerance": 0.2})
    d = decide_promotion(loss_candidate(adapted=1.6), loss_candidate(adapted=1.5, version="1"), policy)
    assert d.promote


def test_forgetting_optional_when_policy_allows():
    policy = POLICY.model_copy(update={"require_forgetting_metrics": False})
    assert decide_promotion(loss_candidate(forgetting={}), None, policy).promote


def test_disabled_limit_is_not_checked():
    policy = POLICY.model_copy(update={"max_kl": None})
    d = decide_promotion(loss_candidate(forgetting={"reference_perplexity_ratio": 1.0, "reference_kl": 99.0}), None, policy)
    assert d.promote


def test_reasons_name_numbers():
    d = decide_promotion(loss_candidate(adapted=1.99), None, POLICY)
    assert any("0.01" in r and "0.05" in r for r in d.reasons)


def test_candidate_from_logged_metrics():
    from prefect_lora.lora_tasks.gate.promotion import candidate_from_metrics

    c = candidate_from_metrics({"base_eval_loss": 2.0, "adapted_eval_loss": 1.5, "other": 9.0}, "eval_loss", False,
                               GOOD_FORGETTING, "3")
    assert c == loss_candidate(version="3")
    missing = candidate_from_metrics({}, "accuracy", True)
    assert missing.task_gain is None
    assert not decide_promotion(missing, None, POLICY).promote


# Intervals: the gate reads bounds, not points.
def with_intervals(c: Candidate, **intervals) -> Candidate:
    from dataclasses import replace

    return replace(c, intervals=intervals)


INTERVAL_CASES = [
    ("gain clearly above the minimum", dict(task_gain=(0.3, 0.7)), None, True, []),
    ("gain straddles the minimum (noise)", dict(task_gain=(0.01, 0.9)), None, False, ["task_gain"]),
    ("ppl ratio point fine, upper bound over the limit",
     dict(task_gain=(0.3, 0.7), reference_perplexity_ratio=(1.0, 1.3)), None, False, ["reference_perplexity_ratio"]),
    ("kl interval within the limit", dict(task_gain=(0.3, 0.7), reference_kl=(0.05, 0.2)), None, True, []),
    ("nan bound never promotes", dict(task_gain=(math.nan, 0.7)), None, False, ["task_gain"]),
    ("not worse than the champion on the same data",
     dict(task_gain=(0.3, 0.7), champion_delta=(0.0, 0.2)), loss_candidate(adapted=1.5, version="1"), True, []),
    ("maybe worse than the champion on the same data, though better than base",
     dict(task_gain=(0.3, 0.7), champion_delta=(-0.2, 0.1)), loss_candidate(adapted=9.0, version="1"), False, ["champion"]),
]


@pytest.mark.parametrize("name,intervals,champion,promote,failed", INTERVAL_CASES, ids=[c[0] for c in INTERVAL_CASES])
def test_gate_compares_intervals(name, intervals, champion, promote, failed):
    d = decide_promotion(with_intervals(loss_candidate(), **intervals), champion, POLICY)
    assert d.promote is promote, d.reasons
    assert d.failed_checks == failed


def test_candidate_from_flat_metrics_reads_the_intervals():
    from prefect_lora.lora_tasks.gate.promotion import candidate_from_metrics

    flat = {"base_eval_loss": 2.0, "adapted_eval_loss": 1.5, "task_gain_ci_low": 0.4, "task_gain_ci_high": 0.6,
            "reference_kl_ci_low": 0.1, "reference_kl_ci_high": 0.2, "champion_delta_ci_low": -0.1}
    c = candidate_from_metrics(flat, "eval_loss", False, {"reference_kl": 0.15})
    assert c.intervals == {"task_gain": (0.4, 0.6), "reference_kl": (0.1, 0.2)}  # a half interval is no interval


def test_every_forgetting_metric_names_a_policy_field_and_a_measured_source():
    """The one table of forgetting metrics stays whole: each row's limit is a policy field and its
    source is one that evaluation measures."""
    from prefect_lora.lora_tasks.config import PromotionPolicy
    from prefect_lora.lora_tasks.measurement import forgetting
    from prefect_lora.lora_tasks.measurement.forgetting_table import FORGETTING_METRICS, forgetting_limits

    fields = set(PromotionPolicy.model_fields)
    assert {m.limit for m in FORGETTING_METRICS} - {None} <= fields
    assert {m.stands_in for m in FORGETTING_METRICS} - {None} <= fields
    assert all(m.limit or m.stands_in for m in FORGETTING_METRICS), "every row is bounded by some field"
    assert {m.source for m in FORGETTING_METRICS} <= set(forgetting.SOURCES)
    limits = forgetting_limits(PromotionPolicy(max_benchmark_accuracy_drop=0.1),
                               ["benchmark_arc_accuracy_drop", "self_retention_kl", "reference_kl"])
    assert limits == {"benchmark_arc_accuracy_drop": 0.1, "self_retention_kl": None, "reference_kl": 0.5}


@pytest.mark.parametrize("promote, failed, admitted", [
    (True, [], True), (False, ["champion"], True), (False, ["task_gain"], False),
    (False, ["reference_kl"], False), (False, ["champion", "reference_kl"], False),
])
def test_only_a_version_fit_to_serve_is_admitted_as_challenger(promote, failed, admitted):
    from prefect_lora.lora_tasks.gate.promotion import Decision

    assert Decision(promote, ["r"], failed).admitted is admitted


@pytest.mark.parametrize("point, interval, outcome", [
    (0.015, (0.0, 0.03), "pass"), (0.075, (0.06, 0.09), "fail"), (0.025, (-0.05, 0.125), "undecided")])
def test_each_check_passes_fails_or_is_undecided_with_the_evidence_it_needs(point, interval, outcome):
    """A 40-question benchmark: a drop of 0.025 [-0.05, 0.125] against a limit of 0.05 is not
    forgetting seen but too little evidence, and says how much more would decide it."""
    from prefect_lora.lora_tasks.gate.promotion import Candidate

    bench = "benchmark_quiz_accuracy_drop"
    cand = Candidate("eval_loss", False, 2.0, 1.5, {bench: point}, "2", {"task_gain": (0.3, 0.7), bench: interval})
    d = decide_promotion(cand, None, PromotionPolicy(max_benchmark_accuracy_drop=0.05, min_task_gain=0.05))
    reason = next(r for r in d.reasons if r.startswith(bench))
    assert d.promote is (outcome == "pass")
    assert (bench in d.undecided_checks) is (outcome == "undecided") and (bench in d.failed_checks) is (outcome != "pass")
    if outcome == "undecided":
        assert "straddles the limit 0.05: undecided" in reason and "may exceed" not in reason
        assert "about 16.0x the benchmark questions would decide it" in reason  # (0.1 / 0.025)^2, the limit's side
    if outcome == "fail":
        assert "forgetting shown" in reason


@pytest.mark.parametrize("gain, outcome", [((0.1, 0.3), "pass"), ((-0.2, 0.02), "fail"), ((0.0, 0.2), "undecided")])
def test_task_gain_has_three_outcomes_too(gain, outcome):
    from prefect_lora.lora_tasks.gate.promotion import Candidate

    cand = Candidate("eval_loss", False, 2.0, 2.0 - sum(gain) / 2, {}, "2", {"task_gain": gain})
    d = decide_promotion(cand, None, PromotionPolicy(min_task_gain=0.05, require_forgetting_metrics=False))
    assert d.promote is (outcome == "pass") and ("task_gain" in d.undecided_checks) is (outcome == "undecided")


BENCH = "benchmark_quiz_accuracy_drop"
# (label, point, interval, what the reason says of more evidence) against a drop limit of 0.05
EVIDENCE_CASES = [
    ("far from deciding", 0.025, (-0.05, 0.125), "about 16.0x the benchmark questions would decide it at this estimate"),
    ("a bound just past the limit: at least one more look", 0.04, (0.0, 0.051),
     "one more look, 1.5x the benchmark questions, would decide it at this estimate"),
    ("an asymmetric interval once read 1.0x", 0.02, (0.015, 0.06), "about 1.8x the benchmark questions would decide it"),
    ("just within the limit and wide", 0.049, (0.0, 0.1),
     "the estimate sits near the limit: more benchmark questions are unlikely to decide it (about 2601x would)"),
    ("just past the limit and wide", 0.052, (-0.01, 0.1), "the estimate sits near the limit"),
    ("on the limit", 0.05, (0.0, 0.1), "the estimate sits on the limit: no number of benchmark questions decides it"),
]


@pytest.mark.parametrize("label, point, interval, says", EVIDENCE_CASES, ids=[c[0] for c in EVIDENCE_CASES])
def test_an_undecided_check_names_an_honest_amount_of_evidence(label, point, interval, says):
    """Never "about 1.0x" (which reads as "you have enough"): at least one more look's growth
    (`sequential.looks`), and no amount at all where the estimate sits at the limit's edge."""
    from prefect_lora.lora_tasks.measurement.sequential import LOOK_GROWTH, looks

    cand = Candidate("eval_loss", False, 2.0, 1.5, {BENCH: point}, "2", {"task_gain": (0.3, 0.7), BENCH: interval})
    d = decide_promotion(cand, None, PromotionPolicy(max_benchmark_accuracy_drop=0.05, min_task_gain=0.05))
    reason = next(r for r in d.reasons if r.startswith(BENCH))
    assert BENCH in d.undecided_checks and "straddles the limit 0.05: undecided" in reason
    assert says in reason, reason
    assert "1.0x" not in reason and "about 1.1x" not in reason
    assert looks(100, 1000)[1] == 100 * LOOK_GROWTH, "the floor is the growth of the next look"


# (label, higher is better, base, adapted, gain interval, reads, never reads)
GAIN_CASES = [
    ("accuracy fell", True, 0.5, 0.406, (-0.15, -0.04), "task_gain: accuracy changed by -0.094 [-0.15, -0.04] over base",
     "improved"),
    ("accuracy rose", True, 0.5, 0.7, (0.1, 0.3), "task_gain: accuracy improved by 0.2 [0.1, 0.3] over base", "changed"),
    ("no change", True, 0.5, 0.5, (-0.1, 0.1), "task_gain: accuracy changed by 0 [-0.1, 0.1] over base", "improved"),
    ("loss rose", False, 2.0, 2.1, (-0.2, 0.0),
     "task_gain: eval_loss changed by -0.1 [-0.2, 0] over base (a gain: lower eval_loss is better, so it rose)", "improved"),
    ("loss fell", False, 2.0, 1.5, (0.3, 0.7), "task_gain: eval_loss improved by 0.5 [0.3, 0.7] over base", "rose"),
]


@pytest.mark.parametrize("label, higher, base, adapted, interval, reads, never", GAIN_CASES, ids=[c[0] for c in GAIN_CASES])
def test_a_negative_gain_never_reads_as_an_improvement(label, higher, base, adapted, interval, reads, never):
    cand = Candidate("accuracy" if higher else "eval_loss", higher, base, adapted, {}, "2", {"task_gain": interval})
    d = decide_promotion(cand, None, PromotionPolicy(min_task_gain=0.05, require_forgetting_metrics=False))
    reason = next(r for r in d.reasons if r.startswith("task_gain"))
    assert reason.startswith(reads), reason
    assert never not in reason


def test_an_adapter_that_predicts_what_the_baseline_predicts_shows_no_gain_even_over_zero():
    """A shuffled-label classifier that learned only the majority class: every eval row's paired
    difference is 0, so its gain interval is [0, 0]. That is no gain, whatever `min_task_gain: 0` says."""
    from prefect_lora.lora_tasks.config import PromotionPolicy

    same = Candidate("accuracy", True, 0.509, 0.509, {"reference_retrieval_loss": 0.05}, None,
                     {"task_gain": (0.0, 0.0), "reference_retrieval_loss": (-0.05, 0.14)})
    decision = decide_promotion(same, None, PromotionPolicy())
    assert not decision.promote and decision.failed_checks == ["task_gain"]
    assert "not above the required 0" in decision.reasons[0] and decision.p_value == 1.0
    better = Candidate("accuracy", True, 0.8, 0.85, {"reference_retrieval_loss": 0.05}, None,
                       {"task_gain": (0.02, 0.08), "reference_retrieval_loss": (-0.05, 0.14)})
    assert decide_promotion(better, None, PromotionPolicy()).promote
