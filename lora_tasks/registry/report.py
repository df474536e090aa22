"""The evaluation report people look at: Markdown plus two PNG plots (matplotlib, no display).

- `loss_curve.png`: training loss per optimizer step (and the learning rate).
- `gain_vs_forgetting.png`: task gain over the base against forgetting, for base, champion and
  challenger, with bootstrap error bars, and the policy's limits drawn in.
- the run's one-page summary (`summary_markdown`) and the notes added to it as the run ends:
  what the Prefect artifact, the MLflow run's note and the version's description show.
"""

from __future__ import annotations

from pathlib import Path

from ..config import PipelineConfig
from ..gate.promotion import Decision
from ..measurement.evaluation import EvalReport
from ..measurement.forgetting_table import FORGETTING_METRICS, FORGETTING_PREFIXES, forgetting_metric
from .lifecycle import BASELINE_REASON, SKIPPED_MESSAGE, DataSummary
from .tracking import ui_command


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


def _draw_limits(ax, limits: dict[str, float | None], key: str) -> None:
    """The policy's bounds on a gain-vs-forgetting plot: the forgetting limit (the upper bound is
    checked against it) and the minimum gain (the lower bound is)."""
    if limits.get(key) is not None:
        ax.axvline(limits[key], color="tab:red", linestyle="--", linewidth=1, label=f"limit {limits[key]:g} (upper bound)")
    if limits.get("min_task_gain") is not None:
        ax.axhline(limits["min_task_gain"], color="tab:green", linestyle="--", linewidth=1, label="minimum gain (lower bound)")


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
    _draw_limits(ax, limits, key)
    ax.set_xlabel(f"{metric.axis} (forgetting; {'lower' if metric.higher_is_worse else 'higher'} is better)")
    ax.set_ylabel(f"gain in {report.primary_metric} over base")
    ax.set_title("task gain vs forgetting")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def plot_frontier(report: EvalReport, path: str | Path, limits: dict[str, float | None]) -> Path | None:
    """A remedy's trials: gain (lower bound to point) against forgetting (point to upper bound) on
    the search part, admissible ones filled, the chosen one ringed, the policy's limits drawn;
    None without a remedy that tried more than one variant."""
    trials = report.remedy.get("trials", []) if report.remedy else []
    key = next(iter(trials[0]["forgetting"]), None) if trials else None
    if len(trials) < 2 or key is None:
        return None
    metric = forgetting_metric(key)
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2), dpi=110)
    for t in trials:
        (g, g_lo, g_hi), (f, f_lo, f_hi) = t["task_gain"], t["forgetting"][key]
        style = {"color": "tab:blue" if t["admissible"] else "tab:gray", "fmt": "o", "capsize": 3,
                 "markerfacecolor": "tab:blue" if t["admissible"] else "white"}
        ax.errorbar([f], [g], xerr=[[f - f_lo], [f_hi - f]], yerr=[[g - g_lo], [g_hi - g]], **style)
        ax.annotate(t["name"], (f, g), textcoords="offset points", xytext=(6, 4), fontsize=7)
        if t["name"] == report.remedy.get("chosen"):
            ax.plot([f], [g], "o", markersize=14, markerfacecolor="none", markeredgecolor="tab:green", label="chosen")
    _draw_limits(ax, limits, key)
    ax.set_xlabel(f"{metric.axis if metric else key}, on the search part")
    ax.set_ylabel(f"gain in {report.primary_metric} over base")
    ax.set_title(f"remedy frontier: {len(trials)} trials, filled = admissible")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return Path(path)


def _point_interval(v: list[float]) -> str:
    """`point [low, high]`, as the remedy's tables show each figure."""
    return f"{v[0]:.4g} [{v[1]:.4g}, {v[2]:.4g}]"


def remedy_rows(report: EvalReport) -> list[dict]:
    """The frontier as table rows (a Prefect table artifact): one per trial, its gain and each
    bounded forgetting metric as `point [low, high]` on the search part, admissible, chosen."""
    r = report.remedy or {}
    return [{"trial": t["name"], "task_gain": _point_interval(t["task_gain"]), **{k: _point_interval(v) for k, v in t["forgetting"].items()},
             "admissible": t["admissible"], "chosen": t["name"] == r.get("chosen"), "seconds": round(t["seconds"], 1),
             "mlflow_run": t.get("run_id") or ""} for t in r.get("trials", [])]


