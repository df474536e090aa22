"""Remedies for forgetting, the pure part: choose among trials. No I/O.

When the gate refuses an adapter for forgetting, the pipeline tries variants of it (the same
adapter at smaller scales of its update; or, in a search, other learning rates, ranks and replay
shares) and keeps the best one that passes. Choosing the best of several noisy figures inflates
them (the winner's curse), so the evidence is split in two by content hash: trials are compared
on the *search* part only, and the gate then reads the chosen trial's figures on the *confirm*
part, which took no part in the choice. Its intervals stay honest.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass, field, replace

from ..config import PipelineConfig, PromotionPolicy
from ..measurement.forgetting_table import FORGETTING_METRICS, forgetting_limits, forgetting_metric
from .promotion import Candidate, Decision, decide_promotion


@dataclass(frozen=True)
class Trial:
    """One variant of the adapter and what the search part of the evidence says of it."""

    name: str
    """Short, readable: `scale=0.5`, `lr=0.0002 r=8 replay=0.2`."""
    settings: dict
    """What differs from the configured run (`scale`, `learning_rate`, `r`, `replay_share`)."""
    candidate: Candidate
    """Its figures on the search part, as the gate reads them."""
    order: int = 0
    """Preference among equals: smaller is the smaller change from the configured adapter."""
    seconds: float = 0.0
    run_id: str | None = None
    """The trial's MLflow child run, when it has one."""
    adapter_dir: str | None = None
    """The trial's own trained adapter (a search trial); None for the configured adapter."""
    decision: Decision | None = field(default=None, compare=False)


# ----------------------------------------------------------------------------- the search's trials

SEARCHED = ("learning_rate", "r", "replay_share")
"""What a search varies, in `remedy.search_space` and in each trial's `settings`."""


