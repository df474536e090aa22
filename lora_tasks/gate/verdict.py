"""A run's evaluation and outcome as sentences with rounded figures (`stats.figure`): the line a
flow logs after evaluating, and the headline its final state carries (what an orchestrator's runs
list shows: the decision, the gain with its interval, the forgetting). Plain strings."""

from __future__ import annotations

from ..measurement.evaluation import EvalReport
from ..measurement.forgetting_table import forgetting_metric
from ..measurement.stats import figure
from .promotion import Decision


def gain_change(report: EvalReport) -> str:
    """`+0.087 [0.031, 0.142]`: how the primary metric moved from base to adapted, with its interval,
    signed as the metric moved (a loss that fell by 0.61 reads `-0.61 [-0.66, -0.56]`)."""
    point, low, high = report.intervals.get("task_gain") or [report.task_gain, None, None]
    if not report.higher_is_better:  # the gain of a loss is its drop
        point, low, high = -point, (None if high is None else -high), (None if low is None else -low)
    return ("+" if point > 0 else "") + figure(point, low, high)


def _bounded(report: EvalReport) -> list[str]:
    """The forgetting figures a limit can bound, as measured."""
    return [k for k in report.forgetting if forgetting_metric(k)]


def _shown(report: EvalReport, names: list[str], intervals: bool = False) -> str:
    def one(k: str) -> str:
        low_high = (report.intervals.get(k) or [None] * 3)[1:] if intervals else (None, None)
        return f"{k} {figure(report.forgetting[k], *low_high)}"

    return ", ".join(one(k) for k in names)


def evaluation_line(report: EvalReport) -> str:
    """`60 eval rows: exact_match 0 → 0.85 (+0.85 [0.76, 0.94]); forgetting reference_kl 0.069 [0.065,
    0.074]`: what the evaluation found, the champion beside it when there is one."""
    m, part = report.primary_metric, "eval" if report.evidence == "all" else report.evidence
    rows = f"{report.eval_rows} {part} rows"
    scale = f", the adapter at scale {report.adapter_scale:g}" if report.adapter_scale != 1 else ""
    champion = (f"; champion (version {report.champion_version}) {figure(report.champion[m])}"
                if report.champion and m in report.champion else "")
    forgetting = _shown(report, _bounded(report), intervals=True) or "not measured"
    return (f"{rows}{scale}: {m} {figure(report.base[m])} → {figure(report.adapted[m])} ({gain_change(report)})"
            f"{champion}; forgetting {forgetting}")


def _forgetting_said(report: EvalReport, decision: Decision | None) -> str:
    """`forgetting within limits (reference_kl 0.0286, ...)`, or the checks that failed or stay undecided."""
    bounded = _bounded(report)
    if not bounded:
        return "no forgetting measured"
    if decision is None:
        return f"forgetting {_shown(report, bounded)}"
    undecided = [k for k in bounded if k in decision.undecided_checks]
    shown = [k for k in bounded if k in decision.failed_checks and k not in undecided]
    said = [f"forgetting shown: {_shown(report, shown, True)}"] if shown else []
    said += [f"forgetting undecided: {_shown(report, undecided, True)}"] if undecided else []
    return "; ".join(said) or f"forgetting within limits ({_shown(report, bounded)})"


def headline(model_name: str, report: EvalReport, decision: Decision | None = None, version: str | None = None,
             held: bool = False) -> str:
    """`demo-orders v3 promoted: exact_match +0.087 [0.031, 0.142]; forgetting within limits
    (reference_kl 0.069)`: the outcome (promoted, not promoted and which checks failed or stayed
    undecided, held for a fleet's gate, a full fine-tuning baseline), the gain, the forgetting."""
    if report.method == "full":
        what = "full fine-tuning baseline (not registered)"
    elif held:
        what = "held for the fleet's gate" + (f" (p-value {figure(decision.p_value)})" if decision else "")
    elif decision.promote:
        what = f"v{version} promoted"
    else:
        failed = [c for c in decision.failed_checks if c not in decision.undecided_checks]
        why = [f"failed: {', '.join(failed)}"] if failed else []
        why += [f"undecided: {', '.join(decision.undecided_checks)}"] if decision.undecided_checks else []
        what = f"v{version} not promoted ({'; '.join(why)})"
    return f"{model_name} {what}: {report.primary_metric} {gain_change(report)}; {_forgetting_said(report, decision)}"
