"""The promotion gate: a pure function of numbers and a policy. No I/O."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from .config import PromotionPolicy


@dataclass(frozen=True)
class Candidate:
    """What the gate needs to know about one adapter version."""

    primary_metric: str
    higher_is_better: bool
    base_score: float | None
    adapted_score: float | None
    forgetting: dict[str, float] = field(default_factory=dict)
    version: str | None = None

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
    return Candidate(
        primary_metric, higher_is_better, metrics.get(f"base_{primary_metric}"),
        metrics.get(f"adapted_{primary_metric}"), dict(forgetting or {}), version,
    )


@dataclass(frozen=True)
class Decision:
    """Whether to promote, and every reason that led there (passed checks included)."""

    promote: bool
    reasons: list[str]
    failed_checks: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_max(name: str, value, limit, reasons: list[str], failed: list[str], required: bool) -> None:
    if limit is None:
        return
    if value is None:
        if required:
            failed.append(name)
            reasons.append(f"{name}: not measured, and the policy requires forgetting metrics")
        return
    if not _finite(value):
        failed.append(name)
        reasons.append(f"{name}: value {value} is not a finite number")
    elif value > limit:
        failed.append(name)
        reasons.append(f"{name}: {value:.4g} exceeds the limit {limit:.4g} (forgetting)")
    else:
        reasons.append(f"{name}: {value:.4g} within the limit {limit:.4g}")


def decide_promotion(candidate: Candidate, champion: Candidate | None, policy: PromotionPolicy) -> Decision:
    """Promote only when every check passes; missing, NaN or failed metrics never promote."""
    reasons: list[str] = []
    failed: list[str] = []
    m = candidate.primary_metric

    gain = candidate.task_gain
    if gain is None:
        failed.append("task_gain")
        reasons.append(f"task_gain: {m} of base ({candidate.base_score}) or adapted ({candidate.adapted_score}) is missing or not finite")
    elif gain < policy.min_task_gain:
        failed.append("task_gain")
        reasons.append(f"task_gain: {m} improved by {gain:.4g} over base, below the required {policy.min_task_gain:.4g}")
    else:
        reasons.append(f"task_gain: {m} improved by {gain:.4g} over base (required {policy.min_task_gain:.4g})")

    f = candidate.forgetting
    measured = [k for k in ("reference_perplexity_ratio", "reference_kl", "reference_representation_drift") if k in f]
    required = policy.require_forgetting_metrics
    if required and not measured:
        failed.append("forgetting")
        reasons.append("forgetting: no forgetting metric was measured (set evaluation.reference) and the policy requires one")
    if measured:
        _check_max("reference_perplexity_ratio", f.get("reference_perplexity_ratio"), policy.max_perplexity_ratio, reasons, failed, False)
        _check_max("reference_kl", f.get("reference_kl"), policy.max_kl, reasons, failed, False)
        _check_max("reference_representation_drift", f.get("reference_representation_drift"), policy.max_representation_drift, reasons, failed, False)

    if policy.beat_champion:
        if champion is None:
            reasons.append("champion: none yet, this version would be the first")
        elif champion.primary_metric != m or not _finite(champion.adapted_score):
            reasons.append(f"champion: version {champion.version} has no comparable {m}; not compared")
        elif not _finite(candidate.adapted_score):
            failed.append("champion")
            reasons.append(f"champion: candidate has no finite {m} to compare with version {champion.version}")
        else:
            delta = candidate.adapted_score - champion.adapted_score
            delta = delta if candidate.higher_is_better else -delta
            if delta < -policy.champion_tolerance:
                failed.append("champion")
                reasons.append(
                    f"champion: {m} {candidate.adapted_score:.4g} is worse than champion version {champion.version} "
                    f"({champion.adapted_score:.4g}) beyond the tolerance {policy.champion_tolerance:.4g}"
                )
            else:
                reasons.append(f"champion: {m} {candidate.adapted_score:.4g} vs champion version {champion.version} ({champion.adapted_score:.4g})")

    return Decision(promote=not failed, reasons=reasons, failed_checks=failed)
