"""A staged rollout's decisions (`deploy/rollout.py`): the exact test per signal, each look's
verdict on table-driven windows, the error rate of the whole rule on simulated equal versions;
and the gateway's controller (`deploy/rollout_control.py`) with its registry, Prefect and
webhook calls replaced (a clock of the test's own, no MLflow, no Ray)."""

from __future__ import annotations

import math
import random

import pytest
from prefect_lora.deploy.live_signals import LATENCY_BOUNDS_S, Tally
from prefect_lora.deploy.rollout import (
    FIRST_LOOK,
    SIGNALS,
    RolloutConfig,
    judge,
    plan,
    pooled_bucket,
    reference_bucket,
    thresholds,
    wilson,
    worse_p_value,
)
from prefect_lora.deploy.serve_core import ServeConfig, load_serve_config
from pydantic import ValidationError

CFG = RolloutConfig(steps=[0.1, 0.5, 1.0], min_requests=40, hold_s=30)


def window(n: int, errors: int = 0, failed: int = 0, truncated: int = 0, slow: int = 0, fast_s: float = 0.3,
           off_prompt: int = 0, unfinished: int = 0) -> Tally:
    """A version's counts: `n` requests, `slow` of them taking 5 s, the rest `fast_s`."""
    latency = [0] * (len(LATENCY_BOUNDS_S) + 1)
    latency[LATENCY_BOUNDS_S.index(5.0)] += slow
    latency[LATENCY_BOUNDS_S.index(fast_s)] += n - slow
    return Tally(requests=n, errors=errors, latency=latency, generated=n - errors, failed_checks=failed,
                 truncated=truncated, off_prompt=off_prompt, unfinished=unfinished)


# ----------------------------------------------------------------------------- config


@pytest.mark.parametrize("steps, ok", [
    ([0.05, 0.25, 1.0], True), ([1.0], True), ([0.5, 1.0], True),
    ([0.05, 0.25], False),          # never reaches all the traffic
    ([0.25, 0.05, 1.0], False),     # falls
    ([0.25, 0.25, 1.0], False),     # stalls
    ([0.0, 0.5, 1.0], False),       # a step with no traffic learns nothing
    ([], False),
    ([True, 1.0], False),           # a boolean is no share
])
def test_steps_rise_to_all_of_the_traffic(steps, ok):
    if ok:
        assert RolloutConfig(steps=steps).steps == steps
    else:
        with pytest.raises(ValidationError):
            RolloutConfig(steps=steps)


def test_the_rollout_is_off_unless_configured_and_the_example_config_reads(tmp_path):
    assert ServeConfig(model_name="m").rollout is None
    example = tmp_path / "serve.yaml"
    example.write_text("rollout: {steps: [0.05, 0.25, 1.0], min_requests: 200, hold_s: 60}\n")
    cfg = load_serve_config(example, model_name="m")
    assert cfg.rollout == RolloutConfig() and ServeConfig(**cfg.model_dump()).rollout == cfg.rollout
    with pytest.raises(ValueError, match="rollout.min_requests"):
        load_serve_config(example, model_name="m", rollout={"min_requests": 2})


# ----------------------------------------------------------------------------- the exact test


def _fisher_upper_tail(a: int, n1: int, b: int, n0: int) -> float:
    """P(X >= a), X hypergeometric: n1 draws from n1 + n0 holding a + b bad (by the definition)."""
    k, total = a + b, n1 + n0
    return sum(math.comb(k, x) * math.comb(total - k, n1 - x) for x in range(a, min(k, n1) + 1)) / math.comb(total, n1)


@pytest.mark.parametrize("a, n1, b, n0", [
    (5, 5, 0, 95), (5, 5, 2, 95), (1, 20, 0, 380), (2, 200, 4, 3800), (3, 20, 10, 380), (0, 10, 5, 90),
    (12, 40, 30, 360), (40, 40, 360, 360), (7, 9, 1, 1), (1, 1, 0, 1),
])
def test_the_worse_p_value_is_fishers_exact_upper_tail(a, n1, b, n0):
    assert worse_p_value(a, n1, b, n0) == pytest.approx(_fisher_upper_tail(a, n1, b, n0), rel=1e-9, abs=1e-15)