def remedy_markdown(report: EvalReport) -> str:
    """The remedy's section of the summary: each trial's search figures, the choice, the cost."""
    r = report.remedy
    if not r:
        return ""
    trials = r["trials"]
    key = next(iter(trials[0]["forgetting"]), None) if trials else None
    lines = [f"## Remedy: {r['strategy']} ({len(trials)} trial(s) from {r.get('trainings', 1)} training(s), "
             f"{r['seconds']:.0f} s; chosen on {r['search_rows']} "
             f"search rows, confirmed on {r['confirm_rows']} others)", "",
             f"| trial | gain | {key or 'forgetting'} | admissible |", "| --- | --- | --- | --- |"]
    for t in trials:
        mark = " **chosen**" if t["name"] == r["chosen"] else ""
        lines.append(f"| {t['name']}{mark} | {_point_interval(t['task_gain'])} | "
                     f"{_point_interval(t['forgetting'][key]) if key else '–'} | {'yes' if t['admissible'] else 'no'} |")
    if not r["needed"]:  # why: within every limit, or undecided within it (more evidence, not a remedy)
        lines.append("\n" + (r.get("why") or "The adapter as trained kept within every forgetting limit: no remedy was needed."))
    elif r["chosen"]:
        lines.append(f"\nThe adapter as trained failed a forgetting limit; registered with {r['chosen']}: the gate "
                     f"reads its figures on the confirm part, which took no part in the choice.")
        first, chosen = trials[0], next(t for t in trials if t["name"] == r["chosen"])
        if key:
            lines.append(f"Against the adapter as trained (search part): gain {chosen['task_gain'][0]:.4g} vs "
                         f"{first['task_gain'][0]:.4g}, {key} {chosen['forgetting'][key][0]:.4g} vs "
                         f"{first['forgetting'][key][0]:.4g}; cost {r.get('trainings', 1) - 1} extra training(s) and "
                         f"{sum(t['seconds'] for t in trials[1:]):.0f} s of trials.")
    else:
        lines.append(f"\nNo trial passed; the closest was {r['closest']}. The adapter is refused.")
    return "\n".join(lines) + "\n"


