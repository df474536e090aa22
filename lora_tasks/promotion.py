"""The promotion gate: a pure function of numbers and a policy. No I/O."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace

from .config import PromotionPolicy
from .forgetting_table import FORGETTING_METRICS, ForgettingMetric, forgetting_metric


@dataclass(frozen=True)
class Candidate:
    """What the gate needs to know about one adapter version."""

    primary_metric: str
    higher_is_better: bool
    base_score: float | None
    adapted_score: float | None
    forgetting: dict[str, float] = field(default_factory=dict)
    version: str | None = None
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """(low, high) bootstrap bounds by name: `task_gain`, `champion_delta` (this minus the champion
    on the same data, positive = better) and forgetting metrics. A check without its interval
    falls back to the point value."""

    def without_champion_comparison(self) -> Candidate:
        """This candidate without its same-data lead over a champion (when that champion is gone)."""
        return replace(self, intervals={k: v for k, v in self.intervals.items() if k != "champion_delta"})

    @property
    def task_gain(self) -> float | None:
        if not (_finite(self.base_score) and _finite(self.adapted_score)):
            return None
        d = self.adapted_score - self.base_score
        return d if self.higher_is_better else -d


def candidate_from_metrics(
    metrics: dict[str, float], primary_metric: str, higher_is_better: bool,
    forgetting: dict[str, float] | None = None, version: str | None = None,
) -> Candidate:
    """A candidate from flat run metrics (`base_<metric>`, `adapted_<metric>`), as logged to MLflow."""
    names = (*INTERVAL_NAMES, *(k for k in {*metrics, *(forgetting or {})} if forgetting_metric(k)))
    intervals = {
        k: (metrics[f"{k}_ci_low"], metrics[f"{k}_ci_high"])
        for k in names
        if f"{k}_ci_low" in metrics and f"{k}_ci_high" in metrics
    }
    return Candidate(
        primary_metric, higher_is_better, metrics.get(f"base_{primary_metric}"),
        metrics.get(f"adapted_{primary_metric}"), dict(forgetting or {}), version, intervals,
    )


INTERVAL_NAMES = ("task_gain", "champion_delta")


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and every reason that led there (passed checks included)."""

    promote: bool
    reasons: list[str]
    failed_checks: list[str]

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def admitted(self) -> bool:
        """Fit to serve beside the champion (the `challenger` alias, canary traffic): promoted, or
        refused only for not beating the champion. A version refused for its gain or its
        forgetting never is."""
        return self.promote or set(self.failed_checks) <= {"champion"}


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _bounds(candidate: Candidate, name: str, point) -> tuple[float, float] | None:
    """(low, high) of `name`: its interval, else the point twice; None when not a finite number."""
    if name in candidate.intervals:
        low, high = candidate.intervals[name]
        return (low, high) if _finite(low) and _finite(high) and _finite(point) else None
    return (point, point) if _finite(point) else None


def _show(point, bounds: tuple[float, float]) -> str:
    return f"{point:.4g}" if bounds[0] == bounds[1] else f"{point:.4g} [{bounds[0]:.4g}, {bounds[1]:.4g}]"


def _check_forgetting(name: str, metric: ForgettingMetric, candidate: Candidate, limit, reasons: list[str],
                      failed: list[str]) -> None:
    """Pass when the metric's worse bound is within the limit: forgetting must be shown small."""
    if limit is None:
        return
    value = candidate.forgetting[name]
    bounds = _bounds(candidate, name, value)
    side = "upper" if metric.higher_is_worse else "lower"
    if bounds is None:
        failed.append(name)
        reasons.append(f"{name}: value {value} (interval {candidate.intervals.get(name)}) is not a finite number; "
                       f"it cannot be shown within the limit {limit:.4g}")
    elif bounds[1] > limit if metric.higher_is_worse else bounds[0] < limit:
        failed.append(name)
        reasons.append(f"{name}: {_show(value, bounds)} may exceed the limit {limit:.4g} (forgetting; {side} bound checked)")
    else:
        reasons.append(f"{name}: {_show(value, bounds)} within the limit {limit:.4g}")


