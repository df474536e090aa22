"""Loopback load test of `deploy/serve.py`: adapter-multiplexed vs merged serving.

    python bench/serve_bench.py [--clients 4] [--seconds 10] [--rounds 2] [--max-tokens 8] [--challenger-share 0.5]
                                [--batch-rows 1,16] [--continuous off,on] [--base builtin:tiny-llama] [--prompts plain]
                                [--out bench/results/serve_bench.json]

Registers two adapters (random LoRA weights) on the base in a temporary SQLite MLflow, starts one
Serve app per configuration side by side (each under its own route prefix, each with its own model
replica), warms them, and then, round after round, runs N client threads for T seconds against
each app's `POST /v1/completions` (`--prompts orders`: `/v1/chat/completions`) in turn: on a machine shared with other work, every
configuration meets the same changes of load. A share of the requests names the challenger, so two
versions are in play:
multiplexed onto one base in `adapter` mode, two merged models in `merged` mode. Reports
throughput, p50/p95 latency and errors (must be 0) per mode, `batch_max_rows` (1: each request
alone, as before request batching) and `continuous_batching` (off: a batch runs to its end before
the next starts; on: requests join the running batch at its next decoding step), with the rows of
the replica's forward passes (adapter mode: per batch when off, per decoding step when on); prints
the CPU's capability and a table, and writes JSON.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import random
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from prefect_lora.deploy.testing import free_port
from prefect_lora.flows import settings  # noqa: F401  (quiet defaults)

PROMPTS = ["What is 12 plus 30? Answer:", "Add 40 and 2. Answer:", "Say hello to the team.", "Sum of 7 and 8 is"]
ORDERS = ["Hi, please send me 3 yoga mats, I need them by Friday.", "Cancel my order of the blue kettle please.",
          "Where is my parcel? I ordered two lamps last week.", "I want to return the desk chair, it squeaks.",
          "Do you ship the standing desk to Norway?", "URGENT: order 10 boxes of printer paper today!",
          "Please cancel the 2 mugs I ordered yesterday.", "Track order 4471, the headphones have not arrived."]
"""`--prompts orders`: customer messages as the demo's (chat requests with its system prompt)."""


def request_for(prompts: str, rng: random.Random) -> tuple[str, dict]:
    """A request's route and body (without model and sampling): `plain` completions of a few
    tokens, or `orders`: a chat with the demo's system prompt (configs/demo.yaml) and a customer's
    message, where every request's prompt begins with the same ~70 tokens, as in a deployed
    assistant's traffic; `demo`: the same with the messages of the demo's eval set (200, each
    asked once in turn: no two requests alike, as live traffic)."""
    if prompts == "plain":
        return "/v1/completions", {"prompt": rng.choice(PROMPTS)}
    message = next(_DEMO_MESSAGES) if prompts == "demo" else rng.choice(ORDERS)
    return "/v1/chat/completions", {"messages": [{"role": "system", "content": _system_prompt()},
                                                 {"role": "user", "content": message}]}


def _demo_messages():
    """The demo's eval prompts (written by `prefect-lora demo prepare`), in turn, for ever."""
    path = REPO / ".prefect-lora" / "demo" / "data" / "eval.jsonl"
    if not path.exists():
        sys.exit(f"{path} is missing: run `prefect-lora demo prepare` first (--prompts demo reads it)")
    return itertools.cycle([json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()])


_DEMO_MESSAGES = None


def _demo_champion() -> Path:
    """The adapter folder of the demo's champion (configs/demo.yaml's registry)."""
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.registry import registry

    cfg = load_config(REPO / "configs" / "demo.yaml")
    try:
        champion = registry.get_alias(cfg.tracking.tracking_uri, cfg.model_name)
    except Exception as exc:  # noqa: BLE001  (no demo run yet)
        sys.exit(f"--adapters demo needs the demo's champion: run `make demo` first ({exc})")
    return registry.download_version(cfg.tracking.tracking_uri, cfg.model_name, champion.version).adapter_dir


@functools.cache
def _system_prompt() -> str:
    """The demo's system prompt (read once: the clients ask for it with every request)."""
    import yaml

    return yaml.safe_load((REPO / "configs" / "demo.yaml").read_text())["data"]["system_prompt"]


def _percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, round(q * (len(xs) - 1)))]


def canary(name: str, challenger_share: float):
    """A client's model for its next request: the challenger with probability `challenger_share`."""
    return lambda i, k, rng: f"{name}@challenger" if rng.random() < challenger_share else f"{name}@champion"


def load(url: str, clients: int, seconds: float, max_tokens: int, pick, prompts: str = "plain") -> dict:
    """`clients` threads send greedy completions to `url` for `seconds`; client i's k-th request
    names the model `pick(i, k, rng)`. Latencies, completion tokens, errors, requests per served
    version, and the time it took (the last requests included)."""
    import httpx

    lat: list[float] = []
    errors: list[str] = []
    tokens = [0]
    by_version: dict[str, int] = {}
    lock = threading.Lock()
    stop = time.monotonic() + seconds

    def client(i: int) -> None:
        rng, k = random.Random(i), 0
        with httpx.Client(base_url=url, timeout=300) as c:
            while time.monotonic() < stop:
                route, body = request_for(prompts, rng)
                body.update(model=pick(i, k, rng), max_tokens=max_tokens, temperature=0)
                k += 1
                t0 = time.perf_counter()
                try:
                    r = c.post(route, json=body)
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
    return {"latencies": lat, "tokens": tokens[0], "errors": errors, "wall_s": time.monotonic() - t0,
            "by_version": by_version}


