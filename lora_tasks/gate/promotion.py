"""The promotion gate: a pure function of numbers and a policy. No I/O."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, replace
from statistics import NormalDist

from ..config import PromotionPolicy
from ..measurement.forgetting_table import FORGETTING_METRICS, ForgettingMetric, forgetting_limits, forgetting_metric
from ..measurement.sequential import LOOK_GROWTH
from ..measurement.stats import check_outcome, figure


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
    """Every check that did not pass: shown to fail, or undecided."""
    undecided_checks: list[str] = field(default_factory=list)
    """The checks whose interval straddles their limit: neither passed nor failed; more evidence
    (rows, probes, tokens, questions) would decide them. Never promoted on."""
    p_value: float = 1.0
    """The gate as one test (every check must pass: an intersection-union test): the largest of
    its checks' one-sided p-values, each read off its interval (`_p_value`). The gate passes a
    check iff its p-value <= (1 - confidence) / 2; a fleet compares these across members
    (`fleet.fdr_threshold`)."""

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
    return figure(point) if bounds[0] == bounds[1] else figure(point, *bounds)


EVIDENCE_UNITS = {"corpus": "reference tokens", "probes": "probes", "benchmark": "benchmark questions"}

NEAR_EDGE = 100.0
"""Beyond this multiple of its evidence an undecided check names no amount: its estimate sits so near
the limit that more evidence is unlikely to decide it (the estimate moves before the interval shrinks)."""


def _evidence_needed(point: float, bounds: tuple[float, float], limit: float, unit: str) -> str:
    """How much evidence would decide a straddling check if its estimate stayed where it is: the
    interval's half-width on the limit's side shrinks as one over the square root of the sample, so
    (that half-width / the estimate's distance to the limit)² times the evidence it has.

    The multiple named is never below `LOOK_GROWTH`, the size of one more look: a figure such as
    1.04x would read as "enough already", while no staged check adds less than one look. Past
    `NEAR_EDGE`, or with the estimate on the limit, no amount is named: the estimate sits near
    the limit and more evidence is unlikely to decide it."""
    side = bounds[1] - point if limit > point else point - bounds[0]
    gap = abs(point - limit)
    if gap == 0:
        return f"the estimate sits on the limit: no number of {unit} decides it"
    multiple = (side / gap) ** 2
    if multiple > NEAR_EDGE:
        return f"the estimate sits near the limit: more {unit} are unlikely to decide it (about {multiple:.0f}x would)"
    if multiple <= LOOK_GROWTH:
        return f"one more look, {LOOK_GROWTH:g}x the {unit}, would decide it at this estimate"
    return f"about {multiple:.1f}x the {unit} would decide it at this estimate"


def _gain_said(metric: str, gain: float, bounds: tuple[float, float], higher_is_better: bool) -> str:
    """`accuracy improved by 0.2 over base` for a positive gain, `accuracy changed by -0.094 over
    base` otherwise: a negative gain never reads as an improvement. The gain of a lower-is-better
    metric is its drop, so a negative one says so."""
    shown = _show(gain, bounds)
    if gain > 0:
        return f"{metric} improved by {shown} over base"
    sign = "" if higher_is_better or gain == 0 else f" (a gain: lower {metric} is better, so it rose)"
    return f"{metric} changed by {shown} over base{sign}"


def _p_value(point: float, bounds: tuple[float, float], limit: float, upper_is_worse: bool, confidence: float,
             strict: bool = False) -> float:
    """The one-sided p-value of "beyond the limit" that the check's interval implies: the normal
    tail of the estimate's margin to the limit, in units of the worse side's half-width over
    z((1 + confidence) / 2). So p <= (1 - confidence) / 2 exactly when the worse bound is within
    the limit, as the gate reads it; a point without an interval gives 0 (within) or 1 (on the
    limit: 1 for a `strict` check, as `check_outcome` reads it)."""
    margin = (limit - point) if upper_is_worse else (point - limit)
    half = (bounds[1] - point) if upper_is_worse else (point - bounds[0])
    if half <= 0:
        return 0.0 if margin > 0 or (margin == 0 and not strict) else 1.0
    z = NormalDist().inv_cdf((1 + confidence) / 2) * margin / half
    return 0.5 * math.erfc(z / math.sqrt(2))  # the upper tail, exact far out (1 - cdf would round to 0)


def _record(name: str, outcome: str, reasons: list[str], failed: list[str], undecided: list[str], text: dict) -> None:
    """Add the reason for `outcome` (`text[outcome]`) and file the check as failed or undecided."""
    if outcome != "pass":
        failed.append(name)
    if outcome == "undecided":
        undecided.append(name)
    reasons.append(text[outcome])


def _check_forgetting(name: str, metric: ForgettingMetric, candidate: Candidate, limit, reasons: list[str],
                      failed: list[str], undecided: list[str], p: list[float], confidence: float) -> None:
    """Pass when the metric's worse bound is within the limit: forgetting must be shown small;
    fail when even its better bound is beyond; undecided in between."""
    if limit is None:
        return
    value = candidate.forgetting[name]
    bounds = _bounds(candidate, name, value)
    if bounds is None:
        failed.append(name)
        p.append(1.0)
        reasons.append(f"{name}: value {value} (interval {candidate.intervals.get(name)}) is not a finite number; "
                       f"it cannot be shown within the limit {limit:.4g}")
        return
    p.append(_p_value(value, bounds, limit, metric.higher_is_worse, confidence))
    shown, unit = _show(value, bounds), metric.unit or EVIDENCE_UNITS[metric.source]
    _record(name, check_outcome(bounds, limit, metric.higher_is_worse), reasons, failed, undecided, {
        "pass": f"{name}: {shown} within the limit {limit:.4g}",
        "fail": f"{name}: {shown} beyond the limit {limit:.4g}: forgetting shown (even the better bound is past it)",
        "undecided": f"{name}: {shown} straddles the limit {limit:.4g}: undecided, forgetting neither shown nor "
                     f"ruled out; {_evidence_needed(value, bounds, limit, unit)}",
    })


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
    undecided: list[str] = []
    p: list[float] = []  # each check's p-value; the gate's is the largest
    m, confidence = candidate.primary_metric, policy.confidence

    gain, need = candidate.task_gain, policy.min_task_gain
    bounds = _bounds(candidate, "task_gain", gain)
    p.append(1.0 if bounds is None else _p_value(gain, bounds, need, False, confidence, strict=True))
    if bounds is None:
        failed.append("task_gain")
        reasons.append(f"task_gain: {m} of base ({candidate.base_score}) or adapted ({candidate.adapted_score}) is missing or not finite")
    else:
        said = f"task_gain: {_gain_said(m, gain, bounds, candidate.higher_is_better)}"
        _record("task_gain", check_outcome(bounds, need, upper_is_worse=False, strict=True), reasons, failed, undecided, {
            "pass": f"{said} (required: more than {need:.4g})",
            "fail": f"{said}; even the upper bound is not above the required {need:.4g}",
            "undecided": f"{said}, straddling the required {need:.4g}: undecided; "
                         f"{_evidence_needed(gain, bounds, need, 'eval rows')}",
        })

    measured = [(name, metric) for metric in FORGETTING_METRICS for name in sorted(candidate.forgetting) if metric.matches(name)]
    if policy.require_forgetting_metrics and not measured:
        failed.append("forgetting")
        p.append(1.0)
        reasons.append("forgetting: no forgetting metric was measured (set evaluation.reference) and the policy requires one")
    limits = forgetting_limits(policy, candidate.forgetting)
    for name, metric in measured:
        _check_forgetting(name, metric, candidate, limits[name], reasons, failed, undecided, p, confidence)

    if policy.beat_champion:
        _check_champion(candidate, champion, policy, reasons, failed, undecided, p)
    return Decision(promote=not failed, reasons=reasons, failed_checks=failed, undecided_checks=undecided, p_value=max(p))


def _check_champion(candidate: Candidate, champion: Candidate | None, policy: PromotionPolicy, reasons, failed,
                    undecided, p: list[float]) -> None:
    m, tol = candidate.primary_metric, policy.champion_tolerance
    if champion is None:
        reasons.append("champion: none yet, this version would be the first")
        return
    if "champion_delta" in candidate.intervals:  # both scored on the same data in this run
        low, high = candidate.intervals["champion_delta"]
        if not (_finite(low) and _finite(high)):
            failed.append("champion")
            p.append(1.0)
            reasons.append(f"champion: the comparison with version {champion.version} is not a finite number")
        else:
            lead, v = f"{m} lead over version {champion.version} is [{low:.4g}, {high:.4g}] on the same data", champion.version
            point = (low + high) / 2  # the candidate carries the interval of the lead, not its point
            p.append(_p_value(point, (low, high), -tol, False, policy.confidence))
            _record("champion", check_outcome((low, high), -tol, upper_is_worse=False), reasons, failed, undecided, {
                "pass": f"champion: {lead} (tolerance {tol:.4g})",
                "fail": f"champion: {lead}: worse than version {v} by more than the tolerance {tol:.4g}",
                "undecided": f"champion: {lead}, straddling the tolerance {tol:.4g}: undecided; "
                             f"{_evidence_needed(point, (low, high), -tol, 'eval rows')}",
            })
        return
    if champion.primary_metric != m or not _finite(champion.adapted_score):
        reasons.append(f"champion: version {champion.version} has no comparable {m}; not compared")
    elif not _finite(candidate.adapted_score):
        failed.append("champion")
        p.append(1.0)
        reasons.append(f"champion: candidate has no finite {m} to compare with version {champion.version}")
    else:
        delta = candidate.adapted_score - champion.adapted_score
        delta = delta if candidate.higher_is_better else -delta
        p.append(1.0 if delta < -tol else 0.0)  # a recorded point: no interval to read a p-value from
        if delta < -tol:
            failed.append("champion")
            reasons.append(f"champion: {m} {candidate.adapted_score:.4g} is worse than champion version {champion.version} "
                           f"({champion.adapted_score:.4g}, its own evaluation) beyond the tolerance {tol:.4g}")
        else:
            reasons.append(f"champion: {m} {candidate.adapted_score:.4g} vs champion version {champion.version} "
                           f"({champion.adapted_score:.4g}, its own evaluation)")


# ----------------------------------------------------------------------------- many gates at once


@dataclass(frozen=True)
class FleetGate:
    """The gates of a fleet's members decided together: with many members some pass by chance,
    so a member promotes only when its gate's p-value is within the Benjamini–Hochberg
    threshold of all the members gated in the same fleet run (`fdr_threshold`). Then the
    expected share of wrongly promoted members among those promoted stays <= `fdr`."""

    fdr: float
    """The false discovery rate controlled across the members (`fdr` of the fleet file)."""
    threshold: float | None
    """The largest gate p-value that promotes (`fdr_threshold` of the members' p-values); None:
    none does."""
    members: int
    """How many members' gates were decided together (every member evaluated in this run)."""


def fdr_threshold(p_values: list[float], fdr: float) -> float | None:
    """Benjamini–Hochberg: the largest p-value p_(k) with p_(k) <= k * fdr / m (sorted, m
    tests); the tests at or below it are the discoveries. None when no p-value reaches its line."""
    m, threshold = len(p_values), None
    for k, p in enumerate(sorted(p_values), 1):
        if p <= k * fdr / m:
            threshold = p
    return threshold


def apply_fleet_gate(decision: Decision, gate: FleetGate | None) -> Decision:
    """A member's own decision, kept only where its p-value is within the fleet's threshold:
    a member that passed its own gate but not the fleet's is refused with the check
    `fleet_fdr` (and is no challenger: `admitted` is False)."""
    if gate is None or not decision.promote:
        return decision
    line = "nothing (no member's p-value reached its line)" if gate.threshold is None else f"{gate.threshold:.3g}"
    where = (f"the Benjamini–Hochberg threshold {line} of the {gate.members} member(s) gated together "
             f"(false discovery rate {gate.fdr:g})")
    if gate.threshold is not None and decision.p_value <= gate.threshold:
        return replace(decision, reasons=[*decision.reasons, f"fleet_fdr: gate p-value {decision.p_value:.3g} within {where}"])
    reason = (f"fleet_fdr: gate p-value {decision.p_value:.3g} above {where}: held back, as with this many members some "
              f"pass their own gate by chance; more eval rows would lower its p-value")
    return replace(decision, promote=False, reasons=[*decision.reasons, reason],
                   failed_checks=[*decision.failed_checks, "fleet_fdr"])
