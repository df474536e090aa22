"""Remedies for forgetting on the demo task, under the default policy: what they keep of the
unconstrained adapter's gain, how much less they forget, what they cost. Prints a table, writes
JSON and the frontier of every trial (docs/remedy-frontier.png).

    python bench/remedy.py [--arms unconstrained,remedied,destructive] [--out bench/results/remedy.json]

Each arm is `prefect-lora run configs/demo.yaml` as a user runs it (after `prefect-lora demo
prepare`), in its own storage and MLflow store (nothing is resumed or compared across arms):
- `unconstrained`: the demo's adapter without replay (48 steps) as trained (scale 1 only), scored
  on the same split;
- `remedied`: configs/demo.yaml as shipped (replay with the KL penalty; the scale remedy if refused);
- `destructive`: learning rate 1e-2, remedies on: remedied to an admissible adapter or refused;
- `scale`: the scale remedy alone on the adapter without replay;
- `frontier`, `replay`, `replay-kl`: every default scale of the adapter without replay, of one
  trained with replay (share 0.2, the base's own answers), and of one with replay and the
  KL-to-base penalty (`replay.kl_weight` 1), all 48 steps: the points of the frontier plot;
- `replay-kl-60`: replay 0.2 with the penalty and 60 steps (as many task examples as 48 without).
Every arm runs under the default policy (max self-retention and perplexity ratio 1.2, KL 0.5).
Targets (issue 14): remedied keeps >= 90% of the unconstrained gain with each ratio's excess over
1 (upper bound) at most half the unconstrained one's, in <= 2x its wall time.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

# The demo's adapter before replay: 48 steps of task examples only.
PLAIN = ["replay.share=0.0", "replay.kl_weight=0.0", "training.max_steps=48"]
ALL_SCALES = ["remedy.when=always", "remedy.scales=[1.0,0.8,0.65,0.5,0.35]"]
ARMS = {
    # The adapter as trained, scored on the same confirm part as the remedied one (search part,
    # then confirm part: all eval rows and probes once, as a plain run scores them).
    "unconstrained": [*PLAIN, "remedy.strategy=scale", "remedy.scales=[1.0]"],
    # configs/demo.yaml as shipped: replay (share 0.1) with the KL penalty, 54 steps, the scale remedy if refused.
    "remedied": [],
    "destructive": ["training.learning_rate=1e-2"],
    # The scale remedy alone, on the plain adapter (the demo's remedy before replay).
    "scale": PLAIN,
    # The frontier: every default scale of the plain adapter, of one trained with replay (share
    # 0.2, same 48 steps), and of one trained with that replay and the KL penalty.
    "frontier": [*PLAIN, *ALL_SCALES],
    "replay": ["replay.share=0.2", "replay.kl_weight=0.0", "training.max_steps=48", *ALL_SCALES],
    "replay-kl": ["replay.share=0.2", "replay.kl_weight=1.0", "training.max_steps=48", *ALL_SCALES],
    # Replay with the KL penalty at the demo's number of task examples (replay rows on top: more steps).
    "replay-kl-60": ["replay.share=0.2", "replay.kl_weight=1.0", "training.max_steps=60"],
}
DEFAULT_POLICY = ["promotion.max_perplexity_ratio=1.2", "promotion.max_self_retention_ratio=1.2", "promotion.max_kl=0.5"]
RATIO = "self_retention_perplexity_ratio"


def run_arm(name: str, config: str, root: Path) -> dict:
    """One `prefect-lora run` in its own stores; its wall time, outcome and the figures the gate read."""
    store = root / name
    sets = [*DEFAULT_POLICY, *ARMS[name], f"scaling.storage_path={store}/runs",
            f"tracking.tracking_uri=sqlite:///{store}/mlflow.db", f"tracking.artifact_location={store}/mlartifacts"]
    cmd = [str(Path(sys.executable).with_name("prefect-lora")), "run", config, *[a for s in sets for a in ("--set", s)]]
    started = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - started
    text = proc.stdout + proc.stderr
    if proc.returncode not in (0, 1):  # 1: refused by the gate, still a result
        raise SystemExit(f"{name}: exit {proc.returncode}\n{text[-3000:]}")
    report_path = next((store / "runs").rglob("eval_report.json"))
    report = json.loads(report_path.read_text())
    iv = report["intervals"]
    return {
        "arm": name, "wall_s": round(wall, 1), "promoted": "promoted to champion" in text,
        "exact_match": [report["adapted"]["exact_match"], *iv["adapted_exact_match"][1:]],
        "task_gain": iv["task_gain"], "evidence": report["evidence"], "adapter_scale": report["adapter_scale"],
        **{k: iv[k] for k in (RATIO, "self_retention_kl") if k in iv},
        "remedy": {k: report["remedy"].get(k) for k in ("chosen", "needed", "seconds", "trainings")} if report["remedy"] else {},
        "trials": report["remedy"].get("trials", []) if report["remedy"] else [],
        "timings": report["timings"], "eval_seconds": report["seconds"],
    }


def plot_frontier(results: list[dict], path: Path) -> None:
    """Every trial of every arm (search part, filled = admissible) and each arm's reported figures
    (confirm part, squares with intervals): gain against self-retention, and against KL."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5), dpi=110, sharey=True)
    colors = {"unconstrained": "tab:red", "remedied": "tab:blue", "destructive": "tab:purple", "frontier": "tab:gray",
              "replay": "tab:green", "replay-kl": "tab:olive", "replay-kl-60": "tab:cyan", "scale": "tab:pink"}
    for ax, key, limit, label in ((axes[0], RATIO, 1.2, "self-retention perplexity ratio (base's own answers)"),
                                  (axes[1], "self_retention_kl", 0.5, "KL(base || adapted) per token on the probes")):
        for r in results:
            if r["arm"] == "destructive":
                continue  # far off the scale (ratio ~300): refused at every scale
            for t in r["trials"]:
                (g, *_), (f, *_) = t["task_gain"], t["forgetting"].get(key, [None])
                if f is not None:
                    ax.plot([f], [g], "o", color=colors[r["arm"]], alpha=0.7,
                            markerfacecolor=None if t["admissible"] else "white")
                    ax.annotate(t["name"], (f, g), textcoords="offset points", xytext=(4, 3), fontsize=6)
            if key in r:
                (g, g_lo, g_hi), (f, f_lo, f_hi) = r["task_gain"], r[key]
                ax.errorbar([f], [g], xerr=[[f - f_lo], [f_hi - f]], yerr=[[g - g_lo], [g_hi - g]], fmt="s", capsize=3,
                            color=colors[r["arm"]],
                            label=f"{r['arm']}: {'promoted ' + str(r['remedy'].get('chosen')) if r['promoted'] else 'refused'}")
        if limit <= ax.get_xlim()[1] * 1.05:
            ax.axvline(limit, color="tab:red", linestyle="--", linewidth=1, label=f"default limit {limit} (upper bound)")
        ax.set_xlabel(label)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("exact-match gain over base")
    fig.suptitle(f"demo under the default policy: circles = trials on the search part (filled = admissible), "
                 f"squares = reported on the confirm part ({torch.backends.cpu.get_cpu_capability()})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--arms", default="unconstrained,remedied,destructive")
    ap.add_argument("--out", default="bench/results/remedy.json", help="results JSON, kept across invocations")
    ap.add_argument("--plot", default="docs/remedy-frontier.png")
    ap.add_argument("--plot-only", action="store_true", help="redraw the plot from the JSON, run nothing")
    args = ap.parse_args()
    if args.plot_only:
        plot_frontier(json.loads(Path(args.out).read_text())["results"], Path(args.plot))
        return
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    arms = args.arms.split(",")
    # Arms measured before (another invocation) stay in the JSON; those run now replace them.
    results = [r for r in (json.loads(out.read_text())["results"] if out.exists() else []) if r["arm"] not in arms]
    with tempfile.TemporaryDirectory(prefix="remedy-bench-") as tmp:
        for arm in arms:
            results.append(run_arm(arm, args.config, Path(tmp)))
            out.write_text(json.dumps({"cpu": torch.backends.cpu.get_cpu_capability(), "results": results}, indent=2))
            r = results[-1]
            print(f"{arm:<14} {r['wall_s']:>7.0f} s  promoted={r['promoted']!s:<5}  gain {_ci(r['task_gain'])}  "
                  f"self-retention {_ci(r.get(RATIO))}  KL {_ci(r.get('self_retention_kl'))}  "
                  f"chosen {r['remedy'].get('chosen')}",
                  flush=True)
    by = {r["arm"]: r for r in results}
    if {"unconstrained", "remedied"} <= set(by):
        u, m = by["unconstrained"], by["remedied"]
        print(f"remedied keeps {m['task_gain'][0] / u['task_gain'][0]:.0%} of the unconstrained gain (point), "
              f"self-retention excess {(m[RATIO][2] - 1) / (u[RATIO][2] - 1):.0%} of the unconstrained one (upper bounds), "
              f"wall time {m['wall_s'] / u['wall_s']:.2f}x")
    plot_frontier(results, Path(args.plot))
    print(f"wrote {out} and {args.plot}")


def _ci(v) -> str:
    return "-" if not v else f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"


if __name__ == "__main__":
    main()