def summary(windows: list[dict]) -> dict:
    """One configuration's figures over its windows: throughput, latency percentiles, errors."""
    lat = [x for w in windows for x in w["latencies"]]
    wall = sum(w["wall_s"] for w in windows)
    errors = [e for w in windows for e in w["errors"]]
    by_version: dict[str, int] = {}
    for w in windows:
        for version, n in w["by_version"].items():
            by_version[version] = by_version.get(version, 0) + n
    return {
        "requests": len(lat), "errors": len(errors), "error_samples": errors[:5], "wall_s": round(wall, 2),
        "throughput_rps": round(len(lat) / wall, 2), "tokens_per_s": round(sum(w["tokens"] for w in windows) / wall, 1),
        "p50_ms": round(1000 * _percentile(lat, 0.5), 1), "p95_ms": round(1000 * _percentile(lat, 0.95), 1),
        "mean_ms": round(1000 * statistics.fmean(lat), 1) if lat else None, "by_version": by_version,
        "rounds_rps": [round(len(w["latencies"]) / w["wall_s"], 2) for w in windows],
    }


def serving_wait(url: str, timeout_s: float = 600) -> None:
    """Return once the app at `url` answers /health."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{url}/health", timeout=10).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(1)
    raise RuntimeError(f"{url} did not come up in {timeout_s:.0f} s")


def passes(url: str) -> dict:
    """The replica's forward passes by rows so far, and its draft tokens read and kept (`/admin/stats`; adapter mode only)."""
    import httpx

    stats = httpx.get(f"{url}/admin/stats", timeout=60).json().get("replica", {})
    return {"by_rows": {int(k): v for k, v in stats.get("passes_by_rows", {}).items()},
            "drafts": stats.get("draft_tokens", {"read": 0, "kept": 0})}


