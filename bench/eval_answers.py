"""What reading greedy answers off the loss pass saves: an adapter's task scores on the eval rows
with every answer generated, then with the answers its loss pass already shows read off.

    python bench/eval_answers.py ADAPTER_DIR [--config configs/demo.yaml] [--rounds 2]

ADAPTER_DIR: a trained adapter of CONFIG (e.g. `.prefect-lora/runs/demo-orders/run-*/adapter`
after `make demo`). Both ways run on the same rows in the training precision, interleaved round
by round, on torch's default threads as in the pipeline's evaluation. Prints the CPU capability,
the seconds of each, how many answers were read off, and how many answers the two ways agree on.
Writes JSON to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.measurement import evaluation
from prefect_lora.lora_tasks.training.compute import compute_for
from prefect_lora.lora_tasks.training.encoding import encode_examples
from prefect_lora.lora_tasks.training.launcher import prepare_data
from prefect_lora.lora_tasks.training.views import ADAPTED


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("adapter_dir")
    ap.add_argument("--config", default="configs/demo.yaml")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--out", default=f"bench/results/eval-answers-{time.strftime('%Y%m%d-%H%M%S')}.json")
    args = ap.parse_args()
    cfg = load_config(args.config)
    rows = prepare_data(cfg, Path(args.out).parent / "eval-answers-validation").eval_rows
    views = evaluation.load_views(cfg, args.adapter_dir)
    tokenizer = evaluation.load_tokenizer(cfg.base_model.name_or_path, cfg.base_model.revision)
    examples = encode_examples(rows, tokenizer, cfg)
    read_off, known = evaluation.greedy_answers_read_off, []

    def counted(*a, **k):
        found = read_off(*a, **k)
        known.append(len(found))
        return found

    ways = {"generate every answer": lambda *a, **k: {}, "read off the loss pass": counted}
    seconds: dict[str, list[float]] = {w: [] for w in ways}
    answers: dict[str, list[str]] = {}
    for _ in range(args.rounds):
        for way, fn in ways.items():
            evaluation.greedy_answers_read_off = fn
            started = time.perf_counter()
            with compute_for(cfg.training.precision).autocast(), views.use(ADAPTED) as model:
                metrics, _, answers[way] = evaluation.task_scores(model, cfg, examples, rows, tokenizer, "cpu", ADAPTED)
            seconds[way].append(time.perf_counter() - started)
    evaluation.greedy_answers_read_off = read_off
    a, b = answers.values()
    out = {"cpu_capability": torch.backends.cpu.get_cpu_capability(),
           "precision": compute_for(cfg.training.precision).precision, "rows": len(rows),
           "seconds": {w: statistics.median(s) for w, s in seconds.items()}, "all_seconds": seconds,
           "answers_same": sum(x == y for x, y in zip(a, b)), "exact_match": metrics.get("exact_match"), "read_off": known[-1]}
    for key, value in out.items():
        print(f"{key:<16} {value}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
