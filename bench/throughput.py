"""Training throughput near the hardware: matmul peak vs the worker loop's tokens/s, side by side.

    .venv/bin/prefect-lora demo prepare                       # demo data + SmolLM2-135M (once)
    .venv/bin/python bench/throughput.py [--data demo|mixed] [--steps 6] [--rounds 2]

1. Peak: the best of repeated square matmuls (fp32 and bf16) on `--threads` threads.
2. Training, in this one process, on the same model, examples and batch order, variants
   interleaved round by round (the machine is shared: compare ratios, not absolutes):
   - `plain`  a plain single-process PEFT loop (right padding, HF's loss, stock AdamW): (a);
   - `worker` the project's loop, `training.train_worker` with a `WorkerContext`: (b);
   each at fp32 and bf16 autocast, and the worker also with `training.packing`, with the
   frozen base weights held in bf16 (`base_model.torch_dtype: bfloat16`), and in bf16 with
   torch's sdpa attention instead of what `training.attention: auto` picks (eager, for short
   examples on CPU).
Tokens/s counts real (non-pad) tokens from the end of the first step to the end of the last
(`overall`, the median over rounds), and per step (`best`: the fastest step of all rounds, the
figure least disturbed by other load on a shared machine; interference only ever adds time).
Model FLOPs utilisation (MFU) = tokens/s x 4 N / peak of the precision in use, N = the base's
parameter count (tied embedding once, as the LM head): forward 2N, backward to the activations
2N, no weight gradients for the frozen base. Full fine-tuning would be 6N (weight gradients too).

`--data mixed` adds one CNN/DM summarisation prompt (long) to every seven demo rows (short):
instruction data whose lengths vary, where packing has padding to remove.
Prints a table and writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

VARIANTS = {
    "plain-fp32": ("plain", []),
    "worker-fp32": ("worker", []),
    "plain-bf16": ("plain", ["training.precision=bf16"]),
    "worker-bf16": ("worker", ["training.precision=bf16"]),
    "worker-bf16-sdpa": ("worker", ["training.precision=bf16", "training.attention=sdpa"]),
    "worker-bf16-packed": ("worker", ["training.precision=bf16", "training.packing=true"]),
    "worker-bf16-packed-bf16base": ("worker", ["training.precision=bf16", "training.packing=true", "base_model.torch_dtype=bfloat16"]),
    "worker-fp32-packed": ("worker", ["training.packing=true"]),
}


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "demo.yaml"))
    ap.add_argument("--data", choices=["demo", "mixed"], default="demo")
    ap.add_argument("--cnndm", default=str(REPO.parent / "shared" / "data" / "cnndm_tldr" / "train.jsonl"))
    ap.add_argument("--steps", type=int, default=6)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--out", default=None)
    return ap.parse_args(argv)


# ----------------------------------------------------------------------------- peak


def matmul_peak(dtype, sizes=(512, 1024, 2048), seconds: float = 1.5) -> dict:
    """Best GFLOP/s of square matmuls of `dtype`, over a few sizes."""
    import torch

    best = {"gflops": 0.0, "n": 0}
    for n in sizes:
        a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
        a @ b  # warm-up
        reps, t0 = 0, time.perf_counter()
        times = []
        while time.perf_counter() - t0 < seconds:
            s = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - s)
            reps += 1
        gflops = 2 * n**3 / min(times) / 1e9
        if gflops > best["gflops"]:
            best = {"gflops": gflops, "n": n}
    return best


# ----------------------------------------------------------------------------- data


def load_rows(args, cfg) -> list[dict]:
    from prefect_lora.lora_tasks.data.sources import load_table

    rows = load_table(cfg.data.train_path, cfg.data.format).to_dict("records")
    rows = [{"prompt": r["prompt"], "completion": r["completion"]} for r in rows]
    if args.data == "mixed":
        long = [json.loads(line) for line in Path(args.cnndm).read_text().splitlines()]
        mixed = []
        for i, r in enumerate(rows[: 7 * len(long)]):
            mixed.append(r)
            if i % 7 == 6:
                mixed.append({"prompt": long[i // 7]["prompt"], "completion": long[i // 7]["completion"]})
        rows = mixed
    return rows


def step_tokens(cfg, examples, steps: int) -> list[int]:
    """Real tokens in each optimizer step, in the order the worker loop reads them (1 worker)."""
    from prefect_lora.lora_tasks.training.loop import iterate_batches

    t = cfg.training
    order = iterate_batches(len(examples), t.batch_size, 0, 1, t.seed)
    out = []
    for _ in range(steps):
        n = 0
        for _ in range(t.gradient_accumulation_steps):
            n += sum(len(examples[i]["input_ids"]) for i in next(order))
        out.append(n)
    return out


# ----------------------------------------------------------------------------- loops


def run_worker(cfg, rows) -> list[float]:
    """Step end times of `train_worker` (the project's loop), called in-process."""
    from prefect_lora.lora_tasks.training.loop import WorkerContext, train_worker

    stamps: list[float] = []
    train_worker(cfg, rows, WorkerContext(log=lambda m, s: stamps.append(time.perf_counter())))
    return stamps


def run_plain(cfg, rows) -> list[float]:
    """Step end times of a plain PEFT loop: what a user would write without the project."""
    import contextlib

    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from prefect_lora.lora_tasks.modeling import load_tokenizer, resolve_base_model
    from prefect_lora.lora_tasks.training.encoding import IGNORE_INDEX, encode_examples
    from prefect_lora.lora_tasks.training.loop import iterate_batches
    from transformers import AutoModelForCausalLM

    t = cfg.training
    torch.manual_seed(t.seed)
    path = resolve_base_model(cfg.base_model.name_or_path)
    tok = load_tokenizer(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(task_type=TaskType.CAUSAL_LM, r=cfg.lora.r, lora_alpha=cfg.lora.alpha,
                                             lora_dropout=cfg.lora.dropout, target_modules=cfg.lora.target_modules))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=t.learning_rate)
    examples = encode_examples(rows, tok, cfg)
    order = iterate_batches(len(examples), t.batch_size, 0, 1, t.seed)
    cast = (lambda: torch.autocast("cpu", dtype=torch.bfloat16)) if t.precision == "bf16" else contextlib.nullcontext
    stamps = []
    for _ in range(t.max_steps):
        batch = [examples[i] for i in next(order)]
        width = max(len(x["input_ids"]) for x in batch)
        ids = torch.tensor([x["input_ids"] + [tok.pad_token_id] * (width - len(x["input_ids"])) for x in batch])
        mask = torch.tensor([[1] * len(x["input_ids"]) + [0] * (width - len(x["input_ids"])) for x in batch])
        labels = torch.tensor([x["labels"] + [IGNORE_INDEX] * (width - len(x["labels"])) for x in batch])
        with cast():
            loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        stamps.append(time.perf_counter())
    return stamps


