"""What the pipeline costs over its own training loop, and 1 vs 2 workers.

    .venv/bin/prefect-lora demo prepare                       # demo data + SmolLM2-135M (once)
    .venv/bin/python bench/pipeline_overhead.py [--steps 8] [--workers 1,2] [--homes fresh,used]

Same model, data, steps and thread count:
  (b) `training.train_worker` called in this process with a `WorkerContext` (model load included);
  (c) the whole flow as `prefect-lora run` runs it, in a new Python process with a new run folder
      (cold): Prefect's ephemeral API, validation, base-model hashing, MLflow run, training (one
      worker in the flow's process, more on a local Ray: `scaling.launcher: auto`), evaluation vs
      base, registration, reports, promotion gate. `--homes fresh`: a new Prefect home and MLflow
      store too (the first run on a machine, which creates their databases); `used`: they exist.
Fixed overhead of (c) over (b) = wall(c) - (c)'s training loop - the evaluation's scoring time
(work the bare loop does not do; the evaluation's model loading counts as overhead) - what (b)
spends outside its loop (loading the model): the loop's own clock is taken off both sides, since
the same loop runs ~10% faster or slower from one run to the next on this machine. The child process reports
its import time and every Prefect task run's duration (read back from Prefect's API) for the
breakdown. With `--workers 1,2` the flow runs once per worker count (each worker one CPU), for
the scaling figure. Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--eval-rows", type=int, default=16)
    ap.add_argument("--workers", default="1", help="comma-separated worker counts for the flow runs, e.g. 1,2")
    ap.add_argument("--homes", default="fresh,used",
                    help="fresh: the first run on a machine (Prefect and MLflow create their databases); used: any later run")
    ap.add_argument("--skip-worker", action="store_true", help="skip (b), the in-process loop")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def overrides(args, workers: int = 1) -> list[str]:
    """The bench's settings: short training, small evaluation with no generation."""
    return [f"training.max_steps={args.steps}", f"training.batch_size={args.batch_size}", "training.warmup_steps=1",
            "training.checkpoint_every=null", f"scaling.num_workers={workers}", "scaling.cpus_per_worker=1",
            f"data.max_eval_rows={args.eval_rows}", "evaluation.generation=null", "evaluation.bootstrap_samples=200"]


def run_worker(args) -> dict:
    """(b): the worker loop in this process, one torch thread (what `cpus_per_worker: 1` gives)."""
    import torch

    torch.set_num_threads(1)
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.training.launcher import prepare_data
    from prefect_lora.lora_tasks.training.loop import WorkerContext, train_worker

    cfg = load_config(args.config, overrides(args))
    with tempfile.TemporaryDirectory() as tmp:
        rows = prepare_data(cfg, tmp).train_rows  # the rows the flow trains on (validated, eval split out)
    metrics = {}
    started = time.perf_counter()
    train_worker(cfg, rows, WorkerContext(report=lambda m, d: metrics.update(m)))
    return {"wall_s": time.perf_counter() - started, "train_tokens_per_s": metrics.get("train_tokens_per_s"),
            "train_loop_seconds": metrics.get("train_loop_seconds")}


def child(args) -> None:
    """(c): one cold flow run; prints one JSON line with its timings."""
    t0 = time.perf_counter()
    from prefect_lora.flows.settings import start_prefect_api_early  # as `prefect-lora run` does

    api_ready = start_prefect_api_early()
    from prefect_lora.flows.retrain import retrain

    imported = time.perf_counter()
    api_ready()
    api_waited = time.perf_counter() - imported
    result = retrain(args.config, json.loads(args.child))
    done = time.perf_counter()
    from prefect.client.orchestration import get_client

    # What follows only reads the run back for this report; its time is taken off the wall.
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_runs(limit=1)[0]
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

        task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id])))
    from prefect_lora.lora_tasks.registry import tracking

    logged = tracking.run_figures(result.tracking_uri, result.run_id)
    tasks = sorted(((tr.start_time, tr.name.rsplit("-", 1)[0], (tr.end_time - tr.start_time).total_seconds())
                    for tr in task_runs if tr.start_time and tr.end_time), key=lambda x: x[0])
    flow_s = (flow_run.end_time - flow_run.start_time).total_seconds() if flow_run.end_time else None
    report_s = time.perf_counter() - done
    print("CHILD-RESULT " + json.dumps({
        "report_s": report_s,
        "import_s": imported - t0, "api_wait_s": api_waited, "retrain_call_s": done - imported - api_waited, "flow_run_s": flow_s,
        "tasks": [(name, secs) for _, name, secs in tasks],
        "metrics": {k: v for k, v in {**logged, **result.metrics}.items() if k.startswith(("eval_", "train_"))},
    }), flush=True)


