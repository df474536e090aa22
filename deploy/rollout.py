"""A staged rollout's decisions: after a promotion the new champion takes a share of the
champion-bound traffic beside the previous champion, and each step's live signals of both
versions, counted over the same window (`SignalStore.since(mark)`), decide whether it holds,
advances or is rolled back.

The test is the gate's sequential look (`lora_tasks/measurement/sequential.py`) applied to live
counts. Per signal (`SIGNALS`: 5xx errors, failed output checks, answers cut at `max_tokens`,
answers that stopped mid-sentence, answers off their prompt, latency above the previous version's p95) a one-sided exact test asks
whether the new version's rate is above the previous version's: Fisher's exact test, conditional
on the window's total of bad outcomes (exact at any count, where a normal approximation would roll
back on a handful of rare errors). A step looks at planned counts of the new version's requests
(`plan`: from `FIRST_LOOK` up to `min_requests`, growing 1.5x) and compares each look's p-value
with the boundary of a group-sequential design over those looks (`boundaries`, Pocock's shape: a broken
version is caught at the first looks, not only at the last). The error is split evenly over the
compared steps and the signals (Bonferroni), so a version as good as the previous one is rolled
back with chance at most `false_rollback_rate` over its whole rollout (bench/rollout_simulation.py
measures it). A step advances at its last look (at least `min_requests` of the new version's
requests and `hold_s` seconds) when no signal was worse at any look.

Pure: no Ray, MLflow or Prefect (`rollout_control` acts on the verdicts), so unit tests drive
it with tallies of their own."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import lru_cache
from itertools import pairwise
from statistics import NormalDist
from typing import Literal

from prefect_lora.deploy.live_signals import LATENCY_BOUNDS_S, Tally
from prefect_lora.lora_tasks.config_io import StrictNumbers
from prefect_lora.lora_tasks.measurement.sequential import boundaries, looks
from pydantic import ConfigDict, Field, field_validator

FIRST_LOOK = 5
"""The new version's requests at a step's first look: a version failing every answer is shown
worse there (at a 5% share its 5 failures against none among the previous version's ~95 give
p = 1e-8)."""
SHAPE = 0.5
"""Wang-Tsiatis shape of the looks' boundaries: 0.5 is Pocock's (the same boundary at every
look), for the earliest rollback of a broken version; the gate's O'Brien-Fleming (0) would need
~15 of its answers at a first look for what Pocock's shows with 5."""
LATENCY_QUANTILE = 0.95
"""The latency signal is the share of requests slower than this quantile of the previous
version's latencies before the step began (a bucket bound of the histogram)."""
MIN_REFERENCE = 20
"""Requests of the previous version before a step that make its latency reference; with fewer
(a server that just started), both versions' latencies in the window together make it."""


class RolloutConfig(StrictNumbers):
    """A staged rollout after each promotion (the serve config's `rollout`; absent: a promotion
    takes all traffic at once)."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True)

    steps: list[float] = Field(default_factory=lambda: [0.05, 0.25, 1.0])
    """Shares of the champion-bound traffic the new champion takes, in order (the rest goes to
    the previous champion); the last is 1.0, where the rollout completes."""
    min_requests: int = Field(200, ge=FIRST_LOOK)
    """Requests the new champion answers at a step before the step may advance: the evidence
    each step's test plans for (it looks from 5 requests on)."""
    hold_s: float = Field(60.0, ge=0)
    """Least seconds at each step before it may advance."""
    false_rollback_rate: float = Field(0.05, gt=0, lt=0.5)
    """The chance that a version as good as the previous one is rolled back over its whole
    rollout (every step, signal and look together)."""
    rollback: Literal["serve", "prefect"] = "serve"
    """`serve`: the server moves `champion` back itself (audited as `prefect-lora rollback`);
    `prefect`: it sends the new version no more traffic and emits
    `prefect-lora.rollout.rollback-requested`, for a Prefect automation to run the rollback flow
    (prefect.yaml)."""

    @field_validator("steps")
    @classmethod
    def _check_steps(cls, steps: list[float]) -> list[float]:
        if not steps or steps[-1] != 1.0:
            raise ValueError("the last step must be 1.0 (all of the champion's traffic): the rollout completes there")
        if any(not 0 < s <= 1 for s in steps) or any(b <= a for a, b in pairwise(steps)):
            raise ValueError(f"steps must rise from above 0 to 1.0, each share larger than the one before, not {steps}")
        return steps

    @property
    def compared_steps(self) -> int:
        """Steps at which both versions take traffic (all but the last)."""
        return len(self.steps) - 1


