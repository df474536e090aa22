"""The classifier gate under the default policy, on SST-2: sound adapters (several seeds, learning
rates and step counts), useless ones (shuffled labels) and destructive ones (a learning rate far
too high; many epochs on noise), each trained with configs/sst2.yaml's budget and gated against
the fair baseline. Prints one row per adapter and writes JSON (docs/gate.md's calibration).

    python bench/classifier_gate.py --data ../shared/data [--work /tmp/classifier-gate] [--only sound-s1,...]

Training runs in this process on one worker with the config's global batch (2 workers x 16 = 32
rows a step, `scaling.num_workers=1 training.batch_size=32`): the same rows per step and steps
as the shipped config, without Ray's start-up. Each adapter is kept in `--work`, so a second call
only evaluates (`--retrain` trains again). `--twice NAME` evaluates as three nightly runs do:
yesterday's, of another adapter on 95% of the train rows (cold with a fresh `PREFECT_LORA_CACHE`),
today's, of this adapter on all of them (5% new rows: the probe is fit again, only the new rows are
embedded, the base's figures are read back), and today's repeated (everything read back); it
prints the baseline's share of each evaluation. Every adapter is then scored as a run scores it
(`evaluation.evaluate_adapter`: baseline, adapted, forgetting, intervals) and gated by
`promotion.decide_promotion` under the default policy (no champion). Beside the gate's own
forgetting figure the JSON keeps the representation drift the gate read before (mean cosine
distance of final hidden states on the same reference), for the comparison in docs/gate.md.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.data.evidence import read_reference_texts
from prefect_lora.lora_tasks.data.prepare import prepare_in_memory
from prefect_lora.lora_tasks.gate.promotion import candidate_from_metrics, decide_promotion
from prefect_lora.lora_tasks.measurement.evaluation import evaluate_adapter, load_views, primary_metric
from prefect_lora.lora_tasks.measurement.forgetting import chunk_reference
from prefect_lora.lora_tasks.modeling import describe_base_model, load_tokenizer
from prefect_lora.lora_tasks.training.launcher import train_in_process

SHUFFLED = "shuffled"
VARIANTS: dict[str, tuple[str, list[str]]] = {
    **{f"sound-s{s}": ("sound", [f"training.seed={s}"]) for s in range(1, 6)},
    "sound-lr3e-4": ("sound", ["training.learning_rate=3e-4"]),
    "sound-lr3e-3": ("sound", ["training.learning_rate=3e-3"]),
    "sound-150steps": ("sound", ["training.max_steps=150"]),
    **{f"shuffled-s{s}": ("useless", [f"training.seed={s}", SHUFFLED]) for s in range(1, 6)},
    "destructive-lr5e-2": ("destructive", ["training.learning_rate=5e-2"]),
    "noise-8-epochs": ("destructive", [SHUFFLED, "data.max_train_rows=2000", "training.max_steps=null",
                                        "training.epochs=8", "training.learning_rate=3e-3"]),
}
"""name -> (what it is, config overrides; `shuffled`: the train labels permuted with the seed)."""

ONE_WORKER = ["scaling.num_workers=1", "scaling.launcher=local", "training.batch_size=32", "scaling.cpus_per_worker=2"]


def variant_config(config: str, data: Path, overrides: list[str]):
    sets = [o for o in overrides if o != SHUFFLED]
    paths = [f"data.train_path={data / 'sst2/train.tsv'}", f"data.eval_path={data / 'sst2/validation.tsv'}",
             f"evaluation.reference.path={data / 'wikitext2/valid.txt'}"]
    return load_config(config, paths + ONE_WORKER + sets)


def prepared(cfg, overrides: list[str], folder: Path):
    data = prepare_in_memory(cfg, folder)
    if SHUFFLED in overrides:  # noise: every label moved to another row, seeded
        rng = np.random.default_rng(cfg.training.seed)
        col = cfg.data.label_column
        labels = rng.permutation([r[col] for r in data.train_rows])
        data.train_rows = [{**r, col: lab} for r, lab in zip(data.train_rows, labels)]
    return data


@torch.no_grad()
def representation_drift(cfg, adapter_dir: str) -> float:
    """What the gate read before: mean cosine distance of final hidden states, base vs adapted,
    over the reference's tokens."""
    tok = load_tokenizer(cfg.base_model.name_or_path)
    views = load_views(cfg, adapter_dir, tokenizer=tok)
    blocks = chunk_reference(read_reference_texts(cfg.evaluation.reference.path), tok, 8192, cfg.training.max_seq_length)
    total = tokens = 0.0
    for i in range(0, len(blocks), 32):
        chunk = blocks[i : i + 32]
        width = max(map(len, chunk))
        ids = torch.full((len(chunk), width), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, b in enumerate(chunk):
            ids[j, : len(b)], mask[j, : len(b)] = torch.tensor(b), 1
        states = {}
        for name in ("base", "adapted"):
            with views.use(name) as m:
                states[name] = m(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        dist = 1 - torch.nn.functional.cosine_similarity(states["base"], states["adapted"], dim=-1)
        total += float((dist * mask).sum())
        tokens += float(mask.sum())
    return total / tokens


def yesterdays_adapter(adapter: Path, folder: Path) -> Path:
    """A copy of `adapter` with one weight nudged by 1e-6: another adapter to the caches (its own
    scores), the same figures to the eye; what yesterday's run trained, for the nightly timings."""
    from safetensors.torch import load_file, save_file

    out = folder / "adapter-yesterday"
    shutil.rmtree(out, ignore_errors=True)
    shutil.copytree(adapter, out)
    weights = load_file(out / "adapter_model.safetensors")
    first = sorted(weights)[0]
    weights[first] = weights[first] + 1e-6
    save_file(weights, out / "adapter_model.safetensors")
    return out


def run_variant(name: str, kind: str, overrides: list[str], args) -> dict:
    folder = args.work / name
    cfg = variant_config(args.config, args.data, overrides)
    data = prepared(cfg, overrides, folder)
    adapter = folder / "adapter"
    train_s = None
    if args.retrain or not (adapter / "adapter_config.json").exists():
        t0 = time.perf_counter()
        adapter = Path(train_in_process(cfg, data.train_rows, folder).adapter_dir)
        train_s = time.perf_counter() - t0
    base = describe_base_model(cfg.base_model.name_or_path, cfg.base_model.revision)

    def timed(train_rows, adapter_dir=adapter):
        t0 = time.perf_counter()
        rep = evaluate_adapter(cfg, str(adapter_dir), data.eval_rows, base_info=base, train_rows=train_rows)
        return rep, time.perf_counter() - t0

    nights = {}
    if name == args.twice:  # yesterday: another adapter, 95% of today's train rows
        rep, secs = timed(data.train_rows[: len(data.train_rows) * 19 // 20], yesterdays_adapter(adapter, folder))
        nights["yesterday"] = {"eval_seconds": secs, "baseline_seconds": rep.baseline.get("seconds"), "timings": rep.timings}
    report, eval_s = timed(data.train_rows)
    if name == args.twice:  # the same run once more: the probe and the base's retrieval hits read back
        rep, secs = timed(data.train_rows)
        nights["repeated"] = {"eval_seconds": secs, "baseline_seconds": rep.baseline.get("seconds"), "timings": rep.timings}
        nights["grown_5pct"] = {"eval_seconds": eval_s, "baseline_seconds": report.baseline.get("seconds"),
                                "timings": report.timings}
        for night, f in nights.items():
            print(f"{night}: evaluation {f['eval_seconds']:.1f} s, of which baseline {f['baseline_seconds']:.1f} s "
                  f"({f['baseline_seconds'] / f['eval_seconds']:.0%})", flush=True)
    metric, higher = primary_metric(cfg)
    decision = decide_promotion(candidate_from_metrics(report.flat_metrics(), metric, higher, report.forgetting), None,
                                cfg.promotion)
    forgetting = {k: report.intervals[k] for k in report.forgetting if k in report.intervals}
    return {"name": name, "kind": kind, "overrides": overrides, "baseline": report.baseline,
            "base_accuracy": report.base["accuracy"], "adapted_accuracy": report.adapted["accuracy"],
            "task_gain": report.intervals["task_gain"], "forgetting": forgetting, "figures": report.forgetting,
            "representation_drift": representation_drift(cfg, str(adapter)),
            "decision": "promoted" if decision.promote else "refused", "failed_checks": decision.failed_checks,
            "undecided_checks": decision.undecided_checks, "reasons": decision.reasons,
            "train_seconds": train_s, "eval_seconds": eval_s, "eval_timings": report.timings,
            "baseline_seconds": report.baseline.get("seconds"), **({"nights": nights} if nights else {})}


def show(row: dict) -> str:
    b, g = row["baseline"], row["task_gain"]
    fig = "; ".join(f"{k} {v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]" for k, v in row["forgetting"].items())
    why = ",".join(row["failed_checks"]) or "-"
    return (f"| {row['name']} | {row['kind']} | {b['kind']} {row['base_accuracy']:.3f} (majority {b['majority_accuracy']:.3f}, "
            f"probe {b.get('probe_accuracy', float('nan')):.3f}) | {row['adapted_accuracy']:.3f} | "
            f"{g[0]:.3f} [{g[1]:.3f}, {g[2]:.3f}] | {fig} | {row['representation_drift']:.3f} | "
            f"**{row['decision']}** ({why}) |")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs/sst2.yaml"))
    p.add_argument("--data", type=Path, default=ROOT.parent / "shared/data")
    p.add_argument("--work", type=Path, default=Path("/tmp/classifier-gate"))
    p.add_argument("--only", default="", help="comma-separated variant names (default: all)")
    p.add_argument("--retrain", action="store_true")
    p.add_argument("--twice", default="sound-s1", help="evaluate this variant as three nightly runs: yesterday, today with 5%% new rows, today repeated")
    p.add_argument("--train-only", action="store_true", help="train the adapters, evaluate nothing")
    p.add_argument("--out", type=Path, default=ROOT / "bench/results/classifier-gate.json")
    args = p.parse_args()
    names = [n for n in args.only.split(",") if n] or list(VARIANTS)
    print(f"CPU capability: {torch.backends.cpu.get_cpu_capability()}, torch threads {torch.get_num_threads()}", flush=True)
    rows = []
    for name in names:
        kind, overrides = VARIANTS[name]
        if args.train_only:
            cfg = variant_config(args.config, args.data, overrides)
            folder = args.work / name
            if args.retrain or not (folder / "adapter" / "adapter_config.json").exists():
                t0 = time.perf_counter()
                train_in_process(cfg, prepared(cfg, overrides, folder).train_rows, folder)
                print(f"{name}: trained in {time.perf_counter() - t0:.0f} s", flush=True)
            continue
        rows.append(run_variant(name, kind, overrides, args))
        print(show(rows[-1]), flush=True)
    if rows:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"cpu": torch.backends.cpu.get_cpu_capability(), "rows": rows}, indent=2, default=str))
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
