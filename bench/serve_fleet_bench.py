"""Many adapters of one base served by one replica: round-robin over N members against one adapter.

    python bench/serve_fleet_bench.py [--members 100] [--clients 8] [--seconds 20] [--max-tokens 16]
                                      [--base builtin:tiny-llama] [--capacity 0] [--out bench/results/serve_fleet.json]

Registers N members (each its own registered model with one version, a LoRA adapter with random
weights, as champion) in a temporary SQLite MLflow, then at the same load (C client threads, T
seconds, greedy `POST /v1/completions`):
1. `single`: the app serves member 0 alone; every request goes to it;
2. `fleet`: the app serves all N members; client i sends its k-th request to member (i + k) mod N;
3. `fleet-lru` (with --capacity M < N): the same, with at most M adapters attached per replica,
   so most requests attach their adapter again.
Reports requests/s, p50/p95, errors (must be 0), the fleet's start-up (base and every
adapter loaded), the mean adapter load time, and resident memory per attached adapter (the
replica's RSS with N attached minus with one, over N - 1; the adapters' weights alone beside it).
Target (issue 18): fleet throughput >= 0.5x single, 0 errors.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect_lora.deploy.testing import free_port
from prefect_lora.flows import settings  # noqa: F401  (quiet defaults)

from bench.serve_bench import load


def register_members(uri: str, base: str, n: int, work: Path) -> list[str]:
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    names = [f"member-{i:03d}" for i in range(n)]
    for i, name in enumerate(names):
        (version,) = register_random_adapters(uri, name, base, [1000 + i], work)
        aliases.promote_version(uri, name, version, reason="bench")
    return names


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--members", type=int, default=100)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--seconds", type=float, default=20)
    ap.add_argument("--max-tokens", type=int, default=16)
    ap.add_argument("--base", default="builtin:tiny-llama")
    ap.add_argument("--capacity", type=int, default=0, help="also run with at most this many adapters attached (0: skip)")
    ap.add_argument("--out", default="bench/results/serve_fleet.json")
    args = ap.parse_args()

    import httpx
    import ray
    import torch
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.lora_tasks.modeling import resolve_base_model
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="pl-serve-fleet-bench-"))
    uri, base = f"sqlite:///{work}/mlflow.db", resolve_base_model(args.base)
    t0 = time.monotonic()
    names = register_members(uri, base, args.members, work)
    print(f"{len(names)} members registered in {time.monotonic() - t0:.0f} s", flush=True)
    port, rows = free_port(), []
    runs = [("single", names[:1], 64), ("fleet", names, max(64, len(names)))]
    if args.capacity:
        runs.append((f"fleet-lru{args.capacity}", names, args.capacity))
    try:
        for label, served, capacity in runs:
            cfg = ServeConfig(model_name=served[0], members=served[1:], tracking_uri=uri, port=port,
                              app_name=f"bench-{label}", max_tokens_cap=max(256, args.max_tokens),
                              max_adapters_per_replica=capacity, poll_interval_s=3600)
            t0 = time.monotonic()
            serving.start(cfg, ray_temp_dir="/tmp/plray-serve-bench")
            with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=600) as c:  # up once every alias is warm
                while c.get("/health").status_code != 200:
                    time.sleep(0.5)
                startup = time.monotonic() - t0
                result = load(port, args.clients, args.seconds, args.max_tokens,
                              lambda i, k, rng, served=served: f"{served[(7 * i + k) % len(served)]}@champion")
                result["models_served"] = len(result.pop("by_version"))
                stats = c.get("/admin/stats").json()["replica"]
            rows.append({"run": label, "members": len(served), "capacity": capacity, "startup_s": round(startup, 1),
                         **result, **stats})
            print(json.dumps(rows[-1]), flush=True)
            serve.delete(cfg.app_name)
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    single, fleet = rows[0], rows[1]
    per_adapter = (fleet["rss_bytes"] - single["rss_bytes"]) / max(fleet["adapters"] - single["adapters"], 1)
    summary = {"cpu_capability": torch.backends.cpu.get_cpu_capability(), "cores": os.cpu_count(), "base": args.base,
               "clients": args.clients, "seconds": args.seconds, "max_tokens": args.max_tokens,
               "fleet_vs_single_throughput": round(fleet["throughput_rps"] / single["throughput_rps"], 2),
               "rss_per_attached_adapter_kib": round(per_adapter / 1024, 1),
               "weights_per_adapter_kib": round(fleet["adapter_bytes"] / max(fleet["adapters"], 1) / 1024, 1),
               "runs": rows}
    header = f"{'run':<14} {'members':>7} {'attached':>8} {'req/s':>7} {'p50 ms':>8} {'p95 ms':>8} {'errors':>6} {'load ms':>8} {'evictions':>9}"
    print(f"\nserve fleet bench: base {args.base}, {args.clients} clients x {args.seconds:g} s, max_tokens "
          f"{args.max_tokens}, {os.cpu_count()} CPUs ({summary['cpu_capability']})")
    print(header + "\n" + "-" * len(header))
    for r in rows:
        print(f"{r['run']:<14} {r['members']:>7} {r['adapters']:>8} {r['throughput_rps']:>7} {r['p50_ms']:>8} "
              f"{r['p95_ms']:>8} {r['errors']:>6} {r['mean_load_ms']:>8} {r['evictions']:>9}")
    print(f"fleet/single throughput {summary['fleet_vs_single_throughput']}x; resident memory per attached adapter "
          f"{summary['rss_per_attached_adapter_kib']} KiB (weights {summary['weights_per_adapter_kib']} KiB); "
          f"fleet start-up {fleet['startup_s']} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=2) + "\n")
    if any(r["errors"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
