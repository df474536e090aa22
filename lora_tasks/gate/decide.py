"""The gate's entry point on a run: its evaluation against the champion (`promotion`), then the
remedy's outcome, then the fleet's threshold. What every run calls to decide."""

from __future__ import annotations

from dataclasses import replace

from ..config import PromotionPolicy
from .promotion import Decision, FleetGate, apply_fleet_gate, candidate_from_metrics, decide_promotion


def apply_outcome(decision: Decision, remedy: dict) -> Decision:
    """The gate's decision on the confirm part, refused when a needed remedy found no trial
    admissible on the search part: an adapter that forgets too much is never promoted unremedied."""
    if not remedy or not remedy.get("needed") or remedy.get("chosen"):
        return decision
    n = len(remedy["trials"])
    reason = (f"remedy: none of {n} trial(s) ({', '.join(t['name'] for t in remedy['trials'])}) kept every forgetting "
              f"metric within its limit with the required gain on the search part; closest: {remedy.get('closest')}")
    return replace(decision, promote=False, reasons=[*decision.reasons, reason],
                   failed_checks=[*decision.failed_checks, "remedy"], p_value=1.0)



def decide_on_report(policy: PromotionPolicy, report, version: str | None, champion,
                     fleet_gate: FleetGate | None = None, same_data: bool = True) -> Decision:
    """The gate on a run's evaluation (`EvalReport`): the candidate against the champion (a
    `registry` version: its lead on the same data while `same_data`, else its recorded metrics),
    then the remedy's outcome, then the fleet's threshold when the run was gated with its fleet."""
    m, higher = report.primary_metric, report.higher_is_better
    candidate = candidate_from_metrics(report.flat_metrics(), m, higher, report.forgetting, version)
    candidate = candidate if same_data else candidate.without_champion_comparison()
    incumbent = candidate_from_metrics(champion.metrics, m, higher, version=champion.version) if champion else None
    return apply_fleet_gate(apply_outcome(decide_promotion(candidate, incumbent, policy), report.remedy), fleet_gate)