# ----------------------------------------------------------------------------- main


def main(argv=None) -> int:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.modeling import count_parameters, load_base_model, load_tokenizer
    from prefect_lora.lora_tasks.training.encoding import encode_examples

    base = ["scaling.num_workers=1", f"training.max_steps={args.steps}", f"training.batch_size={args.batch_size}",
            f"training.max_seq_length={args.seq_len}", "training.log_every=1", "training.checkpoint_every=null",
            "training.warmup_steps=0", "training.precision=fp32"]
    cfg0 = load_config(args.config, base)
    if not Path(cfg0.data.train_path).is_file():
        print(f"no data at {cfg0.data.train_path}: run `.venv/bin/prefect-lora demo prepare` first", file=sys.stderr)
        return 2
    rows = load_rows(args, cfg0)
    tok = load_tokenizer(cfg0.base_model.name_or_path)
    examples = encode_examples(rows, tok, cfg0)
    tokens = step_tokens(cfg0, examples, args.steps)
    n_params = count_parameters(load_base_model(cfg0.base_model.name_or_path, "causal_lm"))[1]
    lengths = sorted(len(x["input_ids"]) for x in examples)

    capability = torch.backends.cpu.get_cpu_capability()
    print(f"torch {torch.__version__}, CPU {capability}, {torch.get_num_threads()} threads; measuring matmul peak ...", flush=True)
    peak = {"fp32": matmul_peak(torch.float32), "bf16": matmul_peak(torch.bfloat16)}
    names = [v for v in args.variants.split(",") if v]
    runs: dict[str, list[float]] = {n: [] for n in names}
    best: dict[str, float] = {n: 0.0 for n in names}
    for rnd in range(args.rounds):
        for name in names:
            kind, overrides = VARIANTS[name]
            cfg = load_config(args.config, base + overrides)
            gc.collect()
            stamps = (run_worker if kind == "worker" else run_plain)(cfg, rows)
            tps = sum(tokens[1:]) / (stamps[-1] - stamps[0])
            runs[name].append(tps)
            best[name] = max(best[name], *(n / (b - a) for n, a, b in zip(tokens[1:], stamps, stamps[1:])))
            print(f"  round {rnd + 1} {name:30} {tps:7.1f} tok/s (best step {best[name]:.1f})", flush=True)

    results = {}
    for name in names:
        precision = "bf16" if "bf16" in name.split("-", 2)[1] else "fp32"
        tps = statistics.median(runs[name])
        results[name] = {"tokens_per_s": tps, "all_tokens_per_s": runs[name], "best_step_tokens_per_s": best[name],
                         "precision": precision, "mfu": tps * 4 * n_params / (peak[precision]["gflops"] * 1e9),
                         "mfu_best_step": best[name] * 4 * n_params / (peak[precision]["gflops"] * 1e9)}
    ref = {p: results.get(f"plain-{p}", {}).get("tokens_per_s") for p in ("fp32", "bf16")}
    ref_best = {p: results.get(f"plain-{p}", {}).get("best_step_tokens_per_s") for p in ("fp32", "bf16")}
    print(f"\nSmolLM2-135M ({n_params / 1e6:.1f}M params), LoRA r={cfg0.lora.r} {cfg0.lora.target_modules}, "
          f"batch {args.batch_size}, {args.data} data (tokens/example min {lengths[0]}, median "
          f"{lengths[len(lengths) // 2]}, max {lengths[-1]}), {args.steps} steps, median of {args.rounds} rounds")
    print(f"peak: fp32 {peak['fp32']['gflops']:.0f} GFLOP/s, bf16 {peak['bf16']['gflops']:.0f} GFLOP/s "
          f"({args.threads} threads, CPU {capability})")
    print(f"{'variant':30} {'tok/s':>8} {'MFU (4N)':>9} {'vs plain':>9} {'best step':>10} {'MFU':>6} {'vs plain':>9}")
    for name, r in results.items():
        base_tps, base_best = ref.get(r["precision"]), ref_best.get(r["precision"])
        rel = f"{r['tokens_per_s'] / base_tps:.2f}x" if base_tps else "-"
        rel_best = f"{r['best_step_tokens_per_s'] / base_best:.2f}x" if base_best else "-"
        print(f"{name:30} {r['tokens_per_s']:8.1f} {r['mfu']:9.1%} {rel:>9} {r['best_step_tokens_per_s']:10.1f} "
              f"{r['mfu_best_step']:6.1%} {rel_best:>9}")
    out = Path(args.out) if args.out else REPO / "bench" / "results" / f"throughput-{args.data}-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"args": vars(args), "cpu_capability": capability, "n_params": n_params, "peak": peak, "step_tokens": tokens,
                               "torch": torch.__version__, "results": results}, indent=2))
    print(f"\nwrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