def write_report(
    report: EvalReport, summary_md: str, history: dict[str, list[tuple[int, float]]], out_dir: str | Path,
    limits: dict[str, float | None], max_samples: int = 10,
) -> list[Path]:
    """`evaluation_report.md` (the run's summary, the plots, sample answers; the plots linked
    beside it), `evaluation_report.html` (the same with the plots embedded: MLflow's artifact view
    shows HTML whole but draws no image of a Markdown file) and the PNGs."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = [p for p in (plot_loss_curve(history, out / "loss_curve.png"),
                         plot_gain_vs_forgetting(report, out / "gain_vs_forgetting.png", limits),
                         plot_frontier(report, out / "remedy_frontier.png", limits)) if p]
    lines = [summary_md.rstrip(), "", "## Plots", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    if report.samples:
        cols = [c for c in ("prompt", "target", "base", "champion", "adapted") if c in report.samples[0]]
        lines += ["", f"## Sample answers (first {min(max_samples, len(report.samples))})", "",
                  "| " + " | ".join(cols) + " |", "|" + " --- |" * len(cols)]
        for s in report.samples[:max_samples]:
            lines.append("| " + " | ".join(_cell(s.get(c, "")) for c in cols) + " |")
    md = out / "evaluation_report.md"
    md.write_text("\n".join(lines) + "\n", encoding="utf-8")
    html = out / "evaluation_report.html"
    html.write_text(report_html(md.read_text(encoding="utf-8"), out), encoding="utf-8")
    return [md, html, *plots]


def embed_images(markdown_text: str, folder: Path) -> str:
    """The Markdown with each image beside it (`![name](file.png)`) as a data URI: it shows
    wherever the text goes (a Prefect artifact), with no file to resolve."""
    import base64
    import re

    def data_uri(m: re.Match) -> str:
        png = folder / m.group(2)
        return f"![{m.group(1)}](data:image/png;base64,{base64.b64encode(png.read_bytes()).decode('ascii')})"

    return re.sub(r"!\[([^\]]*)\]\(([\w.-]+\.png)\)", data_uri, markdown_text)


_HTML_STYLE = ("body{font-family:system-ui,sans-serif;max-width:60em;margin:1em;line-height:1.4}"
               "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:.2em .5em;text-align:left}"
               "code{background:#f3f3f3;padding:0 .2em}img{max-width:100%}")


def report_html(markdown_text: str, folder: Path) -> str:
    """A self-contained HTML page of the report, its images embedded."""
    import html

    import markdown

    body = markdown.markdown(embed_images(markdown_text, folder), extensions=["tables"])
    title = html.escape(markdown_text.splitlines()[0].lstrip("# ").replace("*", "").replace("`", "")) if markdown_text else ""
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{_HTML_STYLE}</style></head><body>{body}</body></html>\n")


def _cell(text) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 120 else text[:117] + "..."


# ----------------------------------------------------------------------------- the run's summary


def headline_metrics(flat: dict[str, float], primary_metric: str) -> dict[str, float]:
    """The few figures a run logs as MLflow metrics beside its loss curve, which its runs list
    shows as columns (`tracking.keep_runs_view`): the gain over the base with its interval, the
    adapted score, the lead over the champion, each forgetting figure the gate can bound; to 6
    significant digits (their intervals are far wider), so that a column shows them whole. Every
    other figure is a row of the comparison table and of `reports/metrics.json`, unrounded."""
    names = ("task_gain", "task_gain_ci_low", "task_gain_ci_high", f"adapted_{primary_metric}", "champion_delta",
             *sorted(k for k in flat if forgetting_metric(k)))
    return {k: float(f"{flat[k]:.6g}") for k in names if isinstance(flat.get(k), (int, float))}


def metrics_rows(flat: dict[str, float]) -> list[dict]:
    """Every figure of the evaluation and the training, one row each (name, value, interval): the
    run's `reports/metrics.json` table."""
    return [{"metric": k, "value": v, "ci_low": flat.get(f"{k}_ci_low"), "ci_high": flat.get(f"{k}_ci_high")}
            for k, v in sorted(flat.items()) if not k.endswith(("_ci_low", "_ci_high"))]


def comparison_rows(flat: dict[str, float]) -> list[dict]:
    """The comparison table (`metrics_table`: base | champion | adapted, with intervals) as rows:
    the run's `reports/comparison.json`, one table instead of a chart per figure."""
    columns, rows = metrics_table(flat)
    return [dict(zip(columns, row)) for row in rows]


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return "–" if v is None else str(v)


def metrics_table(flat: dict[str, float]) -> tuple[list[str], list[list[str]]]:
    """(columns, rows) of base / champion / adapted per metric, then forgetting, from flat metrics;
    a metric with a bootstrap interval shows it as `value [low, high]`."""
    def cell(key: str) -> str:
        if key not in flat:
            return ""
        lo, hi = flat.get(f"{key}_ci_low"), flat.get(f"{key}_ci_high")
        return _fmt(flat[key]) + (f" [{_fmt(lo)}, {_fmt(hi)}]" if lo is not None and hi is not None else "")

    has_champion = any(k.startswith("champion_") and k != "champion_delta" for k in flat)
    columns = ["metric", "base", *(["champion"] if has_champion else []), "adapted"]
    names = sorted({k.removeprefix("adapted_") for k in flat if k.startswith("adapted_") and "_ci_" not in k})
    rows = [[n, cell(f"base_{n}"), *([cell(f"champion_{n}")] if has_champion else []), cell(f"adapted_{n}")] for n in names]
    for key in ("task_gain", "champion_delta"):
        if key in flat:
            rows.append([key, "", *([""] if has_champion else []), cell(key)])
    for kind, label in baseline_kinds(flat):  # a classifier's base row, and what it was chosen from
        for metric in ("accuracy", "macro_f1"):
            rows.append([f"{label}: {metric}", cell(f"baseline_{kind}_{metric}"), *([""] if has_champion else []), ""])
    forgetting = sorted(k for k in flat if k.startswith(FORGETTING_PREFIXES) and "_ci_" not in k)
    for key in forgetting:  # every forgetting figure the gate's reasons may name, the champion's beside
        rows.append([key, "", *([cell(f"champion_{key}")] if has_champion else []), cell(key)])
    return columns, rows