# Creates the Prefect and MLflow databases a machine keeps after its first run, in another process.
_FIRST_USE = """
import sys
from prefect_lora.flows import settings
from prefect.server.api.server import SubprocessASGIServer
s = SubprocessASGIServer(); s.start(); s.stop()
from mlflow import MlflowClient
MlflowClient(sys.argv[1]).search_experiments()
"""


def run_flow(args, workers: int, homes: str = "fresh") -> dict:
    """One flow run in a new process. `homes`: `fresh`, the first run on a machine (Prefect and
    MLflow create their databases); `used`, every later run (the databases exist)."""
    with tempfile.TemporaryDirectory(prefix="pl-overhead-") as tmp:
        env = {**os.environ, "PREFECT_HOME": f"{tmp}/prefect", "PREFECT_LORA_RAY_TMP": "/tmp/plray-bench"}
        uri = f"sqlite:///{tmp}/mlflow.db"
        sets = overrides(args, workers) + [f"scaling.storage_path={tmp}/runs", f"tracking.tracking_uri={uri}"]
        if homes == "used":
            subprocess.run([sys.executable, "-c", _FIRST_USE, uri], check=True, env=env, cwd=REPO, capture_output=True)
        started = time.perf_counter()
        proc = subprocess.run([sys.executable, __file__, "--config", args.config, "--child", json.dumps(sets)],
                              check=False, env=env, capture_output=True, text=True, cwd=REPO)
        wall = time.perf_counter() - started  # the bench's own read-back is taken off below
    line = next((x for x in proc.stdout.splitlines() if x.startswith("CHILD-RESULT ")), None)
    if proc.returncode or line is None:
        raise RuntimeError(f"flow run failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    child = json.loads(line.split(" ", 1)[1])
    return {"workers": workers, "homes": homes, **child, "wall_s": wall - child["report_s"]}


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        child(args)
        return 0
    worker = None if args.skip_worker else run_worker(args)
    if worker:
        print(f"(b) worker loop in-process: {worker['wall_s']:.1f} s, {worker['train_tokens_per_s']:.1f} tok/s", flush=True)
    flows = []
    for homes in args.homes.split(","):
        for n in [int(x) for x in args.workers.split(",")]:
            r = run_flow(args, n, homes)
            flows.append(r)
            m = r["metrics"]
            print(f"(c) flow, {n} worker(s), {homes} homes: {r['wall_s']:.1f} s wall, "
                  f"{m.get('train_tokens_per_s', float('nan')):.1f} tok/s (training, from MLflow)", flush=True)

    print(f"\nSmolLM2-135M, demo data, {args.steps} steps x {args.batch_size} rows per worker, 1 CPU thread per worker, "
          f"{args.eval_rows} eval rows (no generation)")
    for r in flows:
        m = r["metrics"]
        scoring = sum(v for k, v in m.items() if k in ("eval_task_seconds", "eval_forgetting_seconds"))
        print(f"\nflow with {r['workers']} worker(s), {r['homes']} Prefect/MLflow homes: wall {r['wall_s']:.1f} s (python start + imports {r['import_s']:.1f} s, "
              f"then waiting for Prefect's API {r['api_wait_s']:.1f} s, retrain() {r['retrain_call_s']:.1f} s, "
              f"of which the flow run {r['flow_run_s']:.1f} s)")
        for name, secs in r["tasks"]:
            print(f"  {name:28} {secs:7.1f} s")
        print(f"  {'eval scoring (excluded)':28} {scoring:7.1f} s   eval model load {m.get('eval_load_seconds', float('nan')):.1f} s")
        if worker and r["workers"] == 1:
            # The training loop's own time differs between runs (this machine's noise, ~10%): it is
            # taken off both, so what is left of (c) is what the pipeline adds to training's setup.
            setup_b = worker["wall_s"] - worker["train_loop_seconds"]
            r["fixed_overhead_s"] = r["wall_s"] - m["train_loop_seconds"] - scoring - setup_b
            print(f"  training loop {m['train_loop_seconds']:.1f} s here vs {worker['train_loop_seconds']:.1f} s in (b)")
            print(f"  fixed overhead: (c) - its training loop - eval scoring - (b)'s set-up (model load, {setup_b:.1f} s): "
                  f"{r['fixed_overhead_s']:.1f} s")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"pipeline_overhead-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "worker": worker, "flows": flows}, indent=2, default=str))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
