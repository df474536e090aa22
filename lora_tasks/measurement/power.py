"""Power before the run: how small an effect each gate check can show at the sizes a config asks for.

Every check of the gate (`promotion.decide_promotion`) compares one bound of an interval at
`promotion.confidence` with a limit. Its standard error shrinks as one over the square root of
the evidence (eval rows, probes, reference tokens, benchmark questions), so from the sizes a run
will score and a spread per unit of evidence, each check's power is known before training:

- a forgetting check (non-inferiority) passes a *harmless* adapter (one at the base's own value)
  only if the limit lies beyond `z * se`; with `(z + z_0.8) * se` it does so 80% of the time.
  A limit inside `z * se` cannot be shown however good the adapter (more often than not it
  straddles): a config error with the size that would show it (`promotion.underpowered: warn`
  turns it into a warning);
- the task gain (superiority over `min_task_gain`) and the lead over the champion report the
  smallest true effect they detect 80% of the time.

The spread per unit is measured: after a run, from its intervals (`remember`), kept per base
model and evidence source, so later runs of a scheduled pipeline plan with their own figures;
before any run, `PRIOR_SD`, stated as assumed wherever it is shown.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from statistics import NormalDist

from ..config import PipelineConfig
from ..errors import ConfigError
from ..modeling import cache_dir
from .forgetting_table import FORGETTING_METRICS, forgetting_limits

POWER = 0.8
"""The power every 'smallest effect' and 'needed size' figure is for."""

PRIOR_SD = {
    ("task_gain", "eval rows"): 0.5,
    ("champion", "eval rows"): 0.4,
    ("perplexity_ratio", "probes"): 0.15,
    ("kl", "probes"): 0.08,
    ("perplexity_ratio", "reference tokens"): 1.0,
    ("kl", "reference tokens"): 0.5,
    ("retrieval_loss", "reference paragraphs"): 2.5,
    ("accuracy_drop", "benchmark questions"): math.sqrt(0.15),
}
"""Spread of one unit's paired difference before any run measured it, by the check's kind
(its name's ending) and unit: per eval row, probe or question, per square root of a token for a
corpus. Task metrics in [0, 1] differ by up to 1 per row (the demo's JSON exact match measured
0.44); a benchmark's per-question drop is -1, 0 or 1, and its variance at no drop is the share of
questions whose answer the adapter changes (assumed 15%). A classifier's retrieval loss, linearised
per paragraph, sd(changed hits) / base hit rate: MiniLM on WikiText, 0.35 / 0.16 for its SST-2
adapters (8-17% of the answers changed). Probes and corpus: about twice to three
times what SmolLM2 adapters showed (demo probes: ratio 0.054, KL 0.022 per probe; WikiText at
learning rates 2e-4 to 1e-3: ratio 0.28-0.9, KL 0.07-0.48 per square root of a token)."""


SHARES = ("benchmark questions",)
"""Units scored 0 or 1 per model: their paired difference's spread is at most 1, so an assumed
spread can already show a check hopeless."""


def _z(confidence: float) -> float:
    """The gate's bound: one side of a two-sided interval at `confidence`."""
    return NormalDist().inv_cdf((1 + confidence) / 2)


def _prior(check: str, unit: str) -> float:
    return next(sd for (kind, u), sd in PRIOR_SD.items() if u == unit and check.endswith(kind))


@dataclass(frozen=True)
class CheckPower:
    """One gate check's power at the evidence a run will score."""

    check: str
    """The gate's name for it: `task_gain`, `champion` or a forgetting metric."""
    unit: str
    size: int
    limit: float
    neutral: float
    """Where a harmless adapter sits: the base's own value (forgetting), no gain (task, champion)."""
    higher_is_worse: bool | None
    """Forgetting direction; None for the task gain and champion lead (superiority checks)."""
    sd: float
    measured: str | None = None
    """The run whose intervals gave `sd`, or None when it is `PRIOR_SD`'s."""

    @property
    def se(self) -> float:
        return self.sd / math.sqrt(max(self.size, 1))

    @property
    def forgetting(self) -> bool:
        return self.higher_is_worse is not None

    def margin(self) -> float:
        """How far the limit lies from a harmless adapter, in the direction the check allows."""
        if not self.forgetting:
            return self.neutral - self.limit  # champion: tolerance; task gain: minus the required gain
        return (self.limit - self.neutral) if self.higher_is_worse else (self.neutral - self.limit)

    def power_if_harmless(self, confidence: float) -> float:
        """Chance that an adapter exactly at `neutral` passes this check."""
        if self.se == 0:
            return 1.0 if self.margin() > 0 else 0.0
        return NormalDist().cdf(self.margin() / self.se - _z(confidence))

    def smallest_shown(self, confidence: float) -> float:
        """Forgetting: the closest limit a harmless adapter meets 80% of the time. Task gain and
        champion: the smallest true gain (lead) that passes 80% of the time."""
        reach = (_z(confidence) + NormalDist().inv_cdf(POWER)) * self.se
        if self.forgetting:
            return self.neutral + reach if self.higher_is_worse else self.neutral - reach
        return reach - self.margin()

    def needed(self, confidence: float) -> float | None:
        """Units for 80% power at a harmless adapter (forgetting; infinite for a limit at the
        neutral value); None for superiority checks."""
        if not self.forgetting:
            return None
        if self.margin() <= 0:
            return math.inf
        return math.ceil(((_z(confidence) + NormalDist().inv_cdf(POWER)) * self.sd / self.margin()) ** 2)

    def verdict(self, confidence: float) -> str:
        """`cannot` (a harmless adapter passes less than half the time), `weak` (under 80%),
        `ok`; `info` for the superiority checks, which any large enough gain passes."""
        if not self.forgetting:
            return "info"
        p = self.power_if_harmless(confidence)
        return "cannot" if p <= 0.5 else "weak" if p < POWER else "ok"

    def describe(self, confidence: float) -> str:
        """One line: the evidence, what it can show, and what would show the limit."""
        spread = (f"spread measured in this model's run {self.measured[:8]}" if self.measured
                  else "spread assumed: no run of this model measured it yet")
        head = f"{self.check}: {self.size:,} {self.unit}"
        shown = self.smallest_shown(confidence)
        if not self.forgetting:
            what = "gain" if self.check == "task_gain" else "lead over the champion"
            return f"{head}: detects a true {what} of {shown:.3g} or more 80% of the time ({spread})"
        p, need = self.power_if_harmless(confidence), self.needed(confidence)
        share = "over 99%" if p > 0.99 else f"{p:.0%}"
        text = (f"{head}: a harmless adapter passes the limit {self.limit:.4g} {share} of the time; "
                f"the tightest limit it passes 80% of the time is {shown:.3g}")
        if p < POWER:
            text += f"; about {need:,} {self.unit} would show the limit" if math.isfinite(need) else \
                "; no sample shows a limit at the neutral value"
        return f"{text} ({spread})"


def _corpus_tokens(path: str, max_tokens: int) -> int:
    """Tokens the corpus will give, at about four characters a token, up to `max_tokens`."""
    from ..data.evidence import read_reference_texts

    return min(max_tokens, max(1, sum(len(t) + 1 for t in read_reference_texts(path)) // 4))


def _corpus_paragraphs(path: str, seq_len: int, max_tokens: int) -> int:
    """Paragraphs a classifier's retrieval check will score (`forgetting.retrieval_pairs`), at
    about four characters a token: lines of 1.5 passages or more, up to `max_tokens`."""
    from ..data.evidence import read_reference_texts
    from .forgetting import RETRIEVAL_PASSAGE_TOKENS

    part, count, used = max(min(seq_len, RETRIEVAL_PASSAGE_TOKENS) - 2, 2), 0, 0
    for text in read_reference_texts(path):
        if len(text) // 4 >= part + part // 2:
            count, used = count + 1, used + min(len(text) // 4, 2 * part)
            if used >= max_tokens:
                break
    return max(count, 1)


def _evidence(cfg: PipelineConfig, eval_rows: int) -> list[tuple[str, str, int]]:
    """(check, unit, size) of every check the gate will run, at the configured sizes."""
    from ..data.evidence import read_mc_benchmark
    from .forgetting import benchmark_stages, corpus_token_budget, probe_stages, safe_name

    gen = cfg.evaluation.generation
    rows = min(eval_rows, gen.max_rows) if gen is not None and gen.max_rows else eval_rows
    out = [("task_gain", "eval rows", rows)]
    ref = cfg.evaluation.reference
    if ref is not None:
        corpus = ["reference_perplexity_ratio", "reference_kl"]
        if ref.path and cfg.task != "causal_lm":
            pairs = _corpus_paragraphs(ref.path, cfg.training.max_seq_length, ref.max_tokens)
            out.append(("reference_retrieval_loss", "reference paragraphs", pairs))
        elif ref.path:
            out += [(m, "reference tokens", _corpus_tokens(ref.path, corpus_token_budget(cfg))) for m in corpus]  # staged: the budget
        if ref.probes:
            probes = ["self_retention_perplexity_ratio", "self_retention_kl"]
            out += [(m, "probes", probe_stages(cfg)[-1]) for m in probes]  # staged: the budget
        for path in ref.benchmarks:
            questions = benchmark_stages(cfg, len(read_mc_benchmark(path)))[-1]  # staged: the budget
            out.append((f"benchmark_{safe_name(path)}_accuracy_drop", "benchmark questions", questions))
    if cfg.promotion.beat_champion:
        out.append(("champion", "eval rows", rows))
    return out


def plan(cfg: PipelineConfig, eval_rows: int) -> list[CheckPower]:
    """Every check the gate will run with a limit, at the sizes `cfg` asks for, with the spread
    last measured for this base and evidence (`remember`), else the assumed one."""
    policy, known = cfg.promotion, _recall(cfg)
    share = gate_share(cfg)
    out = []
    for check, unit, planned in _evidence(cfg, eval_rows):
        size = max(1, round(planned * share))
        metric = next((m for m in FORGETTING_METRICS if m.matches(check)), None)
        if metric is None:
            limit = policy.min_task_gain if check == "task_gain" else -policy.champion_tolerance
            neutral, worse = 0.0, None
        else:
            corpus = bool(cfg.evaluation.reference and cfg.evaluation.reference.path)
            limit = forgetting_limits(policy, [check], corpus)[check]
            neutral, worse = metric.neutral, metric.higher_is_worse
            if limit is None:
                continue
        sd, run = (known[check]["sd"], known[check]["run_id"]) if check in known else (_prior(check, unit), None)
        out.append(CheckPower(check, unit, size, limit, neutral, worse, sd, run))
    return out


def gate_share(cfg: PipelineConfig) -> float:
    """The share of the evidence the gate reads: with a remedy, the confirm part only."""
    return cfg.remedy.confirm_fraction if cfg.remedy.strategy != "none" else 1.0


def report(cfg: PipelineConfig, checks: list[CheckPower]) -> list[str]:
    """The lines `validate` prints and a run logs before training."""
    c, share = cfg.promotion.confidence, gate_share(cfg)
    part = f" (the gate reads the remedy's confirm part, {share:.0%} of the evidence)" if share < 1 else ""
    return [f"power at {c:.0%} confidence, {POWER:.0%} power{part}:"] + [
        f"  [{p.verdict(c)}] {p.describe(c)}" for p in checks]


def enforce(cfg: PipelineConfig, checks: list[CheckPower]) -> list[str]:
    """Raise a ConfigError naming every check no adapter can pass at these sizes (unless
    `promotion.underpowered: warn`); return the lines of checks that likely cannot as warnings.

    An error needs the check to be hopeless at the assumed spread too (one destructive adapter's
    wide spread must not stop the next scheduled run), and either a measured spread or a
    check of 0/1 scores (`SHARES`), which bound its spread: the assumed spread of a loss, ratio or KL is
    only a guess across models (the tiny test model's is ten times smaller than SmolLM2's)."""
    c = cfg.promotion.confidence
    doubtful = [p for p in checks if p.verdict(c) == "cannot"]
    lines = [f"promotion: {p.describe(c)}. Score more {p.unit}, widen its limit, or set "
             f"promotion.underpowered: warn to run anyway (the check will stay undecided)" for p in doubtful]
    hopeless = [line for p, line in zip(doubtful, lines) if (p.measured or p.unit in SHARES)
                and replace(p, sd=_prior(p.check, p.unit)).verdict(c) == "cannot"]
    if hopeless and cfg.promotion.underpowered == "error":
        raise ConfigError(hopeless, "power")
    return lines


def _key(cfg: PipelineConfig) -> str:
    """The model (`model_name`: another model's runs, even on the same base and data, say nothing
    of this one's adapters), its base and where the evidence comes from (paths, not contents: new
    data of a scheduled pipeline keeps the spread its source showed before)."""
    ref = cfg.evaluation.reference
    parts = [cfg.model_name, cfg.base_model.name_or_path, cfg.base_model.revision, cfg.task, cfg.data.eval_path or cfg.data.train_path,
             cfg.evaluation.generation.metric if cfg.evaluation.generation else None,
             ref.model_dump(mode="json") if ref else None, cfg.training.max_seq_length]
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _path(cfg: PipelineConfig) -> Path:
    return cache_dir() / "power" / f"{_key(cfg)}.json"


def _recall(cfg: PipelineConfig) -> dict[str, dict]:
    try:
        return json.loads(_path(cfg).read_text())
    except (OSError, ValueError):
        return {}


def remember(cfg: PipelineConfig, eval_rows: int, intervals: dict[str, list[float]], run_id: str,
             share: float = 1.0) -> dict[str, dict]:
    """Keep the spread per unit each check showed in this run (`intervals`: the report's
    `[point, low, high]`, on `share` of the evidence: `gate_share` when a remedy's confirm part
    was read), for the next run's plan."""
    known, z = _recall(cfg), _z(cfg.promotion.confidence)
    names = {"champion": "champion_delta"}
    for check, _, planned in _evidence(cfg, eval_rows):
        bounds, size = intervals.get(names.get(check, check)), max(1, round(planned * share))
        if bounds and size > 1 and all(math.isfinite(b) for b in bounds[1:]) and bounds[2] > bounds[1]:
            known[check] = {"sd": (bounds[2] - bounds[1]) / (2 * z) * math.sqrt(size), "size": size,
                            "run_id": run_id, "at": time.time()}
    path = _path(cfg)
    try:  # a cache that cannot be written costs the next plan its measured spreads, never the run
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(known, indent=1))
        tmp.replace(path)
    except OSError:
        pass
    return known


def save(cfg: PipelineConfig, checks: list[CheckPower], path: Path) -> None:
    """The plan as JSON rows (the run folder's `power.json`, logged under the run's `reports/`)."""
    c = cfg.promotion.confidence
    rows = [{**asdict(p), "verdict": p.verdict(c), "power_if_harmless": p.power_if_harmless(c),
             "smallest_shown": p.smallest_shown(c), "needed": _finite_or_none(p.needed(c))} for p in checks]
    path.write_text(json.dumps({"confidence": c, "power": POWER, "checks": rows}, indent=1))


def _finite_or_none(x: float | None) -> float | None:
    return x if x is not None and math.isfinite(x) else None
