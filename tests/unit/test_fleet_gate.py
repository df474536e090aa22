"""Many gates at once: the gate's p-value, Benjamini–Hochberg across a fleet's members, and the
share of wrongly promoted members on simulated fleets."""

import numpy as np
import pytest
from prefect_lora.lora_tasks.config import PromotionPolicy
from prefect_lora.lora_tasks.gate.decide import apply_outcome
from prefect_lora.lora_tasks.gate.promotion import (
    Candidate,
    FleetGate,
    apply_fleet_gate,
    decide_promotion,
    fdr_threshold,
)

POLICY = PromotionPolicy(min_task_gain=0.05, max_perplexity_ratio=1.2, max_kl=0.5)
Z = 1.959963984540054  # the 97.5% normal quantile: POLICY.confidence 0.95, two-sided


def candidate(gain: float, se: float, ratio=(1.0, 0.97, 1.03)) -> Candidate:
    """A loss candidate whose gain over base is `gain` with a normal 95% interval of `se`."""
    return Candidate("eval_loss", False, 2.0, 2.0 - gain, {"reference_perplexity_ratio": ratio[0], "reference_kl": 0.1},
                     "2", {"task_gain": (gain - Z * se, gain + Z * se), "reference_perplexity_ratio": ratio[1:]})


@pytest.mark.parametrize("gain", [0.0, 0.03, 0.05, 0.0899, 0.0901, 0.12, 0.3])
@pytest.mark.parametrize("ratio", [(1.0, 0.97, 1.03), (1.15, 1.1, 1.199), (1.15, 1.1, 1.21), (1.3, 1.25, 1.35)])
def test_gate_passes_exactly_when_its_p_value_is_within_the_one_sided_level(gain, ratio):
    d = decide_promotion(candidate(gain, 0.02, ratio), None, POLICY)
    assert 0.0 <= d.p_value <= 1.0
    assert d.promote == (d.p_value <= 0.025 + 1e-12), (d.p_value, d.reasons)


def test_p_value_follows_the_weakest_check():
    strong = decide_promotion(candidate(0.3, 0.02), None, POLICY).p_value
    weak_gain = decide_promotion(candidate(0.09, 0.02), None, POLICY).p_value
    weak_ratio = decide_promotion(candidate(0.3, 0.02, (1.15, 1.1, 1.199)), None, POLICY).p_value
    assert strong < 1e-6
    assert 0.01 < weak_gain < 0.03 and 0.01 < weak_ratio < 0.03  # each near the 0.025 line it just passes
    no_interval = Candidate("eval_loss", False, 2.0, 1.8, {"reference_perplexity_ratio": 1.0, "reference_kl": 0.1})
    assert decide_promotion(no_interval, None, POLICY).p_value == 0.0  # points only: pass or fail, nothing between


def test_a_refused_remedy_has_no_p_value_left():
    d = decide_promotion(candidate(0.3, 0.02), None, POLICY)
    refused = apply_outcome(d, {"needed": True, "chosen": None, "trials": [{"name": "scale=0.5"}], "closest": None})
    assert not refused.promote and refused.p_value == 1.0


@pytest.mark.parametrize("p_values, fdr, threshold", [
    ([0.001, 0.01, 0.03, 0.2], 0.05, 0.03),        # lines 0.0125, 0.025, 0.0375, 0.05: the 3rd is the last under
    ([0.02, 0.021, 0.022], 0.05, 0.022),           # step-up: the 1st is over its line, the 3rd under: all three
    ([0.03, 0.04, 0.5], 0.05, None),               # none under its line
    ([0.0, 0.9], 0.05, 0.0),                       # a p-value of 0 is always a discovery
    ([0.04], 0.05, 0.04),                          # one member: its own gate, at the fleet's level
    ([], 0.05, None),
])
def test_benjamini_hochberg_threshold(p_values, fdr, threshold):
    assert fdr_threshold(p_values, fdr) == threshold


def test_fleet_gate_holds_back_a_member_over_the_threshold_and_says_why():
    passed = decide_promotion(candidate(0.1, 0.02), None, POLICY)
    assert passed.promote and 0.001 < passed.p_value < 0.025
    held = apply_fleet_gate(passed, FleetGate(fdr=0.05, threshold=passed.p_value / 2, members=12))
    assert not held.promote and held.failed_checks == ["fleet_fdr"] and not held.admitted
    assert "Benjamini–Hochberg" in held.reasons[-1] and "12 member(s)" in held.reasons[-1]
    kept = apply_fleet_gate(passed, FleetGate(fdr=0.05, threshold=passed.p_value, members=12))
    assert kept.promote and kept.reasons[-1].startswith("fleet_fdr: gate p-value")
    refused = decide_promotion(candidate(0.0, 0.02), None, POLICY)
    assert apply_fleet_gate(refused, FleetGate(0.05, 1.0, 12)) == refused  # a refusal stays as its gate said
    none = apply_fleet_gate(passed, FleetGate(fdr=0.05, threshold=None, members=12))
    assert not none.promote and "threshold nothing" in none.reasons[-1]
    sure = decide_promotion(candidate(0.5, 0.01), None, POLICY)
    assert 0 < sure.p_value < 1e-30, "a clear pass keeps a p-value above 0 (the upper tail, not 1 - cdf)"


def simulate(fleets: int, nulls: int, goods: int, fdr: float | None, seed: int = 0) -> tuple[float, float]:
    """Mean share of wrongly promoted members among the promoted (the false discovery
    proportion, 0 when none promoted) and the share of good members promoted, over `fleets`
    simulated fleets. A null member's true gain sits exactly on the limit (the worst case a
    gate meets: it passes its own gate 2.5% of the time); a good one's is 4 standard errors
    above it. Every member goes through the real gate."""
    rng, se = np.random.default_rng(seed), 0.02
    truth = np.r_[np.full(nulls, POLICY.min_task_gain), np.full(goods, POLICY.min_task_gain + 4 * se)]
    fdp, power = [], []
    for _ in range(fleets):
        decisions = [decide_promotion(candidate(float(g), se), None, POLICY) for g in truth + rng.normal(0, se, truth.size)]
        if fdr is not None:
            gate = FleetGate(fdr, fdr_threshold([d.p_value for d in decisions], fdr), len(decisions))
            decisions = [apply_fleet_gate(d, gate) for d in decisions]
        promoted = np.array([d.promote for d in decisions])
        false = promoted[:nulls].sum()
        fdp.append(false / promoted.sum() if promoted.any() else 0.0)
        power.append(promoted[nulls:].mean())
    return float(np.mean(fdp)), float(np.mean(power))


def test_benjamini_hochberg_keeps_the_fleets_share_of_wrong_promotions_within_its_rate():
    """30 members at the limit and 10 good ones, 400 simulated fleets: each member's own gate
    alone lets ~0.75 null members through per fleet, ~7% of the promoted; across the fleet at a
    false discovery rate of 5% the share falls to at most 5% x 30/40, and most good members
    still promote."""
    alone, alone_power = simulate(400, nulls=30, goods=10, fdr=None)
    together, together_power = simulate(400, nulls=30, goods=10, fdr=0.05)
    assert alone > 0.055, alone
    assert together <= 0.05 * 30 / 40 + 0.01, together
    assert together < alone / 1.5
    assert alone_power > 0.95 and together_power > 0.6, (alone_power, together_power)
