"""Measurement: task metrics of base, champion and adapter on the same rows (`evaluation`), a
classifier's fair baseline (`baseline`: the majority class or a linear probe on the frozen base),
forgetting on a reference corpus, probes and benchmarks (`forgetting`, its one table of metrics in
`forgetting_table`), their caches, statistics, the power plan and sequential looks, and the
evidence split between a remedy's search and its confirmation (`evidence_split`)."""

from ..exports import lazy_exports

__all__, __getattr__, __dir__ = lazy_exports(__name__, {
    "evaluation": ["EvalReport", "Evaluation", "evaluate_adapter", "keep_base_scores", "primary_metric"],
    "baseline": ["ClassifierBaseline", "fitted_baseline", "choose_baseline"],
    "forgetting": ["measure_forgetting"],
    "forgetting_table": ["ForgettingMetric", "FORGETTING_METRICS", "forgetting_metric", "forgetting_limits"],
    "stats": ["Interval", "bootstrap", "paired_diff_ci", "check_outcome"],
    "power": ["CheckPower", "plan"],
    "sequential": ["looks", "staged_check"],
    "evidence_split": ["Part", "confirm_mask", "split_for_confirmation"],
    "compare": ["compare_methods"],
})
