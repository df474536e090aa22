"""Time a fleet of tiny-model members against one member's run; print a table and write JSON.

    python bench/fleet_bench.py [--members 20] [--config configs/tiny.yaml] [--set key=value]
                                [--out bench/results/fleet.json]

As a user would, in a fresh folder (its own MLflow store, run folders and Prefect home):
1. `prefect-lora run CONFIG` for one member alone (a process of its own: imports, Prefect's
   database, a local Ray start, training, evaluation, registration);
2. `prefect-lora fleet FLEET` with N members (each its own registered model and seed);
3. the same fleet again: every member's data and config are unchanged, so every member skips.
Targets (issue 18): step 2 <= 3x step 1; step 3 <= 15 s (the members' part, reported apart
from the process's start-up, which step 3 also pays).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]


def run(args: list[str], env: dict, cwd: Path) -> tuple[float, str]:
    started = time.perf_counter()
    proc = subprocess.run(args, check=False, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        print(proc.stdout[-4000:])
        raise SystemExit(f"{' '.join(args[:3])} failed with exit code {proc.returncode}")
    return wall, proc.stdout


def member_rows(output: str) -> list[dict[str, str]]:
    """The rows of the fleet's table as the command prints it (rich's box characters)."""
    from prefect_lora.lora_tasks.fleet import SUMMARY_COLUMNS

    rows = []
    for line in output.splitlines():
        cells = [c.strip() for c in line.split("│")[1:-1]]
        if len(cells) == len(SUMMARY_COLUMNS) and re.fullmatch(r"\d+(\.\d)?", cells[SUMMARY_COLUMNS.index("seconds")]):
            rows.append(dict(zip(SUMMARY_COLUMNS, cells)))
    return rows


def members_seconds(output: str) -> float:
    """The fleet's own part: the sum of the members' seconds in its table."""
    return sum(float(r["seconds"]) for r in member_rows(output))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--members", type=int, default=20)
    ap.add_argument("--config", default="configs/tiny.yaml")
    ap.add_argument("--set", dest="sets", action="append", default=[],
                    help="key.path=value for every run, e.g. scaling.num_workers=1 (one worker, trained in-process)")
    ap.add_argument("--out", default="bench/results/fleet.json")
    args = ap.parse_args()

    exe = str(Path(sys.executable).with_name("prefect-lora"))
    work = Path(tempfile.mkdtemp(prefix="fleet-bench-"))
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PYTHONUNBUFFERED": "1"}
    common = [f"scaling.storage_path={work / 'runs'}", f"tracking.tracking_uri=sqlite:///{work / 'mlflow.db'}",
              f"tracking.artifact_location={work / 'mlartifacts'}"]
    fleet = work / "fleet.yaml"
    lines = [f"config: {ROOT / args.config}", "members:"]
    for i in range(args.members):
        lines += [f"  - name: member-{i:03d}", "    set:", f"      training.seed: {i}"]
    fleet.write_text("\n".join(lines) + "\n")

    sets = [a for kv in common + args.sets for a in ("--set", kv)]
    one, _ = run([exe, "run", str(ROOT / args.config), "--set", "model_name=alone", *sets], env, ROOT)
    print(f"one member alone: {one:.1f} s", flush=True)
    first, out1 = run([exe, "fleet", str(fleet), *sets], env, ROOT)
    print(f"fleet of {args.members}, first run: {first:.1f} s ({first / one:.2f}x one member)", flush=True)
    second, out2 = run([exe, "fleet", str(fleet), *sets], env, ROOT)
    skipped = sum(r["decision"] == "skipped" for r in member_rows(out2))
    print(f"fleet again (unchanged): {second:.1f} s, members' part {members_seconds(out2):.1f} s, "
          f"{skipped}/{args.members} skipped", flush=True)
    result = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(),
              "members": args.members, "config": args.config, "sets": args.sets, "one_member_s": round(one, 1),
              "fleet_first_s": round(first, 1), "fleet_first_x_one": round(first / one, 2),
              "fleet_members_part_s": round(members_seconds(out1), 1), "fleet_second_s": round(second, 1),
              "fleet_second_members_part_s": round(members_seconds(out2), 1), "second_skipped": skipped,
              "first_decisions": [r["decision"] for r in member_rows(out1)]}
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(out1[-3000:])


if __name__ == "__main__":
    main()
