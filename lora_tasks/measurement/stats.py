"""Bootstrap confidence intervals, so the promotion gate compares intervals and not noisy points.

Every metric here is an estimator over per-example (or per-block) values; an interval comes from
resampling those units with replacement. Differences (adapted - base, challenger - champion) are
resampled *paired*: the same units for both sides, which is what makes a small gain detectable.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Interval:
    """A point estimate and its two-sided percentile-bootstrap interval."""

    point: float
    low: float
    high: float

    def to_list(self) -> list[float]:
        return [self.point, self.low, self.high]

    def __str__(self) -> str:
        return f"{self.point:.4g} [{self.low:.4g}, {self.high:.4g}]"


def figure(point: float, low: float | None = None, high: float | None = None) -> str:
    """A figure as a sentence shows it (a log line, a run's state message): 3 significant digits
    (`0.0286`, `4.81`, `267`, `1,230`), its interval in brackets when given (`0.611 [0.563, 0.658]`)."""
    shown = _rounded(point)
    return shown if low is None or high is None else f"{shown} [{_rounded(low)}, {_rounded(high)}]"


def _rounded(x: float) -> str:
    if not isinstance(x, (int, float)) or not math.isfinite(x):
        return str(x)
    v = float(f"{x:.3g}")
    return f"{v:,.0f}" if abs(v) >= 1000 else f"{v:g}"


def bootstrap(
    estimator: Callable[[np.ndarray], float], n_units: int, *, resamples: int = 1000, confidence: float = 0.95, seed: int = 0,
    batched: bool = False,
) -> Interval:
    """Percentile bootstrap of `estimator(indices)` over `n_units` units (rows, blocks).

    `estimator` receives an index array (all units, or a resample) and returns a number; with
    `batched`, it also takes a 2-D array of resamples (one per row) and returns one number per
    row, which is ~50x faster (the same resamples, drawn in the same order). With fewer than 2
    units, or non-finite resamples only, the interval is the point itself (or NaN)."""
    if batched and n_units == 0:
        return Interval(math.nan, math.nan, math.nan)
    point = float(estimator(np.arange(n_units)))
    if n_units < 2 or resamples < 1:
        return Interval(point, point, point)
    rng = np.random.default_rng(seed)
    if batched:
        per_chunk = max(1, 2_000_000 // n_units)  # at most ~16 MB of indices at a time
        stats = np.concatenate([np.asarray(estimator(rng.integers(0, n_units, (min(per_chunk, resamples - done), n_units))),
                                           dtype=float) for done in range(0, resamples, per_chunk)])
    else:
        stats = np.array([estimator(rng.integers(0, n_units, n_units)) for _ in range(resamples)], dtype=float)
    stats = stats[np.isfinite(stats)]
    if not stats.size:
        return Interval(point, math.nan, math.nan)
    tail = (1.0 - confidence) / 2 * 100
    low, high = np.percentile(stats, [tail, 100 - tail])
    return Interval(point, float(low), float(high))


def _divide(num, den):
    """num / den elementwise, NaN where den is 0 (a resample of units without tokens)."""
    num, den = np.asarray(num, dtype=float), np.asarray(den, dtype=float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(den != 0, num / np.where(den != 0, den, 1.0), math.nan)


def mean_ci(values, **kw) -> Interval:
    """Mean of per-unit values (exact match, ROUGE-L, correctness)."""
    v = np.asarray(values, dtype=float)
    return bootstrap(lambda i: v[i].mean(-1), len(v), batched=True, **kw)


def ratio_ci(numerators, denominators, **kw) -> Interval:
    """sum(num) / sum(den) over units: token-weighted mean loss or KL with per-example sums."""
    n, d = np.asarray(numerators, dtype=float), np.asarray(denominators, dtype=float)
    return bootstrap(lambda i: _divide(n[i].sum(-1), d[i].sum(-1)), len(n), batched=True, **kw)


def paired_diff_ci(a, b, **kw) -> Interval:
    """mean(a) - mean(b), the same units resampled on both sides."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    return bootstrap(lambda i: a[i].mean(-1) - b[i].mean(-1), len(a), batched=True, **kw)


def paired_ratio_diff_ci(num_a, num_b, den, **kw) -> Interval:
    """sum(num_a)/sum(den) - sum(num_b)/sum(den): a token-weighted loss difference, paired."""
    a, b, d = (np.asarray(x, dtype=float) for x in (num_a, num_b, den))
    return bootstrap(lambda i: _divide(a[i].sum(-1) - b[i].sum(-1), d[i].sum(-1)), len(a), batched=True, **kw)


def perplexity_ratio_ci(nll_adapted, nll_base, tokens, **kw) -> Interval:
    """exp(mean NLL adapted - mean NLL base) = perplexity ratio adapted/base, paired over blocks."""
    a, b, t = (np.asarray(x, dtype=float) for x in (nll_adapted, nll_base, tokens))
    return bootstrap(lambda i: np.exp(np.minimum(_divide(a[i].sum(-1) - b[i].sum(-1), t[i].sum(-1)), 50.0)), len(a),
                     batched=True, **kw)


def macro_f1(y_true: list[int], y_pred: list[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1; a class absent from both truth and prediction is skipped."""
    scores = []
    for c in range(num_labels):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


def macro_f1_ci(y_true, y_pred, num_labels: int, **kw) -> Interval:
    t, p = np.asarray(y_true), np.asarray(y_pred)
    return bootstrap(lambda i: macro_f1(t[i].tolist(), p[i].tolist(), num_labels), len(t), **kw)


def check_outcome(bounds: tuple[float, float], limit: float, upper_is_worse: bool, strict: bool = False) -> str:
    """`pass` when the worse bound is within the limit, `fail` when even the better one is beyond
    it, `undecided` when the interval straddles it. `strict` (a superiority check: the gain must
    exceed what is required) counts a bound on the limit as beyond it: an adapter that predicts
    exactly what the base does shows no gain, even over a requirement of 0."""
    worse, better = (bounds[1], bounds[0]) if upper_is_worse else (bounds[0], bounds[1])
    if strict:
        beyond = (lambda x: x >= limit) if upper_is_worse else (lambda x: x <= limit)
    else:
        beyond = (lambda x: x > limit) if upper_is_worse else (lambda x: x < limit)
    return "pass" if not beyond(worse) else "fail" if beyond(better) else "undecided"
