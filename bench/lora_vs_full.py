"""LoRA vs full fine-tuning on the same data and steps: what LoRA saves and how much less it forgets.

    .venv/bin/prefect-lora demo prepare          # the demo data (once)
    .venv/bin/python bench/lora_vs_full.py [--steps 30] [--eval-rows 64] [--ref-tokens 8192]

SmolLM2-135M-Instruct (`configs/demo.yaml`: its data, prompts and LoRA settings) is trained
in-process (no Ray, no Prefect) once with LoRA and once with every weight, then each is scored
against the same base on the same eval rows (task gain in eval loss, paired bootstrap interval)
and on WikiText-2 as the reference corpus (perplexity ratio adapted/base and mean per-token
KL(base || adapted), with intervals). Prints a table and writes JSON to bench/results/.
Learning rates differ on purpose (each method at a usual rate for it); both are printed.
Sized for a 2-core CPU in under 10 minutes; raise --steps and --eval-rows on a bigger machine.
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import sys
import tempfile
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
    ap.add_argument("--methods", default="lora,full", help="comma-separated: lora, full, or both")
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


def _config(args, method: str):
    import yaml

    from lora_tasks.config import config_from_dict

    raw = yaml.safe_load(Path(args.config).read_text())
    raw["training"].update(method=method, max_steps=args.steps, batch_size=args.batch_size, max_seq_length=args.seq_len,
                           learning_rate=args.lora_lr if method == "lora" else args.full_lr,
                           warmup_steps=min(2, args.steps - 1), checkpoint_every=None)
    raw["scaling"]["num_workers"] = 1
    raw["evaluation"] = {"batch_size": 8, "bootstrap_samples": args.bootstrap,
                         "reference": {"path": args.reference, "max_tokens": args.ref_tokens}}
    return config_from_dict(raw)


def _rows(cfg, n_eval: int):
    from lora_tasks.data import load_table

    train = load_table(cfg.data.train_path, cfg.data.format).to_dict("records")
    evals = load_table(cfg.data.eval_path, cfg.data.format).to_dict("records")[:n_eval]
    return train, evals


def _saved_params(folder: Path) -> int:
    """Numbers stored in the output's safetensors: the trained parameters (tied weights once)."""
    from safetensors import safe_open

    total = 0
    for f in folder.glob("*.safetensors"):
        with safe_open(str(f), "pt") as st:
            for k in st.keys():  # noqa: SIM118  (safe_open is not a dict)
                total += _numel(st.get_slice(k).get_shape())
    return total


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def _train(cfg, rows, out: Path) -> dict:
    from lora_tasks.training import ADAPTER_DIR, WorkerContext, train_worker

    stamps: list[float] = []

    def log(metrics, step):
        stamps.append(time.perf_counter())

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir:
            shutil.copytree(Path(checkpoint_dir) / ADAPTER_DIR, out, dirs_exist_ok=True)

    started = time.perf_counter()
    result = train_worker(cfg, rows, WorkerContext(log=log, report=keep))
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return {"train_seconds": time.perf_counter() - started, "step_seconds": gaps[len(gaps) // 2] if gaps else float("nan"),
            "final_train_loss": result["train_loss"]}


def _size_mb(folder: Path) -> float:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) / 2**20


def _ci(report, key: str) -> str:
    p, lo, hi = report.intervals[key]
    return f"{p:.3f} [{lo:.3f}, {hi:.3f}]"


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from lora_tasks.evaluation import evaluate_adapter
    from lora_tasks.modeling import count_parameters, load_base_model

    if not Path(args.reference).is_file():
        print(f"reference corpus {args.reference} not found (WikiText-2 valid.txt); pass --reference", file=sys.stderr)
        return 2
    results, reports = {}, {}
    work = Path(tempfile.mkdtemp(prefix="lora-vs-full-"))
    try:
        for method in args.methods.split(","):
            cfg = _config(args, method)
            if not Path(cfg.data.train_path).is_file():
                print(f"no demo data at {cfg.data.train_path}: run `.venv/bin/prefect-lora demo prepare` first", file=sys.stderr)
                return 2
            train_rows, eval_rows = _rows(cfg, args.eval_rows)
            out = work / method
            print(f"[{method}] training {args.steps} steps x {args.batch_size} rows, lr {cfg.training.learning_rate:g} ...", flush=True)
            timing = _train(cfg, train_rows, out)
            print(f"[{method}] evaluating on {len(eval_rows)} eval rows and {args.ref_tokens} WikiText tokens ...", flush=True)
            report = evaluate_adapter(cfg, str(out), eval_rows)
            reports[method] = report
            trainable = _saved_params(out)
            results[method] = {
                "learning_rate": cfg.training.learning_rate, "steps": args.steps, **timing,
                "trainable_params": trainable, "artifact_mb": _size_mb(out), "eval_seconds": report.seconds,
                "metrics": report.flat_metrics(), "intervals": report.intervals,
            }
        total = count_parameters(load_base_model(_config(args, "lora").base_model.name_or_path, "causal_lm"))[1]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = [("trainable params", lambda m, r: f"{results[m]['trainable_params']:,} ({results[m]['trainable_params'] / total:.2%})"),
            ("learning rate", lambda m, r: f"{results[m]['learning_rate']:g}"),
            ("task gain (eval loss, nats/token)", lambda m, r: _ci(r, "task_gain")),
            ("adapted eval loss (base)", lambda m, r: f"{r.adapted['eval_loss']:.3f} ({r.base['eval_loss']:.3f})"),
            ("WikiText ppl ratio adapted/base", lambda m, r: _ci(r, "reference_perplexity_ratio")),
            ("WikiText KL(base||adapted)", lambda m, r: _ci(r, "reference_kl")),
            ("step time (s, median)", lambda m, r: f"{results[m]['step_seconds']:.2f}"),
            ("train time (s, incl. load)", lambda m, r: f"{results[m]['train_seconds']:.0f}"),
            ("eval time (s)", lambda m, r: f"{r.seconds:.0f}"),
            ("artifact size (MiB)", lambda m, r: f"{results[m]['artifact_mb']:.1f}")]
    width = max(len(n) for n, _ in rows)
    print(f"\nSmolLM2-135M-Instruct, demo data, {args.steps} steps x {args.batch_size} rows, seq {args.seq_len}; "
          f"{args.eval_rows} eval rows; WikiText-2 {args.ref_tokens} tokens; {int(100 * _config(args, 'lora').promotion.confidence)}% "
          f"bootstrap intervals ({args.bootstrap} resamples)")
    print(f"{'':{width}}" + "".join(f"  {m:>26}" for m in reports))
    for name, fn in rows:
        print(f"{name:{width}}" + "".join(f"  {fn(m, r):>26}" for m, r in reports.items()))
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"lora_vs_full-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "base_total_params": total, "results": results}, indent=2, default=float))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