BASELINES = {"majority": "majority class of the train split", "probe": "linear probe on the frozen base"}


def baseline_kinds(flat: dict[str, float]) -> list[tuple[str, str]]:
    """A classifier's baselines in `flat` as (kind, label), the one that is the base row marked:
    the one whose scores are the base's (not chosen again here: a remedy keeps the kind its search
    part chose, which need not be the better on the confirm rows)."""
    kinds = [k for k in BASELINES if f"baseline_{k}_accuracy" in flat]
    base = [flat.get(f"base_{m}") for m in ("accuracy", "macro_f1")]
    chosen = next((k for k in kinds if [flat.get(f"baseline_{k}_{m}") for m in ("accuracy", "macro_f1")] == base),
                  None)
    return [(k, f"{BASELINES[k]}{' (the base)' if k == chosen else ''}") for k in kinds]


def baseline_note(flat: dict[str, float]) -> str:
    """One line on what a classifier's base row is, or "" (a causal LM: the base model itself)."""
    chosen = next((label.removesuffix(" (the base)") for _, label in baseline_kinds(flat) if label.endswith("(the base)")),
                  None)
    if chosen is None:
        return ""
    return (f"The base column is the {chosen}: the better on the eval rows of the train split's majority class and a "
            f"linear probe on the frozen base's embeddings, what a team would deploy without the adapter (never the "
            f"base's untrained head).\n")


def summary_markdown(
    cfg: PipelineConfig,
    data: DataSummary,
    report: EvalReport,
    decision: Decision,
    version: str,
    run_id: str,
    champion_version: str | None,
) -> str:
    """The run's one-page summary, for the Prefect artifact and the MLflow run."""
    columns, rows = metrics_table(report.flat_metrics())
    table = "\n".join(["| " + " | ".join(columns) + " |", "|" + " --- |" * len(columns)]
                      + ["| " + " | ".join(r) + " |" for r in rows])
    confidence = f"{cfg.promotion.confidence:.0%} bootstrap intervals in brackets"
    reasons = "\n".join(f"- {r}" for r in decision.reasons)
    verdict = ("**promoted to `champion`**" if decision.promote else
               f"**not promoted: undecided** on {', '.join(decision.undecided_checks)}" if decision.undecided_checks
               else "**not promoted**")
    champ = f"version {champion_version}" if champion_version else "none"
    uri = cfg.tracking.tracking_uri
    ui = uri if uri.startswith(("http://", "https://")) else ui_command(uri)
    evidence = f" of the confirm part, adapter at scale {report.adapter_scale:g}" if report.evidence == "confirm" else ""
    return f"""# {cfg.model_name}: version {version} {verdict}

## Data
- train rows: {data.train_count}, eval rows: {data.eval_count}
- contract: {data.report_summary}
- fingerprint: `{data.fingerprint[:16]}`{f"  · quarantine: `{data.quarantine_path}`" if data.quarantine_path else ""}
{_replay_line(cfg)}
## Evaluation ({report.eval_rows} eval examples{evidence}, {report.seconds:.0f} s; primary: `{report.primary_metric}`; {confidence})
{table}

{baseline_note(report.flat_metrics())}{"" if report.forgetting else chr(10) + "No forgetting measured: set evaluation.reference." + chr(10)}
{remedy_markdown(report)}
## Decision (champion before this run: {champ})
{reasons}

## Tracking
- MLflow run `{run_id}` in experiment `{cfg.experiment_name}`; registered model `{cfg.model_name}` version {version}
- MLflow UI: `{ui}`
"""


def _replay_line(cfg: PipelineConfig) -> str:
    """What the training mixed in to keep the base's knowledge (a remedy for forgetting), if anything."""
    r = cfg.replay
    if not r.share:
        return ""
    source = "the base model's own answers to general prompts" if r.source == "self" else f"passages of `{r.path}`"
    penalty = f", with a KL-to-base penalty (weight {r.kl_weight:g}) on those rows" if r.kl_weight else ""
    return f"- replay: {r.share:.0%} of the training examples are {source}{penalty}\n"


