"""More evidence when it is close: a staged gate check whose error rate holds over all its looks.

A fixed-size interval looked at again after more rows were scored is no longer a 95% interval:
re-testing until it passes promotes a harmful adapter far more often than the confidence says
(bench/gate_simulation.py measures it). A group-sequential check plans its looks (`looks`: the
units scored when it looks) and widens each look's interval by a boundary that spends the error
over all of them: the chance that any look passes an adapter at the limit stays within
`(1 - confidence) / 2`, the one-sided error of the fixed-size gate.

Boundaries follow the Wang-Tsiatis family (`shape` 0: O'Brien-Fleming, wide early and close to
the fixed interval at the end; 0.5: Pocock, equal at every look), scaled so that a null path
crosses with the planned chance; the scale is the quantile of the boundary-scaled maximum of a
Brownian path at the looks, computed by simulation with a fixed seed (same looks, same figures).
A check stops at the first look whose interval lies within its limit (pass) or beyond it (fail:
shown at the same error); it also stops, undecided, when its estimate is already well past the limit
before the last look (futility: it would very likely end undecided, and scoring on cannot
promote anything). Pure numpy, no I/O.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .stats import Interval, check_outcome

LOOK_GROWTH = 1.5
"""How much each look of a staged check grows the evidence over the one before (`looks`): the
least that "more evidence" can mean, so the least multiple an undecided check's reason names."""
SHAPE = 0.0
"""Wang-Tsiatis shape of the boundaries (0: O'Brien-Fleming)."""
FUTILITY = 0.5
"""A check stops early, undecided, once its estimate lies this many standard errors past the limit."""


def looks(first: int, budget: int, growth: float = LOOK_GROWTH) -> list[int]:
    """Sample sizes at which to look: `first`, then growing by `growth`, ending at `budget`."""
    out, n = [], max(2, first)
    while n < budget:
        out.append(n)
        n = max(n + 1, math.ceil(n * growth))
    return [*out, budget]


@lru_cache(maxsize=64)
def boundaries(stages: tuple[int, ...], alpha: float, shape: float = SHAPE, paths: int = 400_000) -> tuple[float, ...]:
    """Critical z of each look: `c_k = C * t_k ** (shape - 1/2)` (t_k = n_k / n_K), `C` such
    that a null path crosses some look's boundary with chance `alpha`."""
    t = np.asarray(stages, dtype=float) / stages[-1]
    rng = np.random.default_rng(20261201)
    steps = rng.standard_normal((paths, len(t))) * np.sqrt(np.diff(np.concatenate([[0.0], t])))
    z = np.cumsum(steps, axis=1) / np.sqrt(t)
    scale = (z / t ** (shape - 0.5)).max(axis=1)  # crossing look k <=> z_k > C t_k^(shape - 1/2)
    c = float(np.quantile(scale, 1 - alpha))
    return tuple(float(x) for x in c * t ** (shape - 0.5))


@dataclass(frozen=True)
class Staged:
    """A staged check's end: its outcome, the units it spent, the interval it stopped on and why."""

    outcome: str
    units: int
    interval: Interval
    looks: int
    futile: bool = False
    """Stopped before the budget because its estimate was already past the limit."""


def _interval(values: np.ndarray, z: float) -> Interval:
    n = len(values)
    mean = float(values.mean())
    half = z * float(values.std(ddof=1)) / math.sqrt(n) if n > 1 else math.inf
    return Interval(mean, mean - half, mean + half)


def outcome(interval: Interval, limit: float, upper_is_worse: bool) -> str:
    """`pass`, `fail` or `undecided`, read exactly as the fixed-size gate reads an interval."""
    return check_outcome((interval.low, interval.high), limit, upper_is_worse)


def look(values: np.ndarray, k: int, stages: list[int], limit: float, upper_is_worse: bool,
         confidence: float) -> Staged | None:
    """Look `k` (0-based) at the first `stages[k]` of `values` (per-unit differences in scoring
    order): the check's end when this look decides it, is the last, or finds it futile; None
    to score on to the next stage."""
    z = boundaries(tuple(stages), (1 - confidence) / 2)[k]
    interval = _interval(values[: stages[k]], z)
    result = outcome(interval, limit, upper_is_worse)
    se = (interval.high - interval.low) / (2 * z)
    past = (interval.point - FUTILITY * se > limit) if upper_is_worse else (interval.point + FUTILITY * se < limit)
    last = k == len(stages) - 1
    if result != "undecided" or last or past:
        return Staged(result, stages[k], interval, k + 1, futile=result == "undecided" and not last)
    return None


def ratio_values(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """Per-unit values whose mean is the ratio `sum(num) / sum(den)` and whose spread is the
    ratio's (linearised: `r + (num - r den) / mean(den)`): a ratio estimator (mean KL or log
    perplexity ratio per token over blocks) looked at as a mean."""
    r = num.sum() / den.sum()
    return r + (num - r * den) / den.mean()


def staged_check(values: np.ndarray, limit: float, upper_is_worse: bool, stages: list[int], confidence: float) -> Staged:
    """Every look of a check over `values` (at least `stages[-1]` of them) up to the one that ends it."""
    for k in range(len(stages)):
        if (end := look(values, k, stages, limit, upper_is_worse, confidence)) is not None:
            return end
    raise ValueError("stages is empty")
