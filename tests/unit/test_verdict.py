"""A run's outcome in one sentence (the flow run's state message) and its evaluation in one log line."""

from __future__ import annotations

import pytest
from prefect_lora.lora_tasks.gate.promotion import Decision
from prefect_lora.lora_tasks.gate.verdict import evaluation_line, headline
from prefect_lora.lora_tasks.measurement.evaluation import EvalReport
from prefect_lora.lora_tasks.measurement.stats import figure
from prefect_lora.lora_tasks.registry.lifecycle import Repeat, skip_headline


def json_report(**kw) -> EvalReport:
    """The demo's shape: exact match (higher is better), forgetting on the probes."""
    return EvalReport(
        task="causal_lm", primary_metric="exact_match", higher_is_better=True,
        base={"exact_match": 0.0}, adapted={"exact_match": 0.8518518518518519},
        forgetting={"self_retention_perplexity_ratio": 0.8891234567, "reference_kl": 0.069012345678,
                    "self_retention_tokens": 5123.0},
        intervals={"task_gain": [0.8518518518518519, 0.7592592592592593, 0.9444444444444444],
                   "self_retention_perplexity_ratio": [0.8891234567, 0.8761234, 0.90612345],
                   "reference_kl": [0.069012345678, 0.06512345, 0.07412345]},
        eval_rows=54, **kw)


PROMOTED = Decision(True, ["all passed"], [])


@pytest.mark.parametrize("x, shown", [
    (0.02863230957036924, "0.0286"), (4.81064, "4.81"), (266.7975481728748, "267"), (15210.3, "15,200"),
    (-0.6107, "-0.611"), (1.0, "1"), (0.1, "0.1"), (float("nan"), "nan"),
])
def test_a_figure_has_three_significant_digits(x, shown):
    assert figure(x) == shown
    assert figure(x, 0.5632, 0.658) == f"{shown} [0.563, 0.658]"


GAIN = "exact_match +0.852 [0.759, 0.944]"
WITHIN = "forgetting within limits (self_retention_perplexity_ratio 0.889, reference_kl 0.069)"


@pytest.mark.parametrize("decision, kw, outcome, forgetting", [
    (PROMOTED, {"version": "3"}, "v3 promoted", WITHIN),
    (Decision(False, [], ["task_gain", "champion"]), {"version": "4"}, "v4 not promoted (failed: task_gain, champion)",
     WITHIN),
    (Decision(False, [], ["reference_kl"]), {"version": "5"}, "v5 not promoted (failed: reference_kl)",
     "forgetting shown: reference_kl 0.069 [0.0651, 0.0741]"),
    (Decision(False, [], ["self_retention_perplexity_ratio"], ["self_retention_perplexity_ratio"]), {"version": "6"},
     "v6 not promoted (undecided: self_retention_perplexity_ratio)",
     "forgetting undecided: self_retention_perplexity_ratio 0.889 [0.876, 0.906]"),
    (Decision(True, [], [], p_value=0.00123456), {"held": True}, "held for the fleet's gate (p-value 0.00123)", WITHIN),
], ids=["promoted", "refused for its gain", "forgetting shown", "undecided", "held for a fleet"])
def test_the_headline_names_the_decision_the_gain_and_the_forgetting(decision, kw, outcome, forgetting):
    assert headline("demo-orders", json_report(), decision, **kw) == f"demo-orders {outcome}: {GAIN}; {forgetting}"


def test_a_loss_that_fell_reads_as_a_negative_change_and_a_baseline_as_not_registered():
    loss = EvalReport(task="causal_lm", primary_metric="eval_loss", higher_is_better=False, base={"eval_loss": 5.4681},
                      adapted={"eval_loss": 4.8574}, forgetting={}, intervals={"task_gain": [0.6107, 0.5632, 0.658]},
                      method="full", eval_rows=60)
    assert headline("tiny-sums", loss) == ("tiny-sums full fine-tuning baseline (not registered): "
                                           "eval_loss -0.611 [-0.658, -0.563]; no forgetting measured")


def test_the_evaluation_line_gives_base_adapted_champion_and_forgetting_with_intervals():
    r = json_report(champion={"exact_match": 0.7777777}, champion_version="2", adapter_scale=0.8, evidence="confirm")
    assert evaluation_line(r) == (
        "54 confirm rows, the adapter at scale 0.8: exact_match 0 → 0.852 (+0.852 [0.759, 0.944]); champion (version 2) "
        "0.778; forgetting self_retention_perplexity_ratio 0.889 [0.876, 0.906], reference_kl 0.069 [0.0651, 0.0741]")


def test_a_skipped_run_names_the_version_it_repeats():
    assert skip_headline("m", Repeat("3", champion=True)) == \
        "m skipped: no new data (champion version 3 has the same data and config)"
    assert skip_headline("m", Repeat("4", champion=False, decision="not promoted")).endswith(
        "(version 4 has the same data and config)")
