"""The gate's error rates and evidence, simulated: today's fixed-size bootstrap against the staged
check on a confidence sequence (`prefect_lora.lora_tasks.measurement.sequential`), on synthetic paired scores.

    python bench/gate_simulation.py [--gates 1000] [--out bench/results/gate-simulation.json]

One forgetting check (non-inferiority: pass iff the interval's upper bound <= limit), two kinds
of per-unit paired differences:
- `benchmark`: a question's accuracy drop base - adapted in {-1, 0, 1}; the adapter changes the
  answer to a share `q` of the questions (default 0.15), true drop `delta`;
- `continuous`: normal differences, sd 1 (an eval row's loss, a probe's log-perplexity ratio).
True effects: `harmless` (delta 0: should pass), `at-limit` (delta = limit: promoting it is the
error the gate must bound by 1 - confidence), `clear-fail` (twice the limit), `clear-pass`
(the adapter is better than the base by the limit).

Designs, each at the same 80% power for a harmless adapter:
- `fixed`: the gate as it is, `stats.paired_diff_ci` (percentile bootstrap, 1000 resamples) on
  n units, n the classic size for 80% power;
- `retest`: the fixed-size bootstrap re-run after every stage until it passes (what the staged
  check replaces: its false promotions show why a plain interval cannot be looked at twice);
- `staged`: `sequential.staged_check` at looks from n/4 growing 1.5x up to a budget, the smallest
  budget (a multiple of n) whose power at harmless is >= 80%.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from statistics import NormalDist

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from prefect_lora.lora_tasks.measurement import sequential, stats

SCENARIOS = {"clear-pass": -1.0, "harmless": 0.0, "at-limit": 1.0, "clear-fail": 2.0}
"""True effect, in multiples of the limit."""


def draw(kind: str, delta: float, n: int, rng: np.random.Generator, q: float) -> np.ndarray:
    if kind == "benchmark":
        p_up, p_down = max(0.0, (q + delta) / 2), max(0.0, (q - delta) / 2)
        return rng.choice([1.0, -1.0, 0.0], size=n, p=[p_up, p_down, 1 - p_up - p_down])
    return rng.normal(delta, 1.0, n)


def fixed_gate(values: np.ndarray, limit: float, confidence: float, seed: int) -> str:
    ci = stats.paired_diff_ci(values, np.zeros_like(values), confidence=confidence, seed=seed)
    return sequential.outcome(ci, limit, upper_is_worse=True)


def simulate(kind: str, limit: float, q: float, gates: int, confidence: float, seed: int) -> dict:
    sd = math.sqrt(q) if kind == "benchmark" else 1.0
    z, zb = NormalDist().inv_cdf((1 + confidence) / 2), NormalDist().inv_cdf(0.8)
    n_fixed = math.ceil(((z + zb) * sd / limit) ** 2)
    rng = np.random.default_rng(seed)
    samples = {s: [draw(kind, f * limit, 4 * n_fixed, rng, q) for _ in range(gates)] for s, f in SCENARIOS.items()}

    def staged(budget: int, scenario: str) -> list[sequential.Staged]:
        stages = sequential.looks(max(2, n_fixed // 4), budget)
        return [sequential.staged_check(v, limit, True, stages, confidence) for v in samples[scenario]]

    budget = next(b for b in (math.ceil(n_fixed * m) for m in (1.0, 1.25, 1.5, 1.75, 2.0, 2.5, 3.0, 4.0))
                  if np.mean([r.outcome == "pass" for r in staged(b, "harmless")]) >= 0.8)
    stages = sequential.looks(max(2, n_fixed // 4), budget)
    out = {"kind": kind, "limit": limit, "sd": sd, "n_fixed": n_fixed, "staged_budget": budget, "stages": stages,
           "scenarios": {}}
    for scenario in SCENARIOS:
        t0 = time.perf_counter()
        fixed = [fixed_gate(v[:n_fixed], limit, confidence, i) for i, v in enumerate(samples[scenario])]
        retest = []
        for i, v in enumerate(samples[scenario]):  # look again after every stage until it passes
            seen = [fixed_gate(v[:n], limit, confidence, i) for n in stages]
            retest.append("pass" if "pass" in seen else seen[-1])
        runs = staged(budget, scenario)
        out["scenarios"][scenario] = {
            "fixed_pass": float(np.mean([o == "pass" for o in fixed])),
            "retest_pass": float(np.mean([o == "pass" for o in retest])),
            "staged_pass": float(np.mean([r.outcome == "pass" for r in runs])),
            "staged_undecided": float(np.mean([r.outcome == "undecided" for r in runs])),
            "fixed_undecided": float(np.mean([o == "undecided" for o in fixed])),
            "staged_mean_units": float(np.mean([r.units for r in runs])),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    evidence = [s["staged_mean_units"] for s in out["scenarios"].values()]
    out["staged_mean_units"] = float(np.mean(evidence))
    out["evidence_saved"] = 1 - out["staged_mean_units"] / n_fixed
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--gates", type=int, default=1000)
    ap.add_argument("--confidence", type=float, default=0.95)
    ap.add_argument("--benchmark-limit", type=float, default=0.05)
    ap.add_argument("--continuous-limit", type=float, default=0.2)
    ap.add_argument("--changed-share", type=float, default=0.15, help="q: share of questions the adapter changes")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=f"bench/results/gate-simulation-{time.strftime('%Y%m%d-%H%M%S')}.json")
    a = ap.parse_args()
    results = [simulate("benchmark", a.benchmark_limit, a.changed_share, a.gates, a.confidence, a.seed),
               simulate("continuous", a.continuous_limit, a.changed_share, a.gates, a.confidence, a.seed + 1)]
    print(f"{a.gates} simulated gates per scenario, confidence {a.confidence}; pass rates (at-limit = false promotion)")
    print("| kind | scenario | fixed pass | retest pass | staged pass | staged undecided | staged units (fixed n) |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for r in results:
        for name, s in r["scenarios"].items():
            print(f"| {r['kind']} | {name} | {s['fixed_pass']:.3f} | {s['retest_pass']:.3f} | {s['staged_pass']:.3f} | "
                  f"{s['staged_undecided']:.3f} | {s['staged_mean_units']:.0f} ({r['n_fixed']}) |")
        print(f"| {r['kind']} | mean evidence | | | | | {r['staged_mean_units']:.0f} vs {r['n_fixed']}: "
              f"{r['evidence_saved']:.0%} less (budget {r['staged_budget']}, looks {r['stages']}) |")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"gates": a.gates, "confidence": a.confidence, "results": results}, indent=1))
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