# ----------------------------------------------------------------------------- one signal


SIGNALS: dict[str, str] = {
    "errors": "errors (5xx)",
    "output_checks": "output-check failures",
    "truncated": "answers cut at max_tokens",
    "unfinished": "answers that stopped mid-sentence",
    "off_prompt": "answers off their prompt (another language, or no value drawn from it)",
    "latency": "requests slower than the previous version's p95",
}
"""The signals each look compares (name: what its rate counts)."""


def counts(signal: str, t: Tally, latency_bucket: int) -> tuple[int, int]:
    """`(bad, of)` of one signal in a version's window."""
    if signal == "errors":
        return t.errors, t.served
    if signal == "output_checks":
        return t.failed_checks, t.generated
    if signal == "truncated":
        return t.truncated, t.generated
    if signal == "unfinished":
        return t.unfinished, t.generated
    if signal == "off_prompt":
        return t.off_prompt, t.generated
    return sum(t.latency[latency_bucket + 1:]), sum(t.latency)  # slower than the bucket's bound


def quantile_bucket(latency: list[int], q: float = LATENCY_QUANTILE) -> int:
    """The histogram bucket holding the `q` quantile of `latency` (counts per bucket)."""
    rank, below = q * sum(latency), 0
    for i, n in enumerate(latency):
        below += n
        if below >= rank:
            return i
    return len(latency) - 1


def reference_bucket(previous_before: Tally) -> int | None:
    """The latency signal's threshold for a step: the previous version's p95 bucket over its
    requests before the step began. Data the step's window does not hold, so the exact test stays
    exact; and a slow new version cannot lift it (a threshold read off the window would be its
    own slow bucket once its slow requests pass 5% of the window's)."""
    return quantile_bucket(previous_before.latency) if sum(previous_before.latency) >= MIN_REFERENCE else None


def pooled_bucket(a: Tally, b: Tally) -> int:
    """Without a reference: the p95 bucket of both versions' latencies in the window together, a
    threshold chosen without knowing which version a request went to (exact under the null)."""
    return quantile_bucket([x + y for x, y in zip(a.latency, b.latency)])


def worse_p_value(bad_new: int, n_new: int, bad_old: int, n_old: int) -> float:
    """One-sided p-value of "the new version's rate is above the previous one's": Fisher's exact
    test, the chance that `n_new` requests drawn from the window's `n_new + n_old` would hold
    `bad_new` or more of its `bad_new + bad_old` bad outcomes (the hypergeometric upper tail)."""
    total, bad = n_new + n_old, bad_new + bad_old
    if bad_new <= 0 or n_old <= 0:
        return 1.0
    top = min(bad, n_new)

    def log_choose(n: int, k: int) -> float:
        return math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)

    term = math.exp(log_choose(bad, bad_new) + log_choose(total - bad, n_new - bad_new) - log_choose(total, n_new))
    p, x = 0.0, bad_new
    while term > 0 and x <= top:
        p += term
        if term < p * 1e-12:
            break
        term *= (bad - x) * (n_new - x) / ((x + 1) * (total - bad - n_new + x + 1))
        x += 1
    return min(p, 1.0)


