"""LoRA vs full fine-tuning on the same data and steps: what LoRA saves and how much less it forgets.

    .venv/bin/prefect-lora demo prepare          # the demo data (once)
    .venv/bin/python bench/lora_vs_full.py [--steps 30] [--eval-rows 64] [--ref-tokens 8192]

SmolLM2-135M-Instruct (`configs/demo.yaml`: its data, prompts and LoRA settings) is trained
in-process (no Ray, no Prefect) once with LoRA and once with every weight, then each is scored
against the same base on the same eval rows (task gain in eval loss, paired bootstrap interval)
and on WikiText-2 as the reference corpus (perplexity ratio adapted/base and mean per-token
KL(base || adapted), with intervals), and for each: trainable parameters, training-state memory
(weights + gradients + AdamW state, measured on the tensors), peak RSS while training, median
step time and artifact size (`lora_tasks/measurement/compare.py`, the same report as
`prefect-lora compare-full CONFIG`). Prints a table and writes JSON to bench/results/.
Learning rates differ on purpose (each method at a usual rate for it); both are printed.
Sized for a 2-core CPU in under 10 minutes; raise --steps and --eval-rows on a bigger machine.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--reference", default=str(REPO.parent / "shared" / "data" / "wikitext2" / "valid.txt"))
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--eval-rows", type=int, default=64)
    ap.add_argument("--ref-tokens", type=int, default=8192)
    ap.add_argument("--lora-lr", type=float, default=4e-4)
    ap.add_argument("--full-lr", type=float, default=2e-5)
    ap.add_argument("--bootstrap", type=int, default=1000)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--lora-r", type=int, default=None, help="LoRA rank (default: the config's)")
    ap.add_argument("--lora-targets", default=None, help="comma-separated target modules (default: the config's)")
    ap.add_argument("--methods", default="lora,full", help="comma-separated: lora, full, or both")
    ap.add_argument("--lora-scales", default=None,
                    help="comma-separated scales (e.g. 1,0.8,0.65,0.5): LoRA with the scale remedy, every scale "
                         "scored on the search half, the best admissible one reported on the other half")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def _config(args, method: str):
    import yaml
    from prefect_lora.lora_tasks.config import config_from_dict

    raw = yaml.safe_load(Path(args.config).read_text())
    raw["training"].update(method=method, max_steps=args.steps, batch_size=args.batch_size, max_seq_length=args.seq_len,
                           learning_rate=args.lora_lr if method == "lora" else args.full_lr,
                           warmup_steps=min(2, args.steps - 1), checkpoint_every=None)
    raw["scaling"]["num_workers"] = 1
    if args.lora_r:
        raw["lora"]["r"] = args.lora_r
    if args.lora_targets:
        raw["lora"]["target_modules"] = "all-linear" if args.lora_targets == "all-linear" else args.lora_targets.split(",")
    raw["evaluation"] = {"batch_size": 8, "bootstrap_samples": args.bootstrap,
                         "reference": {"path": args.reference, "max_tokens": args.ref_tokens}}
    raw["remedy"] = ({"strategy": "scale", "when": "always", "scales": [float(x) for x in args.lora_scales.split(",")]}
                     if args.lora_scales else {"strategy": "none"})
    return config_from_dict(raw)


def _rows(cfg, n_eval: int):
    from prefect_lora.lora_tasks.data.sources import load_table

    train = load_table(cfg.data.train_path, cfg.data.format).to_dict("records")
    evals = load_table(cfg.data.eval_path, cfg.data.format).to_dict("records")[:n_eval]
    return train, evals


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from prefect_lora.lora_tasks.measurement.compare import compare_methods, format_table, to_json

    if not Path(args.reference).is_file():
        print(f"reference corpus {args.reference} not found (WikiText-2 valid.txt); pass --reference", file=sys.stderr)
        return 2
    cfg = _config(args, "lora")
    if not Path(cfg.data.train_path).is_file():
        print(f"no demo data at {cfg.data.train_path}: run `.venv/bin/prefect-lora demo prepare` first", file=sys.stderr)
        return 2
    train_rows, eval_rows = _rows(cfg, args.eval_rows)
    methods = tuple(args.methods.split(","))
    results = compare_methods(cfg, train_rows, eval_rows, methods=methods,
                              learning_rates={"lora": args.lora_lr, "full": args.full_lr}, log=lambda m: print(m, flush=True))
    print(f"\nSmolLM2-135M-Instruct, demo data, {args.steps} steps x {args.batch_size} rows, seq {args.seq_len}; "
          f"{args.eval_rows} eval rows; WikiText-2 {args.ref_tokens} tokens; {int(100 * cfg.promotion.confidence)}% "
          f"bootstrap intervals ({args.bootstrap} resamples); torch threads {args.threads}")
    print(format_table(results))
    for t in getattr(results.get("lora"), "remedy", {}).get("trials", []):
        show = lambda v: f"{v[0]:.3f} [{v[1]:.3f}, {v[2]:.3f}]"  # noqa: E731
        print(f"LoRA {t['name']:<11} (search half): task gain {show(t['task_gain'])}, "
              + ", ".join(f"{k} {show(v)}" for k, v in t["forgetting"].items()))
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"lora_vs_full-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), **to_json(results)}, indent=2, default=float))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
