"""The evaluation report people look at: Markdown plus two PNG plots (matplotlib, no display).

- `loss_curve.png`: training loss per optimizer step (and the learning rate).
- `gain_vs_forgetting.png`: task gain over the base against forgetting, for base, champion and
  challenger, with bootstrap error bars, and the policy's limits drawn in.
"""

from __future__ import annotations

from pathlib import Path

from .config import FORGETTING_METRICS
from .evaluation import EvalReport


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_loss_curve(history: dict[str, list[tuple[int, float]]], path: str | Path) -> Path | None:
    """`history` maps a metric (train_loss, learning_rate) to (step, value) pairs; None if empty."""
    loss = sorted(history.get("train_loss", []))
    if not loss:
        return None
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=110)
    ax.plot([s for s, _ in loss], [v for _, v in loss], color="tab:blue", label="train loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    lr = sorted(history.get("learning_rate", []))
    if lr:
        ax2 = ax.twinx()
        ax2.plot([s for s, _ in lr], [v for _, v in lr], color="tab:gray", linestyle=":", label="learning rate")
        ax2.set_ylabel("learning rate")
    ax.set_title("training loss")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_gain_vs_forgetting(report: EvalReport, path: str | Path, limits: dict[str, float | None]) -> Path | None:
    """Task gain (y) against the first bounded forgetting metric measured (x), per model."""
    found = next(((k, m) for m in FORGETTING_METRICS for k in sorted(report.forgetting) if m.matches(k)), None)
    if found is None:
        return None
    key, metric = found
    plt = _pyplot()
    points = [("base", 0.0, None, metric.neutral, None)]
    if report.champion is not None and key in report.champion_forgetting:
        m = report.primary_metric
        lead = report.champion[m] - report.base[m]
        points.append(("champion", lead if report.higher_is_better else -lead, report.intervals.get("champion_task_gain"),
                       report.champion_forgetting[key], report.intervals.get(f"champion_{key}")))
    points.append(("challenger", report.task_gain, report.intervals.get("task_gain"),
                   report.forgetting[key], report.intervals.get(key)))
    fig, ax = plt.subplots(figsize=(6, 4), dpi=110)
    for (name, gain, gain_ci, forget, forget_ci), color in zip(points, ("tab:gray", "tab:orange", "tab:blue")):
        xerr = [[forget - forget_ci[1]], [forget_ci[2] - forget]] if forget_ci else None
        yerr = [[gain - gain_ci[1]], [gain_ci[2] - gain]] if gain_ci else None
        ax.errorbar([forget], [gain], xerr=xerr, yerr=yerr, fmt="o", color=color, capsize=4, label=name)
    if limits.get(key) is not None:
        ax.axvline(limits[key], color="tab:red", linestyle="--", linewidth=1, label=f"limit {limits[key]:g}")
    if limits.get("min_task_gain") is not None:
        ax.axhline(limits["min_task_gain"], color="tab:green", linestyle="--", linewidth=1, label="minimum gain")
    ax.set_xlabel(f"{metric.axis} (forgetting; {'lower' if metric.higher_is_worse else 'higher'} is better)")
    ax.set_ylabel(f"gain in {report.primary_metric} over base")
    ax.set_title("task gain vs forgetting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def write_report(
    report: EvalReport, summary_md: str, history: dict[str, list[tuple[int, float]]], out_dir: str | Path,
    limits: dict[str, float | None], max_samples: int = 10,
) -> list[Path]:
    """`evaluation_report.md` (the run's summary, the plots, sample answers) and the PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (plot_loss_curve(history, out / "loss_curve.png"),
                         plot_gain_vs_forgetting(report, out / "gain_vs_forgetting.png", limits)) if p]
    lines = [summary_md.rstrip(), "", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if report.samples:
        cols = [c for c in ("prompt", "target", "base", "champion", "adapted") if c in report.samples[0]]
        lines += ["", f"## Sample answers (first {min(max_samples, len(report.samples))})", "",
                  "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for s in report.samples[:max_samples]:
            lines.append("| " + " | ".join(_cell(s.get(c, "")) for c in cols) + " |")
    md = out / "evaluation_report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return [md, *plots]


def _cell(text) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."
