"""Time the demo end to end and measure its peak memory; print a table and write JSON.

    python bench/demo_run.py [--config configs/demo.yaml] [--out bench/results/demo.json]

Runs `prefect-lora run CONFIG` as a user would (after `prefect-lora demo prepare`), samples the
memory of the whole process tree (driver, Prefect server, Ray workers) every 0.5 s,
then reads the run's metrics from MLflow. Targets (issue 3): demo run <= 8 min, exact match
base <= 20% and adapted >= 70% on >= 100 eval rows, promoted on the first run, peak <= 8 GiB.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil


def tree_memory(proc: psutil.Process) -> tuple[int, int]:
    """(sum of RSS, sum of PSS) over the process tree; PSS shares common pages (torch's
    libraries, Ray's shared memory) between processes instead of counting them in each."""
    rss = pss = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            info = p.memory_full_info()
            rss, pss = rss + info.rss, pss + getattr(info, "pss", info.rss)
        except psutil.Error:
            pass
    return rss, pss


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--out", default="bench/results/demo.json")
    args = ap.parse_args()

    exe = Path(sys.executable).with_name("prefect-lora")
    started = time.perf_counter()
    proc = subprocess.Popen([str(exe), "run", args.config], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ps, peak, peak_pss = psutil.Process(proc.pid), 0, 0
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss, pss = tree_memory(ps)
        peak, peak_pss = max(peak, rss), max(peak_pss, pss)
        time.sleep(0.5)
    reader.join()
    wall = time.perf_counter() - started
    text = "".join(output)
    if proc.returncode != 0:
        print(text[-4000:])
        raise SystemExit(f"demo run failed with exit code {proc.returncode}")

    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.registry import tracking

    cfg = load_config(args.config)
    run_id = re.search(r"MLflow run (\w+)", text).group(1)
    metrics = tracking.run_figures(cfg.tracking.tracking_uri, run_id)  # the metrics and the run's table
    version = re.search(r"version (\d+)", text).group(1)
    result = {
        "config": args.config,
        "wall_s": round(wall, 1),
        "peak_rss_sum_gib": round(peak / 2**30, 2),
        "peak_pss_sum_gib": round(peak_pss / 2**30, 2),
        "promoted": "promoted to champion" in text,
        "version": version,
        **{k: round(v, 4) for k, v in sorted(metrics.items()) if not k.startswith(("train_loss", "learning_rate"))},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    width = max(map(len, result))
    for k, v in result.items():
        print(f"{k:<{width}}  {v}")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
