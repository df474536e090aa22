"""Remedies run: the adapter tried at other scales of its update (and a search's other adapters)
on the search part of the evidence, the gate's choice among them reported on the confirm part
(`remedy.py` chooses, `measurement.evidence_split` splits). With `remedy.strategy: none`, the
adapter as trained, measured on all the evidence."""

from __future__ import annotations

import time
from collections.abc import Callable

from ..config import PipelineConfig
from ..measurement.evaluation import EvalReport, Evaluation, evidence_split, primary_metric
from ..measurement.evidence_split import Part
from ..modeling import BaseModelInfo
from .promotion import Candidate, candidate_from_metrics
from .remedy import Trial, choose, describe_trial, judge, remedy_needed, remedy_summary, trial_name


def evaluate_with_remedies(
    cfg: PipelineConfig, adapter_dir: str, eval_rows: list[dict], device: str = "cpu", base_info: BaseModelInfo | None = None,
    champion_adapter_dir: str | None = None, champion_version: str | None = None, champion_metrics: dict | None = None,
    search: Callable | None = None, train_rows: list[dict] | None = None, progress: Callable[[str], None] | None = None,
) -> EvalReport:
    """Score base, champion (when given) and the new model (challenger) on the same eval rows,
    measure forgetting of each against the base on the reference section's sources, and
    bootstrap intervals of everything the gate reads.

    With a remedy (`remedy.strategy`), the adapter is also tried at other scales on one part of
    the evidence and the report is that of the chosen trial on the other part (see
    `lora_tasks/gate/remedy.py`); `search(search_rows, incumbent, first_order)` adds the trials of
    `remedy.strategy: search` (`lora_tasks/search.py`). `champion_metrics` (the champion's
    recorded metrics) lets the trials be judged against a champion scored elsewhere. `base_info`
    keys the cache of probe answers. A classifier's base row is fit on `train_rows` (`baseline.py`).
    Each phase (a view's task scores, a source of forgetting, a trial) says so to `progress`
    (default: the evaluation module's logger)."""
    ev = Evaluation(cfg, adapter_dir, device, base_info, champion_adapter_dir, champion_version, train_rows, progress)
    if cfg.remedy.strategy == "none":
        return ev.report(eval_rows)
    return evaluate_remedies(ev, eval_rows, champion_metrics, search)


def scale_trials(ev: Evaluation, rows: list[dict], incumbent: Candidate | None, stop_when_sound: bool) -> list[Trial]:
    """The adapter of `ev` at each scale of `remedy.scales` on the search part, judged by the gate.
    With `stop_when_sound`, stop after the first (scale 1) when it keeps every forgetting limit."""
    cfg, trials = ev.cfg, []
    metric, higher = primary_metric(cfg)
    for order, scale in enumerate(cfg.remedy.scales):
        t0 = time.perf_counter()
        rep = ev.report(rows, part=Part("search", cfg.remedy.confirm_fraction), scale=scale)
        cand = candidate_from_metrics(rep.flat_metrics(), metric, higher, rep.forgetting)
        trials.append(judge(Trial(trial_name({"scale": scale}), {"scale": scale}, cand, order, time.perf_counter() - t0),
                            incumbent, cfg.promotion))
        ev.say(f"remedy trial {describe_trial(trials[-1])}")
        if order == 0 and stop_when_sound and not remedy_needed(trials[0], cfg.promotion):
            break  # nothing a remedy could mend (`remedy_needed`): no trials
    return trials



def evaluate_remedies(ev: Evaluation, eval_rows: list[dict], champion_metrics: dict | None = None,
                      search: Callable | None = None) -> EvalReport:
    """Try the adapter at each scale of `remedy.scales` on the search part of the eval rows and
    forgetting evidence (and, with `search`, the search's other adapters); report the chosen
    trial (or, with none admissible, the adapter as trained) on the confirm part, with every
    trial in `EvalReport.remedy`."""
    cfg, started = ev.cfg, time.perf_counter()
    r = cfg.remedy
    search_rows, confirm_rows = evidence_split(cfg, eval_rows)
    metric, higher = primary_metric(cfg)
    incumbent = candidate_from_metrics(champion_metrics, metric, higher) if champion_metrics else None
    trials = scale_trials(ev, search_rows, incumbent, stop_when_sound=r.when == "refused")
    if search is not None and r.strategy == "search" and (r.when == "always" or remedy_needed(trials[0], cfg.promotion)):
        trials += search(search_rows, incumbent, len(trials))
    chosen, needed = choose(trials, cfg.promotion)
    if chosen is not None and chosen.adapter_dir:
        ev = ev.with_adapter(chosen.adapter_dir)
    report = ev.report(confirm_rows, part=Part("confirm", r.confirm_fraction), scale=chosen.settings["scale"] if chosen else 1.0)
    report.remedy = remedy_summary(r.strategy, trials, chosen, needed, cfg.promotion, time.perf_counter() - started,
                                   len(search_rows), len(confirm_rows))
    return report
