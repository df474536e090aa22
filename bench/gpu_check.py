"""The GPU code paths, a few steps each, on whatever CUDA GPUs are visible: a short prepared check
for a lent GPU machine (`python bench/gpu_check.py`; needs the demo model, `make demo-setup`).

Each case trains SmolLM2-135M on the demo data through the real Ray Train launcher and prints
steps, final loss and tokens/s (or the error); JSON goes to bench/results/.
Cases: DDP fp32, DDP bf16 autocast, bf16 + gradient checkpointing, 4-bit QLoRA (when bitsandbytes
imports), FSDP (when 2+ GPUs are visible).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main(steps: int = 8) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check")
        return 1
    from lora_tasks.config import load_config
    from lora_tasks.distributed import train_adapter
    from lora_tasks.pipeline import prepare_data

    gpus = torch.cuda.device_count()
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    cases = {
        "ddp-fp32": [],
        "ddp-bf16": ["training.precision=bf16"],
        "bf16-grad-ckpt": ["training.precision=bf16", "training.gradient_checkpointing=true"],
    }
    try:
        import bitsandbytes  # noqa: F401

        cases["qlora-4bit"] = ["training.precision=bf16", "base_model.quantization=4bit"]
    except ImportError:
        print("bitsandbytes not installed: QLoRA skipped (pip install bitsandbytes)")
    if gpus >= 2:
        cases["fsdp-bf16"] = ["training.precision=bf16", "scaling.strategy=fsdp", f"scaling.num_workers={gpus}"]
    out, work = [], REPO / "bench" / "results" / f"gpu-{int(time.time())}"
    for name, overrides in cases.items():
        cfg = load_config(REPO / "configs" / "demo.yaml", [
            "scaling.use_gpu=true", "scaling.num_workers=1", f"training.max_steps={steps}", "training.checkpoint_every=null",
            f"scaling.storage_path={work}", *overrides])
        data = prepare_data(cfg, work / name / "data")
        started = time.perf_counter()
        try:
            r = train_adapter(cfg, data.train_rows, work / name, max_failures=0)
            row = {"case": name, "ok": True, "seconds": round(time.perf_counter() - started, 1),
                   **{k: r.metrics.get(k) for k in ("step", "train_loss", "train_tokens_per_s")}}
        except Exception as exc:  # report every case, whatever breaks
            row = {"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(row), flush=True)
        out.append(row)
    work.mkdir(parents=True, exist_ok=True)
    (work / "gpu_check.json").write_text(json.dumps(out, indent=2))
    return 0 if all(r["ok"] for r in out) else 2


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8))
