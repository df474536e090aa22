"""The GPU code paths, a few steps each, on whatever CUDA GPUs are visible: a short prepared check
for a lent GPU machine (`python bench/gpu_check.py`; needs the demo model, `make demo-setup`).

Each case trains SmolLM2-135M on the demo data through the real Ray Train launcher and prints
steps, final loss, tokens/s per GPU and MFU (or the error); JSON goes to bench/results/.
Cases: DDP fp32, DDP bf16 autocast, bf16 + packing, bf16 + packing with a larger batch, bf16 +
gradient checkpointing, 4-bit QLoRA (when bitsandbytes imports), FSDP (when 2+ GPUs are visible).
MFU = tokens/s per GPU x 4 N / measured matmul peak of the precision (N = 134.5M parameters;
4N: LoRA's frozen base needs no weight gradients; full fine-tuning would be 6N). The peak is
measured here (best of large square matmuls: fp32 with TF32 off, bf16), not the datasheet's.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def matmul_peak_gpu(dtype, n: int = 8192, reps: int = 20) -> float:
    """Measured GFLOP/s of n x n matmuls of `dtype` on GPU 0 (best of `reps`)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a, b = torch.randn(n, n, dtype=dtype, device="cuda"), torch.randn(n, n, dtype=dtype, device="cuda")
    best = float("inf")
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        a @ b
        end.record()
        torch.cuda.synchronize()
        best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * n**3 / best / 1e9


def main(steps: int = 8) -> int:
    if not torch.cuda.is_available():
        print("no CUDA GPU visible: nothing to check")
        return 1
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.training.distributed import train_adapter
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    gpus = torch.cuda.device_count()
    print(f"{gpus} x {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    peak = {"fp32": matmul_peak_gpu(torch.float32), "bf16": matmul_peak_gpu(torch.bfloat16)}
    print(f"matmul peak: fp32 {peak['fp32'] / 1e3:.1f} TFLOP/s, bf16 {peak['bf16'] / 1e3:.1f} TFLOP/s", flush=True)
    from prefect_lora.lora_tasks.modeling import count_parameters, load_base_model

    n_params = count_parameters(load_base_model("builtin:smollm2-135m-instruct", "causal_lm"))[1]
    cases = {
        "ddp-fp32": [],
        "ddp-bf16": ["training.precision=bf16"],
        "bf16-packed": ["training.precision=bf16", "training.packing=true"],
        "bf16-packed-b32": ["training.precision=bf16", "training.packing=true", "training.batch_size=32"],
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
            precision = "bf16" if "training.precision=bf16" in overrides else "fp32"
            per_gpu = (r.metrics.get("train_tokens_per_s") or 0) / cfg.scaling.num_workers
            row["mfu"] = round(per_gpu * 4 * n_params / (peak[precision] * 1e9), 4)
        except Exception as exc:  # noqa: BLE001  (report every case, whatever breaks)
            row = {"case": name, "ok": False, "error": f"{type(exc).__name__}: {exc}"[:500]}
        print(json.dumps(row), flush=True)
        out.append(row)
    work.mkdir(parents=True, exist_ok=True)
    (work / "gpu_check.json").write_text(json.dumps({"peak_gflops": peak, "cases": out}, indent=2))
    return 0 if all(r["ok"] for r in out) else 2


if __name__ == "__main__":
    raise SystemExit(main(int(sys.argv[1]) if len(sys.argv) > 1 else 8))