def test_the_exact_test_holds_its_level_on_rare_events_where_a_normal_approximation_does_not():
    """Both versions err 0.1% of the time: 2 errors of 200 against 4 of 3,800 is no evidence."""
    pooled_z = (2 / 200 - 4 / 3800) / math.sqrt(6 / 4000 * (1 - 6 / 4000) * (1 / 200 + 1 / 3800))
    assert pooled_z > 3.1  # a z-test would roll back at a look's boundary (p 0.00088 <=> z 3.13)
    assert worse_p_value(2, 200, 4, 3800) > 0.03


def test_wilson_intervals_hold_the_rate_and_stay_within_0_and_1():
    for bad, n in ((0, 5), (5, 5), (31, 50), (1, 1000)):
        low, high = wilson(bad, n)
        assert 0 <= low <= bad / n <= high <= 1


def test_the_latency_threshold_is_the_previous_versions_p95_before_the_step():
    assert LATENCY_BOUNDS_S[reference_bucket(window(100, slow=4))] == 0.3
    assert LATENCY_BOUNDS_S[reference_bucket(window(100, slow=6))] == 5.0
    assert reference_bucket(window(19)) is None  # too little history: the window's pooled p95 instead
    assert LATENCY_BOUNDS_S[pooled_bucket(window(20, slow=20), window(380))] == 0.3  # 95% of the 400 took 0.3 s
    # why not always pooled: once a slow version's slow requests pass 5% of the window, they are its p95
    slow, previous = window(18, slow=12), window(162, slow=2)
    assert judge(CFG, slow, previous, held_s=5, looked=1).action == "hold"
    referenced = judge(CFG, slow, previous, held_s=5, looked=1, latency_bucket=reference_bucket(window(100)))
    assert referenced.action == "rollback"


# ----------------------------------------------------------------------------- one look


def test_looks_are_planned_from_5_requests_up_to_min_requests_at_one_threshold():
    assert plan(CFG) == (5, 8, 12, 18, 27, 40)
    ts = thresholds(CFG)
    assert len(set(ts)) == 1  # Pocock: one boundary for every look
    share = 0.05 / (2 * len(SIGNALS))  # of a signal at a step
    assert share / len(ts) < ts[0] < share  # above Bonferroni over the looks, within the share


REFERENCE = LATENCY_BOUNDS_S.index(0.3)
"""The previous version's p95 bucket before the step (its requests took 0.3 s)."""
VERDICTS = [  # (what, new, old, held_s, looked, action, in the reason)
    ("too few requests for a look", window(4, failed=4), window(40), 99, -1, "hold", "4 of 40 requests"),
    ("every answer fails its check", window(5, failed=5), window(45, failed=1), 1, -1, "rollback",
     "output-check failures 1.00 [0.57, 1.00] vs 0.02 on the previous version 1, 5 requests vs 45"),
    ("as good, evidence planned, time held", window(40, failed=2, errors=1), window(360, failed=15, errors=3), 30, 4,
     "advance", "no signal worse at look 6 of 6 (40 requests vs 360)"),
    ("as good, evidence planned, time not held", window(45, failed=2), window(400, failed=15), 29, 3, "hold",
     "look 5 of 6"),
    ("as good, look already taken", window(30, failed=2), window(270, failed=15), 29, 4, "hold", "30 of 40 requests"),
    ("errors", window(12, errors=6), window(108, errors=1), 5, 1, "rollback", "errors (5xx) 0.50"),
    ("slow answers", window(18, slow=12), window(162, slow=2), 5, 1, "rollback",
     "requests slower than 0.3 s (the previous version's p95) 0.67 [0.44, 0.84] vs 0.01"),
    ("answers cut at max_tokens", window(27, truncated=20), window(243, truncated=20), 5, 1, "rollback",
     "answers cut at max_tokens 0.74"),
    ("answers cut short by an early end token", window(18, unfinished=14), window(162, unfinished=8), 5, 1, "rollback",
     "answers that stopped mid-sentence 0.78"),
    ("answers in another language", window(18, off_prompt=15), window(162, off_prompt=3), 5, 1, "rollback",
     "answers off their prompt (another language, or no value drawn from it) 0.83"),
    ("a little worse, not shown yet", window(12, failed=2), window(108, failed=4), 5, 1, "hold",
     "no signal worse at look 3"),
    ("no traffic on the previous version", window(12, failed=2), Tally(), 5, 1, "hold", "answered nothing"),
]