def wilson(bad: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a rate (sound at 0 and at a handful of requests)."""
    if n <= 0:
        return 0.0, 1.0
    p = bad / n
    centre, half = (p + z * z / (2 * n)), z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, (centre - half) / (1 + z * z / n)), min(1.0, (centre + half) / (1 + z * z / n))


@dataclass(frozen=True)
class Comparison:
    """One signal at one look: both versions' counts, the p-value and the look's threshold."""

    signal: str
    bad_new: int
    n_new: int
    bad_old: int
    n_old: int
    p_value: float
    threshold: float
    latency_bound_s: float | None = None

    @property
    def worse(self) -> bool:
        return self.p_value <= self.threshold

    def describe(self, previous: str) -> str:
        """`output-check failures 0.62 [0.51, 0.72] vs 0.02 on the previous version 1, 240 requests`."""
        low, high = wilson(self.bad_new, self.n_new)
        what = SIGNALS[self.signal]
        if self.latency_bound_s is not None:
            what = f"requests slower than {self.latency_bound_s:g} s (the previous version's p95)"
        return (f"{what} {self.bad_new / self.n_new:.2f} [{low:.2f}, {high:.2f}] vs {self.bad_old / self.n_old:.2f} "
                f"on the previous version{' ' * bool(previous)}{previous}, {self.n_new} requests vs {self.n_old} "
                f"(one-sided p {self.p_value:.2g} <= {self.threshold:.2g})")

    def figures(self) -> dict:
        return {"signal": self.signal, "bad": self.bad_new, "of": self.n_new, "previous_bad": self.bad_old,
                "previous_of": self.n_old, "p_value": self.p_value, "threshold": self.threshold,
                **({"latency_bound_s": self.latency_bound_s} if self.latency_bound_s is not None else {})}


# ----------------------------------------------------------------------------- one look


def plan(cfg: RolloutConfig) -> tuple[int, ...]:
    """The new version's request counts at which a step looks: 5, then 1.5x, up to `min_requests`."""
    return _plan(cfg.min_requests)


@lru_cache(maxsize=64)
def _plan(min_requests: int) -> tuple[int, ...]:
    return tuple(looks(FIRST_LOOK, min_requests))


def thresholds(cfg: RolloutConfig) -> tuple[float, ...]:
    """Each look's largest p-value that shows a signal worse: the one-sided tail beyond the
    look's group-sequential boundary, at the error of one signal at one step."""
    return _thresholds(plan(cfg), cfg.false_rollback_rate / (cfg.compared_steps * len(SIGNALS)))


@lru_cache(maxsize=64)
def _thresholds(stages: tuple[int, ...], alpha: float) -> tuple[float, ...]:
    return tuple(NormalDist().cdf(-z) for z in boundaries(stages, alpha, SHAPE))


@dataclass(frozen=True)
class Verdict:
    """What a step does now: `hold` (no look due, or a look that found nothing yet), `advance`
    (its last look found no signal worse), `rollback` (a signal is worse)."""

    action: Literal["hold", "advance", "rollback"]
    reason: str
    look: int | None = None
    """The look this verdict took (0-based), None when none was due."""
    comparisons: tuple[Comparison, ...] = field(default=())

    @property
    def worst(self) -> Comparison | None:
        """The signal that decided a rollback (the smallest p-value against its threshold)."""
        worse = [c for c in self.comparisons if c.worse]
        return min(worse, key=lambda c: c.p_value / c.threshold) if worse else None


def due_look(cfg: RolloutConfig, n_new: int, held_s: float, looked: int) -> int | None:
    """The look to take now: the last planned count the new version's requests reached (the last
    look also waits for `hold_s`), if not taken yet."""
    stages = plan(cfg)
    k = max((i for i, n in enumerate(stages) if n <= n_new), default=-1)
    if k == len(stages) - 1 and held_s < cfg.hold_s:
        k -= 1
    return k if k > looked else None


def compare(new: Tally, old: Tally, threshold: float, latency_bucket: int | None = None) -> list[Comparison]:
    """Every signal that applies (both versions have units of it) at one look; latency above
    `latency_bucket` (`reference_bucket`; None: `pooled_bucket`)."""
    bucket = pooled_bucket(new, old) if latency_bucket is None else latency_bucket
    bound = LATENCY_BOUNDS_S[bucket] if bucket < len(LATENCY_BOUNDS_S) else None
    out = []
    for signal in SIGNALS:
        (bad_new, n_new), (bad_old, n_old) = counts(signal, new, bucket), counts(signal, old, bucket)
        if n_new and n_old:
            out.append(Comparison(signal, bad_new, n_new, bad_old, n_old, worse_p_value(bad_new, n_new, bad_old, n_old),
                                  threshold, bound if signal == "latency" else None))
    return out


def judge(cfg: RolloutConfig, new: Tally, old: Tally, *, held_s: float, looked: int, previous: str = "",
          latency_bucket: int | None = None) -> Verdict:
    """One step's verdict on the window so far: `new` and `old` are both versions' counts since
    the step began, `held_s` its age, `looked` the last look it took (-1: none), `latency_bucket`
    the step's latency threshold (`reference_bucket`)."""
    stages = plan(cfg)
    k = due_look(cfg, new.served, held_s, looked)
    if k is None:
        waiting = (f"{new.served} of {stages[-1]} requests" if new.served < stages[-1]
                   else f"{held_s:.0f} of {cfg.hold_s:g} s")
        return Verdict("hold", f"collecting evidence: {waiting}")
    if not old.served:
        return Verdict("hold", "the previous version answered nothing in this window: nothing to compare with", k)
    found = tuple(compare(new, old, thresholds(cfg)[k], latency_bucket))
    where = f"look {k + 1} of {len(stages)}"
    verdict = Verdict("hold", "", k, found)
    if (worst := verdict.worst) is not None:
        return Verdict("rollback", f"rollback: {worst.describe(previous)}, {where}", k, found)
    summary = f"no signal worse at {where} ({new.served} requests vs {old.served})"
    return Verdict("advance" if k == len(stages) - 1 else "hold", summary, k, found)


# ----------------------------------------------------------------------------- a rollout's state


RUNNING, ROLLING_BACK, ROLLBACK_REQUESTED = "running", "rolling-back", "rollback-requested"
ROLLED_BACK, COMPLETED, SUPERSEDED = "rolled-back", "completed", "superseded"
RESUMABLE = (RUNNING, ROLLING_BACK, ROLLBACK_REQUESTED)
"""States a restarted gateway picks up from the version's tags."""


@dataclass
class Rollout:
    """One model's rollout of `version` beside `previous`: its step, the step's window (`mark`
    and `started`, on the signal store's clock) and the last look taken."""

    name: str
    version: str
    previous: str
    step: int = 0
    state: str = RUNNING
    mark: dict = field(default_factory=dict)
    started: float = 0.0
    looked: int = -1
    reason: str = ""
    latency_bucket: int | None = None
    details: dict = field(default_factory=dict)
    """The figures of the look that decided a rollback (for its audit record)."""

    def share(self, cfg: RolloutConfig) -> float:
        """The new version's share of champion-bound traffic now (none once a rollback is decided)."""
        if self.state == RUNNING:
            return cfg.steps[self.step]
        return 1.0 if self.state == COMPLETED else 0.0

    def route(self, cfg: RolloutConfig, draw: float) -> str:
        """The version a champion-bound request runs on, for a uniform `draw` in [0, 1)."""
        return self.version if draw < self.share(cfg) else self.previous

    def begin_step(self, step: int, mark: dict, now: float, previous_key: str) -> None:
        """Start step `step`'s window at `mark` (the store's counts now, holding `previous_key`'s latency reference)."""
        self.step, self.mark, self.started, self.looked = step, mark, now, -1
        self.latency_bucket = reference_bucket(mark.get(previous_key, (None, Tally()))[1])
