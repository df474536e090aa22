"""Loopback load test of `deploy/serve.py`: adapter-multiplexed vs merged serving.

    python bench/serve_bench.py [--clients 4] [--seconds 10] [--max-tokens 8] [--challenger-share 0.5]
                                [--batch-rows 1,16] [--base builtin:tiny-llama] [--out bench/results/serve_bench.json]

Registers two adapters (random LoRA weights) on the base in a temporary SQLite MLflow, then for
each mode starts the Serve app, warms it, and runs N client threads for T seconds against
`POST /v1/completions`. A share of the requests names the challenger, so two versions are in play:
multiplexed onto one base in `adapter` mode, two merged models in `merged` mode. Reports
throughput, p50/p95 latency and errors (must be 0) per mode and `batch_max_rows` (1: each request
alone, as before request batching); prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect_lora.deploy.testing import free_port
from prefect_lora.flows import settings  # noqa: F401  (quiet defaults)

PROMPTS = ["What is 12 plus 30? Answer:", "Add 40 and 2. Answer:", "Say hello to the team.", "Sum of 7 and 8 is"]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def canary(name: str, challenger_share: float):
    """A client's model for its next request: the challenger with probability `challenger_share`."""
    return lambda i, k, rng: f"{name}@challenger" if rng.random() < challenger_share else f"{name}@champion"


def load(port: int, clients: int, seconds: float, max_tokens: int, pick) -> dict:
    """`clients` threads send greedy completions for `seconds`; client i's k-th request names
    the model `pick(i, k, rng)`. Throughput, latency percentiles, errors, requests per served version."""
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    tokens = [0]
    by_version: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng, k = random.Random(i), 0
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=120) as c:
            while time.monotonic() < stop:
                body = {"model": pick(i, k, rng), "prompt": rng.choice(PROMPTS), "max_tokens": max_tokens, "temperature": 0}
                k += 1
                t0 = time.perf_counter()
                try:
                    r = c.post("/v1/completions", json=body)
                    ok = r.status_code == 200
                    j = r.json() if ok else None
                except Exception as exc:  # noqa: BLE001
                    ok, j, r = False, None, exc
                dt = time.perf_counter() - t0
                with lock:
                    if ok:
                        lat.append(dt)
                        tokens[0] += j["usage"]["completion_tokens"]
                        by_version[j["model"]] = by_version.get(j["model"], 0) + 1
                    else:
                        errors.append(str(getattr(r, "status_code", r))[:200])

    t0 = time.monotonic()
    threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0
    return {
        "requests": len(lat), "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 2),
        "throughput_rps": round(len(lat) / wall, 2), "tokens_per_s": round(tokens[0] / wall, 1),
        "p50_ms": round(1000 * _percentile(lat, 0.5), 1), "p95_ms": round(1000 * _percentile(lat, 0.95), 1),
        "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None, "by_version": by_version,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10)
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--challenger-share", type=float, default=0.5)
    ap.add_argument("--base", default="builtin:tiny-llama", help="base model (built-in name, local folder or hub id)")
    ap.add_argument("--modes", default="adapter,merged")
    ap.add_argument("--batch-rows", default="1,16", help="values of serve's batch_max_rows to compare")
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="serve's batch_wait_ms (default: its default)")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serve_bench-<time>.json)")
    args = ap.parse_args()

    import ray
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.modeling import resolve_base_model
    from prefect_lora.lora_tasks.registry import aliases
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="pl-serve-bench-"))
    uri, name = f"sqlite:///{work}/mlflow.db", "bench-model"
    base = resolve_base_model(args.base)
    v1, _ = register_random_adapters(uri, name, base, [1, 2], work)
    aliases.promote_version(uri, name, v1, reason="bench")
    port = free_port()
    rows = []
    try:
        for mode in args.modes.split(","):
            for batch in map(int, args.batch_rows.split(",")):
                cfg = ServeConfig(model_name=name, tracking_uri=uri, port=port, mode=mode, app_name=f"bench-{mode}-{batch}",
                                  max_tokens_cap=max(256, args.max_tokens), batch_max_rows=batch,
                                  **({"batch_wait_ms": args.batch_wait_ms} if args.batch_wait_ms is not None else {}))
                t0 = time.monotonic()
                serving.start(cfg, ray_temp_dir="/tmp/plray-serve-bench")
                load(port, 2, 2.0, args.max_tokens, canary(name, 0.5))  # warm: both versions loaded
                startup = time.monotonic() - t0
                result = load(port, args.clients, args.seconds, args.max_tokens, canary(name, args.challenger_share))
                rows.append({"mode": mode, "batch_max_rows": batch, "startup_s": round(startup, 1), **result})
                serve.delete(cfg.app_name)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    header = f"{'mode':<8} {'batch':>5} {'clients':>7} {'secs':>5} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6}"
    print(f"\nserve bench: base {args.base}, {args.clients} clients x {args.seconds:g}s, max_tokens {args.max_tokens}, "
          f"{args.challenger_share:.0%} of requests to the challenger, {os.cpu_count()} CPUs")
    print(header)
    print("-" * len(header))
    for r in rows:
        print(f"{r['mode']:<8} {r['batch_max_rows']:>5} {args.clients:>7} {args.seconds:>5g} {r['requests']:>8} {r['throughput_rps']:>7} "
              f"{r['tokens_per_s']:>7} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['errors']:>6}")
    out = Path(args.out or Path(__file__).parent / "results" / f"serve_bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "results": rows}, indent=2))
    print(f"\nwritten: {out}")
    if any(r["errors"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