@pytest.mark.parametrize("what, new, old, held_s, looked, action, needle", VERDICTS, ids=[v[0] for v in VERDICTS])
def test_a_look_holds_advances_or_rolls_back(what, new, old, held_s, looked, action, needle):
    verdict = judge(CFG, new, old, held_s=held_s, looked=looked, previous="1", latency_bucket=REFERENCE)
    assert verdict.action == action, verdict.reason
    assert needle in verdict.reason
    if action == "rollback":
        assert verdict.reason.startswith("rollback: ") and verdict.worst.p_value <= thresholds(CFG)[0]


def _simulated_rollout(rng: random.Random, cfg: RolloutConfig, bad: dict[str, float]) -> str:
    """One rollout of a new version whose rates are `bad` (the previous one's: `EQUAL`), requests
    arriving one at a time, a look judged after each; how it ended."""
    for share in cfg.steps[:-1]:
        new, old, looked, t = Tally(), Tally(), -1, 0.0
        reference = reference_bucket(window(100, slow=5))
        while True:
            t += 0.1
            mine = rng.random() < share
            rates = bad if mine else EQUAL
            one = window(1, errors=rng.random() < rates["errors"], slow=rng.random() < rates["slow"])
            one.failed_checks = one.truncated = 0
            if not one.errors:
                one.failed_checks, one.truncated = rng.random() < rates["checks"], rng.random() < rates["truncated"]
            new, old = (new + one, old) if mine else (new, old + one)
            verdict = judge(cfg, new, old, held_s=t, looked=looked, latency_bucket=reference)
            looked = verdict.look if verdict.look is not None else looked
            if verdict.action == "rollback":
                return "rolled back"
            if verdict.action == "advance":
                break
    return "completed"


EQUAL = {"errors": 0.02, "checks": 0.05, "truncated": 0.1, "slow": 0.05}


def test_versions_as_good_as_the_previous_are_rarely_rolled_back_and_a_broken_one_always():
    """The whole rule (every step, signal and look) at a false-rollback rate of 20%, so that 300
    rollouts measure it: at most 20% (here well within), and a version failing 60% of its output
    checks is rolled back every time, at the first steps' looks."""
    cfg = RolloutConfig(steps=[0.2, 0.5, 1.0], min_requests=30, hold_s=0, false_rollback_rate=0.2)
    rng = random.Random(7)
    ends = [_simulated_rollout(rng, cfg, EQUAL) for _ in range(300)]
    false_rollbacks = ends.count("rolled back") / len(ends)
    assert false_rollbacks <= 0.2
    assert ends.count("completed") + ends.count("rolled back") == len(ends)
    broken = [_simulated_rollout(rng, cfg, {**EQUAL, "checks": 0.6}) for _ in range(50)]
    assert broken.count("rolled back") == 50


def test_a_first_look_at_a_broken_version_is_taken_at_5_requests():
    verdict = judge(RolloutConfig(), window(FIRST_LOOK, failed=FIRST_LOOK), window(95), held_s=1, looked=-1)
    assert verdict.action == "rollback" and verdict.look == 0
