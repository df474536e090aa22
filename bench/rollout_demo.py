"""The staged rollout's loop on a running server: register a new version made from the champion's
adapter, promote it under a bounded load, and watch the server roll it out or back by itself.

    prefect-lora serve demo-orders --config deploy/serve-rollout-demo.yaml      # in another shell
    python bench/rollout_demo.py --adapter broken [--url http://127.0.0.1:8000] [--config configs/demo.yaml]
                                 [--clients 8] [--max-tokens 40] [--out bench/results/rollout-demo.json]

`--adapter broken`: the champion's LoRA weights with random noise 10x their own spread added (the
model then answers no JSON object); `--adapter sound`: the champion's adapter as it is, registered
again (an equal version, which must complete its rollout). Either is registered with the config's
answer contract, then promoted (audited, as `prefect-lora promote ... --notify URL`) while
`--clients` threads send the demo's eval prompts; the script waits until the version's
`rollout.state` tag says `rolled-back` or `completed`, keeps the load a few more requests, and
prints the time from the promotion to the end, the requests that failed (must be 0), those each
version answered, and the reason on record (`prefect-lora history NAME` shows the same).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prefect_lora.deploy.serve_core import notify_server
from prefect_lora.deploy.testing import Load
from prefect_lora.flows import settings  # noqa: F401  (quiet defaults)
from prefect_lora.flows.locks import shared_alias_lock
from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.registry import aliases, registry, tracking


def make_version(cfg, kind: str, noise: float, seed: int = 0) -> str:
    """Register the champion's adapter (`sound`) or a noisy copy of it (`broken`) as a new version."""
    import torch
    from safetensors.torch import load_file, save_file

    uri, name = cfg.tracking.tracking_uri, cfg.model_name
    champion = registry.get_alias(uri, name)
    files = registry.download_version(uri, name, champion.version)
    out = Path(tempfile.mkdtemp(prefix=f"rollout-demo-{kind}-"))
    for f in files.adapter_dir.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    if kind == "broken":
        torch.manual_seed(seed)
        weights = load_file(out / "adapter_model.safetensors")
        weights = {k: v + noise * v.float().std() * torch.randn_like(v.float()) if "lora_" in k else v
                   for k, v in weights.items()}
        save_file({k: v.contiguous() for k, v in weights.items()}, out / "adapter_model.safetensors")
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
    run_id = c.create_run(exp, run_name=f"rollout-demo-{kind}", tags={"rollout_demo": kind}).info.run_id
    model_uri = registry.log_adapter_model(cfg, run_id, str(out), files.model_config["base_model"])
    lineage = {k: v for k, v in champion.tags.items() if k.startswith("lineage.")}
    version = registry.register_version(uri, name, model_uri, run_id, {**lineage, "rollout_demo": kind})
    tracking.end_run(uri, run_id)
    return version


def eval_prompts(cfg, n: int = 64) -> list[str]:
    rows = [json.loads(line) for line in Path(cfg.data.eval_path).read_text().splitlines()[:n]]
    return [r[cfg.data.prompt_column] for r in rows]


def watch(cfg, version: str, timeout_s: float) -> str:
    """Until the version's rollout ends (its `rollout.state` tag); the state it ended in."""
    c, deadline = tracking.client(cfg.tracking.tracking_uri), time.monotonic() + timeout_s
    state, shown = None, None
    while time.monotonic() < deadline:
        tags = c.get_model_version(cfg.model_name, version).tags
        state = tags.get("rollout.state")
        if (state, tags.get("rollout.step")) != shown:
            shown = (state, tags.get("rollout.step"))
            print(f"  {time.strftime('%H:%M:%S')} rollout.state {state}, rollout.step {tags.get('rollout.step')}",
                  flush=True)
        if state in ("rolled-back", "completed", "superseded"):
            return state
        time.sleep(1)
    return f"{state} (timed out after {timeout_s:.0f} s)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--adapter", choices=["broken", "sound"], default="broken")
    ap.add_argument("--url", default="http://127.0.0.1:8000")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--tracking-uri", default=None, help="default: the config's")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--noise", type=float, default=10.0, help="broken: noise, in multiples of each weight's spread")
    ap.add_argument("--timeout-s", type=float, default=1800)
    ap.add_argument("--out", default=f"bench/results/rollout-demo-{time.strftime('%Y%m%d-%H%M%S')}.json")
    a = ap.parse_args()
    cfg = load_config(a.config, [f"tracking.tracking_uri={a.tracking_uri}"] if a.tracking_uri else None)
    name, uri = cfg.model_name, cfg.tracking.tracking_uri
    version = make_version(cfg, a.adapter, a.noise)
    previous = registry.get_alias(uri, name).version
    print(f"registered {name} version {version} ({a.adapter}) beside champion {previous}; {a.clients} clients start")
    load = Load(a.url, name, eval_prompts(cfg), clients=a.clients, max_tokens=a.max_tokens).start()
    try:
        while len(load.sent) < 2 * a.clients:  # warm: every client answered twice
            time.sleep(0.5)
        promoted = time.monotonic()
        aliases.promote_version(uri, name, version, reason=f"rollout demo: a {a.adapter} adapter",
                                lock=shared_alias_lock())
        notify_server(a.url)
        print(f"  {time.strftime('%H:%M:%S')} promoted version {version}", flush=True)
        state = watch(cfg, version, a.timeout_s)
        ended, count = time.monotonic(), len(load.sent)
        while len(load.sent) < count + a.clients:
            time.sleep(0.5)
    finally:
        sent = load.stop()
    during = [s for s in sent if s.sent >= promoted]
    by_version = {v: sum(s.version == v for s in during) for v in sorted({s.version for s in during}, key=str)}
    record = aliases.alias_history(uri, name, "champion")[-1]
    result = {"model": name, "version": version, "previous": previous, "adapter": a.adapter, "state": state,
              "seconds_to_end": round(ended - promoted, 1), "requests": len(sent), "failed": len(load.failed()),
              "answered_after_promotion": by_version, "last_record": record}
    print(f"{a.adapter} version {version}: {state} {ended - promoted:.0f} s after its promotion; {len(sent)} requests, "
          f"{len(load.failed())} failed; answered after the promotion by version: {by_version}")
    print(f"last record: {record['action']} {record['from_version']} -> {record['to_version']}: {record['reason']}")
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(result, indent=1, default=str))


if __name__ == "__main__":
    main()