def search_space(cfg: PipelineConfig) -> dict[str, list]:
    """Each searched setting's values, the configured one first (`remedy.search_space`, or the
    defaults derived from the configured run)."""
    space, lr, r, share = cfg.remedy.search_space, cfg.training.learning_rate, cfg.lora.r, cfg.replay.share
    defaults = {"learning_rate": [lr, lr / 2, lr / 4], "r": [r, max(r // 2, 1)],
                "replay_share": [share, 0.25] if share < 0.25 else [share]}
    current = {"learning_rate": lr, "r": r, "replay_share": share}
    out = {}
    for key in SEARCHED:
        values = getattr(space, key) or defaults[key]
        out[key] = list(dict.fromkeys([current[key], *values]))  # configured first, no repeats
    return out


def search_grid(space: dict[str, list], max_trials: int) -> list[dict]:
    """The first `max_trials` settings of the grid over `space`, smallest change first: the
    configured run ({}), then one setting changed, then two...; among equals, values nearer the
    front of their list first. Each entry holds only what differs from the configured run."""
    keys = list(space)
    combos = itertools.product(*(range(len(space[k])) for k in keys))
    ranked = sorted(combos, key=lambda idx: (sum(i > 0 for i in idx), sum(idx), idx))
    return [{k: space[k][i] for k, i in zip(keys, idx) if i > 0} for idx in ranked[:max_trials]]


def trial_name(settings: dict) -> str:
    """`lr=0.0002 r=8 replay=0.25 scale=0.8`: the settings that differ, short."""
    short = {"learning_rate": ("lr", "{:.3g}"), "r": ("r", "{}"), "replay_share": ("replay", "{:g}"), "scale": ("scale", "{:g}")}
    parts = [f"{short[k][0]}={short[k][1].format(v)}" for k, v in settings.items() if k in short]
    return " ".join(parts) or "as configured"


def trial_config(cfg: PipelineConfig, settings: dict) -> PipelineConfig:
    """The configured run with a trial's settings: learning rate, rank (alpha follows, keeping
    alpha / r), replay share. A trial trains as ONE worker with `num_workers x cpus_per_worker`
    threads and the same global batch, so trials can run side by side as Ray Tune trials."""
    s, t, lora = cfg.scaling, cfg.training, cfg.lora
    r = settings.get("r", lora.r)
    return cfg.model_copy(update={
        "training": t.model_copy(update={"learning_rate": settings.get("learning_rate", t.learning_rate),
                                         "batch_size": t.batch_size * s.num_workers}),
        "lora": lora.model_copy(update={"r": r, "alpha": lora.alpha * r / lora.r}),
        "replay": cfg.replay.model_copy(update={"share": settings.get("replay_share", cfg.replay.share)}),
        "scaling": s.model_copy(update={"num_workers": 1, "cpus_per_worker": s.num_workers * s.cpus_per_worker,
                                        "launcher": "local"}),
    })


def judge(trial: Trial, champion: Candidate | None, policy: PromotionPolicy) -> Trial:
    """The trial with the gate's decision on its search figures."""
    return replace(trial, decision=decide_promotion(trial.candidate, champion, policy))


def forgetting_margin(candidate: Candidate, policy: PromotionPolicy) -> float:
    """How close the worst bounded forgetting metric comes to its limit: max over metrics of
    (upper bound - neutral) / (limit - neutral); below 1 is within every limit. +inf when a
    bound is missing or not finite, 0 when nothing is bounded."""
    worst = 0.0
    for name, limit in forgetting_limits(policy, candidate.forgetting).items():
        metric = forgetting_metric(name)
        if limit is None:
            continue
        low, high = candidate.intervals.get(name, (candidate.forgetting[name],) * 2)
        bound = high if metric.higher_is_worse else low
        room = abs(limit - metric.neutral)
        if not (isinstance(bound, (int, float)) and math.isfinite(bound)) or room == 0:
            return math.inf
        worst = max(worst, abs(bound - metric.neutral) / room)
    return worst


def _gain_low(candidate: Candidate) -> float:
    low = candidate.intervals.get("task_gain", (candidate.task_gain, None))[0]
    return low if isinstance(low, (int, float)) and math.isfinite(low) else -math.inf


def select_trial(trials: list[Trial], policy: PromotionPolicy) -> Trial | None:
    """The admissible trial (its search figures pass the gate) with the highest lower bound of
    gain; ties go to less forgetting (`forgetting_margin`), then to the smaller change (`order`).
    None when no trial is admissible. Trials must have been `judge`d."""
    admissible = [t for t in trials if t.decision is not None and t.decision.promote]
    if not admissible:
        return None
    return max(admissible, key=lambda t: (_gain_low(t.candidate), -forgetting_margin(t.candidate, policy), -t.order))


def closest_trial(trials: list[Trial], policy: PromotionPolicy) -> Trial | None:
    """When none is admissible, the trial that came nearest (the smallest forgetting margin), to
    show what the remedy could reach."""
    return min(trials, key=lambda t: (forgetting_margin(t.candidate, policy), t.order), default=None)


def describe_trial(t: Trial) -> str:
    """One progress line: `scale=0.8: task_gain 0.71 [0.62, 0.8], self_retention_perplexity_ratio
    1.08 [1.06, 1.1], admissible (41 s)`."""
    c = t.candidate

    def show(key: str, value: float | None) -> str:
        low_high = c.intervals.get(key)
        return f"{key} {value:.3g}" + (f" [{low_high[0]:.3g}, {low_high[1]:.3g}]" if low_high else "")

    parts = [show("task_gain", c.task_gain)] + [show(k, v) for k, v in c.forgetting.items() if forgetting_metric(k)]
    verdict = "admissible" if t.decision and t.decision.promote else "not admissible"
    return f"{t.name}: {', '.join(parts)}, {verdict} ({t.seconds:.0f} s)"


# ----------------------------------------------------------------------------- whether to remedy

SHOWN, BEYOND, WITHIN, UNMEASURED = "shown", "estimate beyond", "estimate within", "unmeasured"
"""How a forgetting check that did not pass stands (`forgetting_standing`)."""


def forgetting_standing(trial: Trial, policy: PromotionPolicy) -> dict[str, str]:
    """Each forgetting check the judged `trial` did not pass, by name, and how it stands:
    - `SHOWN`: failed, beyond its limit even at the interval's better bound (or not a finite number);
    - `BEYOND`: undecided, its point estimate itself past the limit: scaling the update down
      lowers forgetting, so a remedy can bring such an estimate in;
    - `WITHIN`: undecided, its point estimate within the limit: more evidence would decide it,
      a remedy would only give up gain;
    - `UNMEASURED`: no forgetting metric was measured (the check `forgetting`): no remedy measures one."""
    decision, c, out = trial.decision, trial.candidate, {}
    for name in decision.failed_checks if decision else []:
        metric = forgetting_metric(name)
        if name == "forgetting":
            out[name] = UNMEASURED
        elif metric is None:
            continue
        elif name not in decision.undecided_checks:
            out[name] = SHOWN
        else:
            point, limit = c.forgetting[name], forgetting_limits(policy, c.forgetting)[name]
            past = point > limit if metric.higher_is_worse else point < limit
            out[name] = BEYOND if past else WITHIN
    return out


def remedy_needed(trial: Trial, policy: PromotionPolicy) -> bool:
    """Whether the adapter as trained (`trial`, judged on the search part) warrants remedy trials:
    a forgetting check shown beyond its limit, or undecided with its estimate past the limit. An
    undecided check whose estimate is within needs more evidence, not a remedy (a scale trial of
    a summarizer costs minutes of generation each)."""
    return any(s in (SHOWN, BEYOND) for s in forgetting_standing(trial, policy).values())


def remedy_reason(trial: Trial, policy: PromotionPolicy) -> str:
    """Why the adapter as trained did or did not need a remedy, in one sentence for the log and
    the remedy's summary."""
    standing = forgetting_standing(trial, policy)
    c = trial.candidate

    def said(name: str) -> str:
        limit = forgetting_limits(policy, c.forgetting)[name]
        return f"{name} {c.forgetting[name]:.4g} (limit {limit:.4g})"

    named = {s: ", ".join(said(n) for n, v in standing.items() if v == s) for s in (SHOWN, BEYOND, WITHIN)}
    why = {SHOWN: "failed (forgetting shown)",
           BEYOND: "undecided with the estimate past the limit, which a smaller update can bring in"}
    if named[SHOWN] or named[BEYOND]:
        parts = [f"{named[s]} {why[s]}" for s in (SHOWN, BEYOND) if named[s]]
        return f"The adapter as trained needs a remedy: {'; '.join(parts)}."
    if named[WITHIN]:
        return (f"The adapter as trained needs more evidence, not a remedy: {named[WITHIN]} undecided with the "
                "estimate within the limit; more rows, probes, tokens or questions would decide it.")
    if UNMEASURED in standing.values():
        return "No remedy can help: no forgetting metric was measured, and a remedy measures none."
    return "The adapter as trained kept within every forgetting limit: no remedy was needed."


def choose(trials: list[Trial], policy: PromotionPolicy) -> tuple[Trial | None, bool]:
    """(the trial to confirm, whether a remedy was needed). `trials[0]` is the adapter as trained:
    when it warrants no remedy (`remedy_needed`), it stands unless another trial is admissible
    with more gain; when it does, only an admissible trial stands, and None means the gate must
    refuse (`apply_outcome`)."""
    needed = remedy_needed(trials[0], policy)
    chosen = select_trial(trials, policy)
    return (chosen if chosen or needed else trials[0]), needed


def remedy_summary(strategy: str, trials: list[Trial], chosen: Trial | None, needed: bool, policy: PromotionPolicy,
                   seconds: float, search_rows: int, confirm_rows: int) -> dict:
    """What `EvalReport.remedy` records: every trial's search figures, whether the adapter as
    trained needed a remedy and why (`remedy_reason`), the choice and the cost. Plain JSON."""
    return {
        "strategy": strategy, "needed": needed, "why": remedy_reason(trials[0], policy) if trials else "",
        "chosen": chosen.name if chosen else None,
        "chosen_settings": chosen.settings if chosen else {},
        "adapter_dir": chosen.adapter_dir if chosen else None, "run_id": chosen.run_id if chosen else None,
        "trainings": 1 + len({t.adapter_dir for t in trials if t.adapter_dir}),
        "closest": None if chosen else getattr(closest_trial(trials, policy), "name", None),
        "seconds": seconds, "search_rows": search_rows, "confirm_rows": confirm_rows,
        "trials": [_trial_row(t, policy) for t in trials],
    }


def _trial_row(t: Trial, policy: PromotionPolicy) -> dict:
    c = t.candidate
    bounded = [(n, m) for m in FORGETTING_METRICS for n in sorted(c.forgetting) if m.matches(n)]
    return {
        "name": t.name, "settings": t.settings, "seconds": t.seconds, "run_id": t.run_id,
        "admissible": bool(t.decision and t.decision.promote),
        "failed_checks": list(t.decision.failed_checks) if t.decision else [],
        "task_gain": [c.task_gain, *c.intervals.get("task_gain", (c.task_gain, c.task_gain))],
        "forgetting": {n: [c.forgetting[n], *c.intervals.get(n, (c.forgetting[n],) * 2)] for n, _ in bounded},
        "margin": forgetting_margin(c, policy),
    }


def remedy_tags(remedy: dict) -> dict[str, str]:
    """The registered version's tag saying which remedy produced it (none when none was needed)."""
    if remedy and remedy.get("needed") and remedy.get("chosen"):
        return {"remedy": f"{remedy['strategy']}: {remedy['chosen']}"}
    return {}
