"""The one table of forgetting metrics the gate can bound: evaluation (`forgetting.py`), the gate
(`promotion.py`), the remedies, the report's plot and the flows all read it from here."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class ForgettingMetric:
    """One forgetting metric the gate can bound. The rows of `FORGETTING_METRICS` are the only
    place that says so: evaluation, the gate, the report's plot and the flows all read them."""

    pattern: str
    """The metric's key as logged; `*` stands for a benchmark's file stem."""
    source: Literal["corpus", "probes", "benchmark"]
    """The `evaluation.reference` source whose measurement yields it (`forgetting.measure_forgetting`):
    `corpus` (`path`), `probes` or `benchmark` (each of `benchmarks`)."""
    limit: str | None
    """The `PromotionPolicy` field that bounds it (None: no field of its own); a null limit skips the check."""
    higher_is_worse: bool
    """Direction: True when larger means more forgetting (the interval's upper bound is checked)."""
    axis: str
    """Its label on the gain-vs-forgetting plot."""
    neutral: float
    """The value the base model itself has (where the base sits on the plot)."""
    unit: str | None = None
    """What more evidence of it means, when not its source's (`promotion.EVIDENCE_UNITS`)."""
    stands_in: str | None = None
    """The corpus limit that bounds it too when no reference corpus is measured: the probes then
    stand in for the corpus, and their figure is measured and reported once, under this row's name."""

    def matches(self, name: str) -> bool:
        return fnmatch.fnmatchcase(name, self.pattern)


FORGETTING_METRICS = (
    ForgettingMetric("reference_perplexity_ratio", "corpus", "max_perplexity_ratio", True,
                     "reference perplexity ratio adapted/base", 1.0),
    ForgettingMetric("reference_kl", "corpus", "max_kl", True, "reference KL(base || adapted) per token", 0.0),
    ForgettingMetric("reference_retrieval_loss", "corpus", "max_retrieval_loss", True,
                     "share of the base's reference retrieval hits lost", 0.0, "reference paragraphs"),
    ForgettingMetric("self_retention_perplexity_ratio", "probes", "max_self_retention_ratio", True,
                     "perplexity ratio on the base's own answers (self-retention)", 1.0,
                     stands_in="max_perplexity_ratio"),
    ForgettingMetric("self_retention_kl", "probes", None, True,
                     "KL(base || adapted) per token on the base's own answers", 0.0, stands_in="max_kl"),
    ForgettingMetric("benchmark_*_accuracy_drop", "benchmark", "max_benchmark_accuracy_drop", True,
                     "benchmark accuracy drop (base - adapted)", 0.0),
)
"""Every bounded forgetting metric, in the order the gate checks and the plot prefers them."""


FORGETTING_PREFIXES = ("reference_", "self_retention_", "benchmark_")
"""Flat metric names of forgetting, bounded or not: the reference corpus, the probes, each benchmark."""


def forgetting_metric(name: str) -> ForgettingMetric | None:
    """The table row of forgetting metric `name`, or None when nothing bounds it."""
    return next((m for m in FORGETTING_METRICS if m.matches(name)), None)


def forgetting_limits(policy, names, corpus: bool | None = None) -> dict[str, float | None]:
    """The limit of each bounded metric among `names`, as the policy sets it (None: not checked).
    Without a reference corpus (`corpus` False; by default, when no `reference_*` figure is among
    `names`) the probes stand in for it: a row's `stands_in` limit bounds it too, the tighter one
    counting."""
    names = list(names)
    if corpus is None:
        corpus = any(n.startswith("reference_") for n in names)
    out = {}
    for n in names:
        if (m := forgetting_metric(n)) is None:
            continue
        fields = [m.limit, None if corpus else m.stands_in]
        limits = [v for f in fields if f and (v := getattr(policy, f)) is not None]
        out[n] = min(limits) if limits else None
    return out
