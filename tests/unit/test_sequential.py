"""The staged gate check (lora_tasks/measurement/sequential.py): its error over all looks, and what it saves."""

from __future__ import annotations

from itertools import pairwise
from statistics import NormalDist

import numpy as np
import pytest
from prefect_lora.lora_tasks.measurement import sequential

STAGES = sequential.looks(50, 400)


def test_looks_grow_to_the_budget():
    assert STAGES == [50, 75, 113, 170, 255, 383, 400]
    assert sequential.looks(10, 10) == [10]


def test_boundaries_spend_the_error_over_the_looks():
    z = sequential.boundaries(tuple(STAGES), 0.025)
    fixed = NormalDist().inv_cdf(0.975)
    assert all(a > b for a, b in pairwise(z))  # O'Brien-Fleming: wide early
    assert z[-1] > fixed and z[-1] < fixed * 1.1  # and close to the fixed-size interval at the end
    assert sequential.boundaries((100,), 0.025)[0] == pytest.approx(fixed, abs=0.01)


def _gates(delta: float, n: int = 1500, seed: int = 0) -> list[sequential.Staged]:
    rng = np.random.default_rng(seed)
    return [sequential.staged_check(rng.normal(delta, 1.0, STAGES[-1]), 0.2, True, STAGES, 0.95) for _ in range(n)]


def test_an_adapter_at_the_limit_passes_at_most_the_planned_error_however_many_looks():
    runs = _gates(0.2)
    rate = np.mean([r.outcome == "pass" for r in runs])
    assert rate <= 0.025 + 3 * np.sqrt(0.025 * 0.975 / len(runs)), rate
    # the same looks with the fixed-size interval, re-tested until it passes, promote far more often
    rng = np.random.default_rng(0)
    z = NormalDist().inv_cdf(0.975)
    retest = []
    for _ in range(1500):
        v = rng.normal(0.2, 1.0, STAGES[-1])
        retest.append(any(v[:n].mean() + z * v[:n].std(ddof=1) / np.sqrt(n) <= 0.2 for n in STAGES))
    assert np.mean(retest) > 0.05 > rate


def test_clear_cases_stop_early_and_harmless_ones_mostly_pass():
    clear_pass, harmless, clear_fail = _gates(-0.2, 300), _gates(0.0, 300), _gates(0.5, 300)
    assert all(r.outcome == "pass" for r in clear_pass) and np.mean([r.units for r in clear_pass]) < 0.5 * STAGES[-1]
    assert np.mean([r.outcome == "pass" for r in harmless]) > 0.8
    assert not any(r.outcome == "pass" for r in clear_fail) and np.mean([r.units for r in clear_fail]) < 100
    assert any(r.futile for r in clear_fail)
