"""The gate: the pure decision on numbers and a policy (`promotion`: `decide_promotion` ->
`Decision`, the fleet's false-discovery threshold), its entry point on a run (`decide`), the
remedy's choice among trials (`remedy`, pure) and the run of those trials (`remedies`)."""

from ..exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "promotion": ["Candidate", "Decision", "FleetGate", "candidate_from_metrics", "decide_promotion",
                  "fdr_threshold", "apply_fleet_gate"],
    "decide": ["decide_on_report", "apply_outcome"],
    "remedy": ["Trial", "choose", "judge", "remedy_needed"],
    "remedies": ["evaluate_with_remedies"],
    "verdict": ["evaluation_line", "headline"],
})