def decide_promotion(candidate: Candidate, champion: Candidate | None, policy: PromotionPolicy) -> Decision:
    """Promote only on evidence that every check passes; missing, NaN or failed metrics never promote.

    Each check is a one-sided test on a bootstrap interval (`promotion.confidence`), compared
    instead of the point whenever the candidate carries it:
    - task gain (superiority over base): passes iff the lower bound of the paired gain
      (adapted vs base, oriented so positive is better) >= `min_task_gain`;
    - each forgetting metric of `forgetting_table.FORGETTING_METRICS` (non-inferiority): passes iff its
      worse bound (the upper one, as every metric there grows with forgetting) is within the
      policy field that row names; a limit of None skips that metric;
    - champion (non-inferiority): passes iff the lower bound of the paired lead (challenger minus
      champion on the same eval rows) >= `-champion_tolerance`; a champion scored elsewhere is
      compared by its recorded point value.
    A missing, NaN or infinite value or bound fails its check, so it never promotes. A check
    without an interval (metrics recorded before intervals existed) compares the point."""
    reasons: list[str] = []
    failed: list[str] = []
    m = candidate.primary_metric

    gain = candidate.task_gain
    bounds = _bounds(candidate, "task_gain", gain)
    if bounds is None:
        failed.append("task_gain")
        reasons.append(f"task_gain: {m} of base ({candidate.base_score}) or adapted ({candidate.adapted_score}) is missing or not finite")
    elif bounds[0] < policy.min_task_gain:
        failed.append("task_gain")
        reasons.append(f"task_gain: {m} improved by {_show(gain, bounds)} over base; the lower bound is below the required {policy.min_task_gain:.4g}")
    else:
        reasons.append(f"task_gain: {m} improved by {_show(gain, bounds)} over base (required {policy.min_task_gain:.4g})")

    measured = [(name, metric) for metric in FORGETTING_METRICS for name in sorted(candidate.forgetting) if metric.matches(name)]
    if policy.require_forgetting_metrics and not measured:
        failed.append("forgetting")
        reasons.append("forgetting: no forgetting metric was measured (set evaluation.reference) and the policy requires one")
    for name, metric in measured:
        _check_forgetting(name, metric, candidate, getattr(policy, metric.limit), reasons, failed)

    if policy.beat_champion:
        _check_champion(candidate, champion, policy, reasons, failed)
    return Decision(promote=not failed, reasons=reasons, failed_checks=failed)


def _check_champion(candidate: Candidate, champion: Candidate | None, policy: PromotionPolicy, reasons, failed) -> None:
    m, tol = candidate.primary_metric, policy.champion_tolerance
    if champion is None:
        reasons.append("champion: none yet, this version would be the first")
        return
    if "champion_delta" in candidate.intervals:  # both scored on the same data in this run
        low, high = candidate.intervals["champion_delta"]
        if not (_finite(low) and _finite(high)):
            failed.append("champion")
            reasons.append(f"champion: the comparison with version {champion.version} is not a finite number")
        elif low < -tol:
            failed.append("champion")
            reasons.append(f"champion: {m} lead over version {champion.version} is [{low:.4g}, {high:.4g}] on the same data; "
                           f"it may be worse by more than the tolerance {tol:.4g}")
        else:
            reasons.append(f"champion: {m} lead over version {champion.version} is [{low:.4g}, {high:.4g}] on the same data (tolerance {tol:.4g})")
        return
    if champion.primary_metric != m or not _finite(champion.adapted_score):
        reasons.append(f"champion: version {champion.version} has no comparable {m}; not compared")
    elif not _finite(candidate.adapted_score):
        failed.append("champion")
        reasons.append(f"champion: candidate has no finite {m} to compare with version {champion.version}")
    else:
        delta = candidate.adapted_score - champion.adapted_score
        delta = delta if candidate.higher_is_better else -delta
        if delta < -tol:
            failed.append("champion")
            reasons.append(f"champion: {m} {candidate.adapted_score:.4g} is worse than champion version {champion.version} "
                           f"({champion.adapted_score:.4g}, its own evaluation) beyond the tolerance {tol:.4g}")
        else:
            reasons.append(f"champion: {m} {candidate.adapted_score:.4g} vs champion version {champion.version} "
                           f"({champion.adapted_score:.4g}, its own evaluation)")
