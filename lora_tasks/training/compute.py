"""Where this process runs models and in what precision: `training.precision` resolved once per
process (or Ray worker) into a `Compute` that the training loop, evaluation and replay read.

`auto` picks bf16 where the device runs it fast (a CUDA GPU that supports it; a CPU with AVX-512
BF16 or AMX) and fp32 elsewhere: on a CPU without bf16 instructions a bf16 matmul runs ~150x slower.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from functools import cache

import torch


def resolve_precision(precision: str, device: torch.device | str = "cpu") -> str:
    """`bf16` or `fp32`: `training.precision` on `device`, `auto` decided by what the device runs
    fast (bf16 on a CUDA GPU that supports it, on a CPU with AVX-512 BF16 or AMX; else fp32)."""
    if precision != "auto":
        return precision
    kind = torch.device(device).type
    if kind == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp32"
    if kind == "cpu":
        return "bf16" if cpu_runs_bf16() else "fp32"
    return "fp32"



def cpu_runs_bf16() -> bool:
    """This CPU has bf16 instructions (AVX-512 BF16 or AMX) and torch uses its AVX-512 kernels
    (`ATEN_CPU_CAPABILITY` can lower them)."""
    return torch.backends.cpu.get_cpu_capability().startswith("AVX512") and (
        torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())



def device_kind(device: torch.device | str) -> str:
    """What a precision was resolved for, in a few words: `CPU AVX512`, `CPU AVX2`, or the GPU's name."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU {torch.backends.cpu.get_cpu_capability()}{', bf16 native' if cpu_runs_bf16() else ''}"



def slow_bf16_warning(precision: str, device: torch.device | str) -> str | None:
    """A warning, with the slowdown measured here (a few milliseconds), when `precision` asks for
    bf16 on a CPU that has no bf16 instructions; None otherwise."""
    if precision != "bf16" or torch.device(device).type != "cpu" or cpu_runs_bf16():
        return None
    a, seconds, threads = torch.randn(256, 256), {}, torch.get_num_threads()
    torch.set_num_threads(1)  # one core: not disturbed by a busy machine's thread pool
    try:
        for dtype in (torch.float32, torch.bfloat16):
            x = a.to(dtype)
            x @ x  # warm-up
            seconds[dtype] = min(_timed(lambda x=x: x @ x) for _ in range(3))
    finally:
        torch.set_num_threads(threads)
    slower = seconds[torch.bfloat16] / max(seconds[torch.float32], 1e-9)
    return (f"training.precision: bf16 on a CPU without AVX-512 BF16 or AMX ({torch.backends.cpu.get_cpu_capability()}): "
            f"a bf16 matmul ran {slower:.0f}x slower than fp32 here. Set training.precision: auto (fp32 on this CPU)")



@dataclass(frozen=True)
class Compute:
    """A device and the precision resolved for it (`compute_for`)."""

    device: torch.device
    requested: str
    """`training.precision` as configured: auto, bf16 or fp32."""
    precision: str
    """What runs: bf16 or fp32."""

    def autocast(self):
        """bfloat16 autocast when the precision is bf16, nothing otherwise: training and scoring share it."""
        if self.precision == "bf16":
            return torch.autocast(self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def describe(self) -> str:
        """`bf16 (training.precision: auto; CPU AVX512, bf16 native)`: what runs, and why."""
        return f"{self.precision} (training.precision: {self.requested}; {device_kind(self.device)})"


@cache
def compute_for(precision: str, device: torch.device | str = "cpu") -> Compute:
    """`precision` resolved on `device`, once per process for each pair."""
    device = torch.device(device)
    return Compute(device, precision, resolve_precision(precision, device))



def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started