def baseline_markdown(cfg: PipelineConfig, data: DataSummary, report: EvalReport, run_id: str,
                      champion_version: str | None) -> str:
    """The summary of a `training.method: full` run: evaluated and logged, never registered."""
    decision = Decision(False, [BASELINE_REASON], ["baseline"])
    return summary_markdown(cfg, data, report, decision, "(not registered)", run_id, champion_version)


def version_description(report: EvalReport, decision: Decision) -> str:
    """A registered version's description: one plain sentence (what the version list shows), then
    the gate's reasons. The full summary stays on the run."""
    m, flat = report.primary_metric, report.flat_metrics()
    base, adapted = flat.get(f"base_{m}"), flat.get(f"adapted_{m}")
    gain = report.intervals.get("task_gain")
    scores = f"{m} {_fmt(base)} → {_fmt(adapted)}" if base is not None and adapted is not None else f"{m} not scored"
    if report.baseline:  # a classifier: say what the base figure is
        kind = report.baseline["kind"]
        scores = scores.replace(f"{m} {_fmt(base)}", f"{m} {_fmt(base)} ({BASELINES[kind]})", 1)
    if gain:
        scores += f" (gain {gain[0]:+.3g} [{gain[1]:.3g}, {gain[2]:.3g}])"
    kept = [f"{name.replace('_', ' ')} {_fmt(v)}" for name, v in report.forgetting.items()
            if forgetting_metric(name)]
    verdict = ("Promoted to champion" if decision.promote else
               f"Not promoted, undecided on {', '.join(decision.undecided_checks)} (more evidence would decide)"
               if decision.undecided_checks else "Not promoted")
    first = f"{verdict}: {scores}" + (f"; forgetting: {', '.join(kept)}" if kept else "") + "."
    r = report.remedy or {}
    if r.get("needed") and r.get("chosen"):  # what is registered is not the adapter as trained
        first += f" The adapter as trained failed a forgetting limit: remedy {r['strategy']}, registered with {r['chosen']}."
    return first + "\n\n" + "\n".join(f"- {r}" for r in decision.reasons)


def redecision_markdown(final: Decision, against_version: str | None) -> str:
    """The note added when the champion moved during the run and the gate was run again."""
    verdict = "promoted" if final.promote else "not promoted"
    return (f"\n## Decided again\nThe champion moved to version {against_version} during this run; the gate was "
            f"re-run against it: **{verdict}**.\n" + "\n".join(f"- {r}" for r in final.reasons) + "\n")


def run_title(model_name: str, version: str, promoted: bool) -> str:
    """The MLflow run's name once the gate decided: `demo-orders v3 promoted`, `demo-orders v4 refused`."""
    return f"{model_name} v{version} {'promoted' if promoted else 'refused'}"


def mlflow_markdown(run_id: str, run_page: str, version: str, version_page: str, action: str,
                    from_version: str | None, to_version: str | None, runs_page: str = "") -> str:
    """The closing note: links to the MLflow run, the registered version and the runs list, and
    the audit record the decision left on `champion`."""
    if from_version == to_version:
        moved = f"champion stays version {to_version}" if to_version else "no champion yet"
    elif from_version:
        moved = f"champion moved from version {from_version} to {to_version}"
    else:
        moved = f"champion set to version {to_version} (the first)"
    runs = f"- runs list: [decision and headline figures]({runs_page})\n" if runs_page else ""
    return (f"\n## MLflow\n- run: [{run_id}]({run_page})\n- registered version: [version {version}]({version_page})\n"
            f"{runs}- audit: {action}, {moved}\n")


def skip_markdown(model_name: str, reason: str, champion_version: str | None, skip_run_id: str) -> str:
    """The summary of a run skipped because nothing changed since the champion or the latest
    decided version (`lifecycle.repeated_version`)."""
    stays = f"champion version {champion_version} stays" if champion_version else "there is no champion yet"
    return (f"# {model_name}: {SKIPPED_MESSAGE}\n\n{reason}.\n\nNothing was trained or registered; {stays}. "
            f"MLflow run `{skip_run_id}` records this check.\n")


def prefect_markdown(flow_run_url: str | None) -> str:
    """The closing link back to the Prefect flow run that made the run; nothing without one (Prefect's
    ephemeral API has no UI to link to)."""
    return f"\n## Prefect\n- flow run: [{flow_run_url.rsplit('/', 1)[-1]}]({flow_run_url})\n" if flow_run_url else ""
