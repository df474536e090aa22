"""The staged rollout's test on synthetic signal streams: how often a version as good as the
previous one is rolled back (must be <= `false_rollback_rate`), and how soon a worse one is.

    python bench/rollout_simulation.py [--rollouts 1000] [--rate 10] [--steps 0.05,0.25,1.0]
                                       [--min-requests 200] [--hold-s 60] [--out bench/results/rollout-simulation.json]

Champion-bound requests arrive at `rate` per second (Poisson, 1 s ticks, as the gateway's
controller ticks); each goes to the new version with the step's share, else to the previous
version. A request fails (5xx) with its version's error rate; an answered one fails its output
check, is cut at `max_tokens`, stops mid-sentence and is off its prompt with the version's rates; its latency is lognormal (median,
sigma) and counted in the live signals' histogram buckets; the previous version served alone
for a minute before the rollout (its latency reference). Each step's verdicts come from the
gateway's own code (`deploy/rollout.py`: `judge` on `Tally`s of both versions since the step's
start), evaluated at every tick where a look falls due (between them the verdict is `hold`).
Pure Python and numpy; seconds to run.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefect_lora.deploy.live_signals import LATENCY_BOUNDS_S, Tally
from prefect_lora.deploy.rollout import RolloutConfig, judge, plan, reference_bucket


@dataclass(frozen=True)
class Version:
    errors: float = 0.01
    checks: float = 0.03
    truncated: float = 0.05
    unfinished: float = 0.04
    off_prompt: float = 0.02
    latency_median_s: float = 0.5
    latency_sigma: float = 0.3


@functools.cache
def buckets(v: Version) -> np.ndarray:
    """The chance of each latency bucket (`LATENCY_BOUNDS_S`, the last one open) for version `v`."""
    from statistics import NormalDist

    lognormal = NormalDist(math.log(v.latency_median_s), v.latency_sigma)
    cdf = [lognormal.cdf(math.log(b)) for b in LATENCY_BOUNDS_S]
    return np.diff(np.concatenate([[0.0], cdf, [1.0]]))


PREVIOUS = Version()
CASES = {
    "equal": PREVIOUS,
    "equal, rare errors (0.1%)": replace(PREVIOUS, errors=0.001),
    "broken: output checks 62% vs 3%": replace(PREVIOUS, checks=0.62),
    "output checks 2x (6% vs 3%)": replace(PREVIOUS, checks=0.06),
    "errors 5x (5% vs 1%)": replace(PREVIOUS, errors=0.05),
    "truncated 30% vs 5%": replace(PREVIOUS, truncated=0.30),
    "early end token: stopped mid-sentence 60% vs 4%": replace(PREVIOUS, unfinished=0.60),
    "wrong language: off the prompt 90% vs 2%": replace(PREVIOUS, off_prompt=0.90),
    "slow: latency 1.5x": replace(PREVIOUS, latency_median_s=0.75),
}
"""The new version of each case; the previous version is `PREVIOUS` (an equal case: the same)."""


def stream(rng: np.random.Generator, v: Version, n: np.ndarray) -> dict[str, np.ndarray]:
    """Per tick, cumulative: requests, 5xx, failed checks, truncated, unfinished, off prompt, latency buckets of `n[t]` requests."""
    errors = rng.binomial(n, v.errors)
    answered = n - errors
    lat = rng.multinomial(n, buckets(v))
    return {"n": np.cumsum(n), "errors": np.cumsum(errors), "checks": np.cumsum(rng.binomial(answered, v.checks)),
            "truncated": np.cumsum(rng.binomial(answered, v.truncated)),
            "unfinished": np.cumsum(rng.binomial(answered, v.unfinished)),
            "off_prompt": np.cumsum(rng.binomial(answered, v.off_prompt)), "latency": np.cumsum(lat, axis=0)}


def tally(s: dict[str, np.ndarray], t: int) -> Tally:
    n, errors = int(s["n"][t]), int(s["errors"][t])
    return Tally(requests=n, errors=errors, latency=[int(x) for x in s["latency"][t]], generated=n - errors,
                 failed_checks=int(s["checks"][t]), truncated=int(s["truncated"][t]), off_prompt=int(s["off_prompt"][t]),
                 unfinished=int(s["unfinished"][t]))


def run_step(rng, cfg: RolloutConfig, share: float, new: Version, rate: float, history: Tally
             ) -> tuple[str, int, int, str, Tally]:
    """One step: (verdict, seconds it took, the new version's requests, reason, the previous
    version's counts in the step); `history` is the previous version's counts before it."""
    ticks = int(max(cfg.hold_s, 1.5 * cfg.min_requests / (rate * share))) + 30
    total = rng.poisson(rate, ticks)
    to_new = rng.binomial(total, share)
    a, b = stream(rng, new, to_new), stream(rng, PREVIOUS, total - to_new)
    stages, looked = plan(cfg), -1
    due = sorted({int(np.searchsorted(a["n"], k)) for k in stages} | {math.ceil(cfg.hold_s) - 1})
    for t in (t for t in due if 0 <= t < ticks):
        verdict = judge(cfg, tally(a, t), tally(b, t), held_s=t + 1, looked=looked, previous="1",
                        latency_bucket=reference_bucket(history))
        looked = verdict.look if verdict.look is not None else looked
        if verdict.action != "hold":
            return verdict.action, t + 1, int(a["n"][t]), verdict.reason, tally(b, t)
    return "hold", ticks, int(a["n"][-1]), "still holding", tally(b, ticks - 1)


def run_rollout(rng, cfg: RolloutConfig, new: Version, rate: float) -> dict:
    """One rollout, after the previous version served alone for a minute (its latency reference)."""
    seconds = requests = 0
    history = tally(stream(rng, PREVIOUS, rng.poisson(rate, 60)), 59)
    for share in cfg.steps[:-1]:
        action, s, n, reason, served = run_step(rng, cfg, share, new, rate, history)
        seconds, requests, history = seconds + s, requests + n, history + served
        if action != "advance":
            return {"end": "rolled back" if action == "rollback" else "held", "seconds": seconds, "requests": requests,
                    "reason": reason}
    return {"end": "completed", "seconds": seconds, "requests": requests, "reason": ""}


def summarise(ends: list[dict]) -> dict:
    rolled = [e for e in ends if e["end"] == "rolled back"]
    done = [e for e in ends if e["end"] == "completed"]
    med = lambda xs: float(np.median(xs)) if xs else float("nan")
    return {"rollbacks": len(rolled) / len(ends), "completed": len(done) / len(ends),
            "rollback_median_s": med([e["seconds"] for e in rolled]),
            "rollback_p90_s": float(np.percentile([e["seconds"] for e in rolled], 90)) if rolled else float("nan"),
            "rollback_median_requests": med([e["requests"] for e in rolled]),
            "complete_median_s": med([e["seconds"] for e in done]),
            "example": rolled[0]["reason"] if rolled else ""}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rollouts", type=int, default=1000)
    ap.add_argument("--rate", type=float, default=10.0, help="champion-bound requests per second")
    ap.add_argument("--steps", default="0.05,0.25,1.0")
    ap.add_argument("--min-requests", type=int, default=200)
    ap.add_argument("--hold-s", type=float, default=60.0)
    ap.add_argument("--false-rollback-rate", type=float, default=0.05)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=f"bench/results/rollout-simulation-{time.strftime('%Y%m%d-%H%M%S')}.json")
    a = ap.parse_args()
    cfg = RolloutConfig(steps=[float(s) for s in a.steps.split(",")], min_requests=a.min_requests, hold_s=a.hold_s,
                        false_rollback_rate=a.false_rollback_rate)
    rng, results, started = np.random.default_rng(a.seed), {}, time.perf_counter()
    print(f"{a.rollouts} rollouts per case, {a.rate:g} champion-bound requests/s, steps {cfg.steps}, "
          f"min_requests {cfg.min_requests}, hold_s {cfg.hold_s:g}, false_rollback_rate {cfg.false_rollback_rate}")
    print(f"{'new version':34} {'rolled back':>11} {'completed':>9} {'to rollback: median s':>21} {'p90 s':>6} "
          f"{'its requests':>12} {'to complete: median s':>21}")
    for case, new in CASES.items():
        r = results[case] = summarise([run_rollout(rng, cfg, new, a.rate) for _ in range(a.rollouts)])
        print(f"{case:34} {r['rollbacks']:>11.1%} {r['completed']:>9.1%} {r['rollback_median_s']:>21.0f} "
              f"{r['rollback_p90_s']:>6.0f} {r['rollback_median_requests']:>12.0f} {r['complete_median_s']:>21.0f}")
    for case, r in results.items():
        if r["example"]:
            print(f"  e.g. {case}: {r['example']}")
    print(f"({time.perf_counter() - started:.1f} s)")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"config": cfg.model_dump(), "rate": a.rate, "rollouts": a.rollouts,
                                       "previous": PREVIOUS.__dict__, "results": results}, indent=1))


if __name__ == "__main__":
    main()