def pass_rows(before: dict, after: dict) -> dict:
    """The passes between two readings of `passes`: their mean rows, how many had each number of
    rows, and the draft tokens they read and kept."""
    b, a = before["by_rows"], after["by_rows"]
    counts = {rows: n - b.get(rows, 0) for rows, n in sorted(a.items()) if n > b.get(rows, 0)}
    total = sum(counts.values())
    drafts = {k: after["drafts"][k] - before["drafts"][k] for k in ("read", "kept")}
    return {"mean_rows": round(sum(r * n for r, n in counts.items()) / total, 2) if total else None, "by_rows": counts,
            "passes": total, "drafts": drafts}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=4)
    ap.add_argument("--seconds", type=float, default=10, help="length of each configuration's window in a round")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of one window per configuration")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--challenger-share", type=float, default=0.5)
    ap.add_argument("--base", default="builtin:tiny-llama", help="base model (built-in name, local folder or hub id)")
    ap.add_argument("--modes", default="adapter,merged")
    ap.add_argument("--batch-rows", default="1,16", help="values of serve's batch_max_rows to compare")
    ap.add_argument("--batch-wait-ms", type=float, default=None, help="serve's batch_wait_ms (default: its default)")
    ap.add_argument("--continuous", default="off,on", help="values of serve's continuous_batching to compare")
    ap.add_argument("--adapters", choices=["random", "demo"], default="random",
                    help="random: two random LoRA adapters; demo: the demo's champion (after `make demo`), registered twice")
    ap.add_argument("--draft-tokens", default="0", help="values of serve's draft_tokens to compare (continuous batching)")
    ap.add_argument("--prompts", choices=["plain", "orders", "demo"], default="plain",
                    help="plain: short completions; orders: chats with the demo's system prompt; "
                         "demo: the same with the demo's eval messages, each in turn")
    ap.add_argument("--out", default=None, help="JSON path (default bench/results/serve_bench-<time>.json)")
    args = ap.parse_args()
    if args.prompts == "demo":
        global _DEMO_MESSAGES
        _DEMO_MESSAGES = _demo_messages()

    import ray
    import torch
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import register_adapters, register_random_adapters
    from prefect_lora.lora_tasks.modeling import resolve_base_model
    from prefect_lora.lora_tasks.registry import aliases
    from ray import serve

    work = Path(tempfile.mkdtemp(prefix="pl-serve-bench-"))
    uri, name = f"sqlite:///{work}/mlflow.db", "bench-model"
    base = resolve_base_model(args.base)
    if args.adapters == "demo":
        champion = _demo_champion()
        v1, _ = register_adapters(uri, name, base, {f"demo-champion-copy-{i}": champion for i in (1, 2)}, work)
    else:
        v1, _ = register_random_adapters(uri, name, base, [1, 2], work)
    aliases.promote_version(uri, name, v1, reason="bench")
    port = free_port()
    configs = [(m, int(b), c, int(d)) for m in args.modes.split(",") for b in args.batch_rows.split(",")
               for c in args.continuous.split(",") for d in args.draft_tokens.split(",")
               if not (int(b) == 1 and c == "on") and (c == "on" or d == args.draft_tokens.split(",")[0])]
    # (one row: nothing to join; drafts: only in a continuous batch)
    apps = {}
    try:
        # Logical CPUs enough for a replica per configuration: only the one under load works.
        ray.init(num_cpus=max(os.cpu_count() or 1, len(configs) + 1), include_dashboard=False, log_to_driver=False,
                 _temp_dir=os.environ.get("PREFECT_LORA_RAY_TMP", "/tmp/plray-serve-bench"))
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        for mode, batch, continuous, drafts in configs:
            cfg = ServeConfig(model_name=name, tracking_uri=uri, port=port, mode=mode,
                              app_name=f"bench-{mode}-{batch}-{continuous}-{drafts}", max_tokens_cap=max(256, args.max_tokens),
                              batch_max_rows=batch, continuous_batching=continuous == "on", request_timeout_s=600,
                              draft_tokens=drafts if continuous == "on" else 0,
                              **({"batch_wait_ms": args.batch_wait_ms} if args.batch_wait_ms is not None else {}))
            t0 = time.monotonic()
            serve.run(serving.build_app(cfg), name=cfg.app_name, route_prefix=f"/{cfg.app_name}", blocking=False)
            url = f"http://127.0.0.1:{port}/{cfg.app_name}"
            serving_wait(url)
            load(url, 2, 2.0, args.max_tokens, canary(name, 0.5), args.prompts)  # warm: both versions loaded
            apps[(mode, batch, continuous, drafts)] = {"url": url, "startup_s": round(time.monotonic() - t0, 1), "windows": [],
                                               "passes": passes(url) if mode == "adapter" else {}}
        for _ in range(args.rounds):
            for app in apps.values():
                app["windows"].append(load(app["url"], args.clients, args.seconds, args.max_tokens,
                                           canary(name, args.challenger_share), args.prompts))
        rows = [{"mode": mode, "batch_max_rows": batch, "continuous": continuous,
                 "draft_tokens": drafts if continuous == "on" else 0, "startup_s": app["startup_s"],
                 **summary(app["windows"]),
                 "passes": pass_rows(app["passes"], passes(app["url"])) if mode == "adapter" else None}
                for (mode, batch, continuous, drafts), app in apps.items()]
    finally:
        if ray.is_initialized():
            serve.shutdown()
            ray.shutdown()

    header = (f"{'mode':<8} {'batch':>5} {'contin.':>7} {'drafts':>6} {'requests':>8} {'req/s':>7} {'tok/s':>7} {'p50 ms':>8} "
              f"{'p95 ms':>8} {'errors':>6} {'rows/pass':>9}  {'req/s by round':<16} passes by rows")
    capability = torch.backends.cpu.get_cpu_capability()
    print(f"\nserve bench: base {args.base}, {args.clients} clients, {args.rounds} rounds of {args.seconds:g}s per "
          f"configuration, max_tokens {args.max_tokens}, {args.prompts} prompts, {args.challenger_share:.0%} of requests to the challenger, "
          f"{os.cpu_count()} CPUs, CPU capability {capability}")
    print(header)
    print("-" * len(header))
    for r in rows:
        p = r["passes"] or {}
        print(f"{r['mode']:<8} {r['batch_max_rows']:>5} {r['continuous']:>7} {r['draft_tokens']:>6} {r['requests']:>8} "
              f"{r['throughput_rps']:>7} {r['tokens_per_s']:>7} {r['p50_ms']:>8} {r['p95_ms']:>8} {r['errors']:>6} "
              f"{p.get('mean_rows') or '-':>9}  {' '.join(map(str, r['rounds_rps'])):<16} {p.get('by_rows') or '-'}"
              + (f"  drafts kept {p['drafts']['kept']}/{p['drafts']['read']}" if p.get("drafts", {}).get("read") else ""))
    for off in (r for r in rows if r["continuous"] == "off"):
        for on in (r for r in rows if r["continuous"] == "on" and r["mode"] == off["mode"]
                   and r["batch_max_rows"] == off["batch_max_rows"]):
            if off["throughput_rps"] and off["p95_ms"]:
                print(f"{off['mode']}, batch {off['batch_max_rows']}: continuous batching (drafts {on['draft_tokens']}) "
                      f"on/off: requests/s x{on['throughput_rps'] / off['throughput_rps']:.2f}, "
                      f"p95 x{on['p95_ms'] / off['p95_ms']:.2f}")
    out = Path(args.out or Path(__file__).parent / "results" / f"serve_bench-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpus": os.cpu_count(), "cpu_capability": capability,
                               "results": rows}, indent=2))
    print(f"\nwritten: {out}")
    if any(r["errors"] for r in rows):
        sys.exit(1)


if __name__ == "__main__":
    main()
