"""One worker's LoRA training loop. It knows nothing of its launcher.

The launcher (``distributed.py`` under Ray Train, or a test calling it directly) hands in a
`WorkerContext`: rank, world size, device, and callbacks to log metrics and to report a
checkpoint. When ``torch.distributed`` is initialised the model is wrapped in DDP and every
rank trains on its own shard of the data.
"""

from __future__ import annotations

import contextlib
import math
import pickle
import random
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ..config import PipelineConfig
from ..errors import NonFiniteLoss, TrainingError
from ..modeling import apply_lora, load_base_model, load_tokenizer
from .compute import Compute, compute_for, slow_bf16_warning
from .encoding import (
    PROGRESS_EVERY_S,
    causal_lm_loss,
    collate,
    encode_examples,
    pack,
)

ADAPTER_DIR = "adapter"
STATE_FILE = "trainer_state.pt"


def _no_log(metrics: dict, step: int) -> None:
    pass


def _no_report(metrics: dict, checkpoint_dir: str | None) -> None:
    pass


def print_line(line: str) -> None:
    print(line, flush=True)


@dataclass
class WorkerContext:
    """What a launcher tells the loop about where it runs and how results leave it."""

    rank: int = 0
    world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    log: Callable[[dict, int], None] = _no_log
    """Called on rank 0 with step metrics (loss, learning rate) every `training.log_every` steps."""
    progress: Callable[[str], None] = print_line
    """Called on rank 0 with each progress line (steps, loss, time left; resuming; precision), as
    often as a watching person needs one: a flow's run logger, or the terminal."""
    report: Callable[[dict, str | None], None] = _no_report
    """Called on every rank at each checkpoint; `checkpoint_dir` is set on rank 0 only."""
    resume_from: str | None = None
    """A checkpoint folder written by this loop to continue from."""
    stream: Callable[[int], Iterator[list[dict]]] | None = None
    """Streamed data instead of `rows`: given the number of micro-batches already trained, this
    rank's next micro-batches of validated rows, endlessly over epochs (Ray Data, for example)."""
    stream_rows: int = 0
    """With `stream`: the train rows in one epoch (all ranks together)."""


@dataclass(frozen=True)
class TrainResult:
    """Where the trained adapter and the last checkpoint are, and the final training metrics."""

    adapter_dir: str
    checkpoint_path: str
    metrics: dict


# ----------------------------------------------------------------------------- schedule


def plan_steps(num_examples: int, cfg: PipelineConfig, world_size: int) -> tuple[int, int]:
    """(micro-batches per epoch on each worker, total optimizer steps)."""
    t = cfg.training
    per_worker = num_examples // world_size
    if per_worker == 0:
        raise ValueError(f"{num_examples} training examples cannot be shared by {world_size} workers")
    batches_per_epoch = math.ceil(per_worker / t.batch_size)
    if t.max_steps is not None:
        return batches_per_epoch, t.max_steps
    return batches_per_epoch, max(1, math.ceil(t.epochs * batches_per_epoch / t.gradient_accumulation_steps))


def lr_lambda(step: int, warmup: int, total: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at optimizer step `step` (0-based)."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    progress = (step - warmup) / max(1, total - warmup)
    if schedule == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def iterate_batches(n: int, batch_size: int, rank: int, world_size: int, seed: int, start: int = 0) -> Iterator[list[int]]:
    """Endless micro-batches of example indices for one rank, skipping the first `start`.

    Each epoch is a seeded permutation shared by all ranks; rank r takes every world_size-th
    example of it, cut to equal length so every rank runs the same number of batches."""
    per_worker = n // world_size
    per_epoch = math.ceil(per_worker / batch_size)
    epoch, skip = divmod(start, per_epoch)
    while True:
        perm = np.random.default_rng([seed, epoch]).permutation(n)
        shard = perm[rank::world_size][:per_worker]
        for b in range(skip, per_epoch):
            yield shard[b * batch_size : (b + 1) * batch_size].tolist()
        epoch, skip = epoch + 1, 0


# ----------------------------------------------------------------------------- the loop


def make_optimizer(params: list, lr: float, weight_decay: float, device: torch.device) -> torch.optim.AdamW:
    """AdamW, fused (one kernel for all parameters) where torch has it for this device,
    else the multi-tensor `foreach` version; the one-parameter-at-a-time loop never."""
    fused = _fused_adamw_available(params, device)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=fused or None, foreach=None if fused else True)


def _fused_adamw_available(params: list, device: torch.device) -> bool:
    from torch.distributed.tensor import DTensor

    if any(isinstance(p, DTensor) for p in params):  # FSDP2: stay on the foreach path
        return False
    if any(p.dtype not in (torch.float32, torch.float16, torch.bfloat16) for p in params):
        return False
    try:
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        return device.type in _get_fused_kernels_supported_devices()
    except ImportError:  # an older torch: fused on CUDA only
        return device.type == "cuda"


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _unwrap(model):
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def _mean_across_ranks(value: float, ctx: WorkerContext) -> float:
    if ctx.world_size > 1 and dist.is_initialized():
        t = torch.tensor([value], dtype=torch.float64, device=ctx.device if ctx.device.type == "cuda" else "cpu")
        dist.all_reduce(t)
        return t.item() / ctx.world_size
    return value


def _gather(value, ctx: WorkerContext) -> list:
    """`value` from every rank, in rank order (just `[value]` outside torch.distributed)."""
    if ctx.world_size > 1 and dist.is_initialized():
        out = [None] * ctx.world_size
        dist.all_gather_object(out, value)
        return out
    return [value]


def _is_fsdp(model) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return any(isinstance(m, FSDPModule) for m in model.modules())


def wrap_model(model, cfg: PipelineConfig, ctx: WorkerContext):
    """DDP (every rank a full copy) or FSDP2 (weights sharded per decoder layer) across the ranks;
    the model as it is on a single worker."""
    if not (ctx.world_size > 1 and dist.is_initialized()):
        return model
    if cfg.scaling.strategy == "fsdp":
        from torch.distributed.fsdp import fully_shard

        inner = _unwrap(model)
        inner = inner.get_base_model() if hasattr(inner, "get_base_model") else inner  # full fine-tuning: no PEFT
        layer_types = set(getattr(inner, "_no_split_modules", None) or [])
        for module in model.modules():
            if type(module).__name__ in layer_types:
                fully_shard(module)
        fully_shard(model)
        return model
    # Every rank loaded the frozen base from the same files: broadcasting it (DDP's init_sync, all of
    # a 135M model's 540 MB over gloo: 2.6 s) only copies equal bytes. The weights that train are
    # made rank 0's, as DDP would.
    ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[ctx.device.index] if ctx.device.type == "cuda" else None,
                                                    init_sync=False)
    _broadcast_trainable(model)
    return ddp


def _broadcast_trainable(model) -> None:
    """Rank 0's values of the trainable weights on every rank, in one broadcast."""
    params = [p for p in model.parameters() if p.requires_grad]
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    dist.broadcast(flat, src=0)
    with torch.no_grad():
        for p, value in zip(params, flat.split([p.numel() for p in params])):
            p.copy_(value.view_as(p))


def _full_states(model, optimizer) -> tuple[dict | None, dict]:
    """(adapter-model state, optimizer state) as full tensors; a collective under FSDP (every
    rank calls it), plain `state_dict()`s otherwise (model state None: PEFT reads it itself)."""
    if not _is_fsdp(model):
        return None, optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict, get_optimizer_state_dict

    opts = StateDictOptions(full_state_dict=True, cpu_offload=True)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    model_state = {k: v for k, v in get_model_state_dict(model, options=opts).items() if k in trainable}
    return model_state, get_optimizer_state_dict(model, optimizer, options=opts)


def save_checkpoint(model, optimizer, scheduler, step: int, folder: str | Path, rng_states: list | None = None,
                    states: tuple[dict | None, dict] | None = None) -> Path:
    """Write the adapter (PEFT safetensors; with `training.method: full` the whole model, by
    `save_pretrained`, in the same `adapter/` folder) and the trainer state needed to resume exactly:
    optimizer and scheduler state, the step (which fixes the data position) and each rank's RNG."""
    folder = Path(folder)
    model_state, optimizer_state = states or _full_states(model, optimizer)
    kwargs = {"state_dict": model_state} if model_state is not None else {}
    _unwrap(model).save_pretrained(folder / ADAPTER_DIR, safe_serialization=True, **kwargs)
    torch.save(
        {
            "step": step,
            "optimizer": optimizer_state,
            "scheduler": scheduler.state_dict(),
            "torch_rng": rng_states or [torch.get_rng_state()],
        },
        folder / STATE_FILE,
    )
    return folder


def _load_adapter_weights(model, folder: str | Path) -> None:
    """The checkpoint's adapter (or, with `training.method: full`, whole model) into the
    unwrapped model (before DDP/FSDP wrap it)."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    if not hasattr(model, "peft_config"):  # full fine-tuning: the folder holds save_pretrained's model
        for shard in sorted((Path(folder) / ADAPTER_DIR).glob("*.safetensors")):
            model.load_state_dict(load_file(str(shard)), strict=False)  # tied weights are saved once
        return
    set_peft_model_state_dict(model, load_file(str(Path(folder) / ADAPTER_DIR / "adapter_model.safetensors")))


def _load_trainer_state(model, optimizer, scheduler, folder: str | Path, rank: int = 0) -> int:
    state = read_trainer_state(Path(folder) / STATE_FILE)
    if _is_fsdp(model):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict

        set_optimizer_state_dict(model, optimizer, state["optimizer"], options=StateDictOptions(full_state_dict=True))
    else:
        optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["torch_rng"]
    rng = rng if isinstance(rng, list) else [rng]
    torch.set_rng_state(rng[rank] if rank < len(rng) else rng[0])  # a resized job keeps going, not exactly
    return int(state["step"])


def read_trainer_state(path: str | Path) -> dict:
    """A checkpoint's trainer state: tensors and plain containers only (`weights_only`), so a file
    planted in a shared run folder (NFS, a bucket) cannot run code when a run resumes from it."""
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise TrainingError(f"{path} holds more than tensors and plain values, so it is not loaded: it was not "
                            f"written by this trainer. Remove that checkpoint folder to resume from an earlier one "
                            f"({str(exc).splitlines()[0]})") from None


EAGER_MAX_TOKENS = 192
"""`training.attention: auto` uses eager attention up to this example length (CPU, bf16)."""


def attention_kernel(cfg: PipelineConfig, compute: Compute, longest: int) -> str:
    """The attention implementation to train with (`training.attention`).

    `auto`: eager for short causal LM examples in bf16 on CPU, where torch's flash-attention
    kernel for CPU is slow in bf16 (1.2x the tokens/s on SmolLM2 with 100-120 tokens; equal at
    256 tokens, 0.85x and a third more memory at 512); sdpa everywhere else."""
    choice = cfg.training.attention
    if choice != "auto":
        return choice
    short_bf16_cpu = compute.device.type == "cpu" and compute.precision == "bf16" and longest <= EAGER_MAX_TOKENS
    return "eager" if short_bf16_cpu and cfg.task == "causal_lm" else "sdpa"


def train_worker(cfg: PipelineConfig, rows: list[dict], ctx: WorkerContext) -> dict:
    """Train a LoRA adapter (or, with `training.method: full`, every weight) on `rows` (this
    worker's view of the train split); return final metrics.

    Rank 0 reports a checkpoint folder holding `adapter/` and `trainer_state.pt` every
    `training.checkpoint_every` steps and at the end."""
    t, compute = cfg.training, compute_for(cfg.training.precision, ctx.device)
    if ctx.rank == 0 and (warning := slow_bf16_warning(t.precision, ctx.device)):
        ctx.progress(f"WARNING: {warning}")
    _seed_everything(t.seed)
    tokenizer = load_tokenizer(cfg.base_model.name_or_path, cfg.base_model.revision, cfg.base_model.trust_remote_code)
    examples = encode_examples(rows, tokenizer, cfg) if ctx.stream is None else []
    longest = max((len(x["input_ids"]) for x in examples), default=t.max_seq_length)
    model = _setup_model(cfg, ctx, tokenizer.pad_token_id, longest)
    _, total_steps = plan_steps(ctx.stream_rows if ctx.stream else len(examples), cfg, ctx.world_size)
    if ctx.rank == 0:  # what `precision: auto` chose on this machine, before the first step's line
        ctx.progress(f"training {total_steps} steps on {ctx.world_size} worker(s) in {compute.describe()}")
    optimizer, scheduler = _setup_optimizer(cfg, model, ctx, total_steps)
    torch.manual_seed(t.seed + ctx.rank)  # every rank its own dropout stream (weights are already equal)
    step = _load_trainer_state(model, optimizer, scheduler, ctx.resume_from, ctx.rank) if ctx.resume_from else 0
    if ctx.rank == 0 and step:
        ctx.progress(f"resuming from the checkpoint of step {step}/{total_steps}")
    batches = _setup_batches(cfg, ctx, examples, tokenizer, start=step * t.gradient_accumulation_steps)
    start_step, started, tokens_seen, last_loss = step, time.perf_counter(), 0, float("nan")
    last_line = started
    while step < total_steps:
        loss_sum, tokens, lr = _train_step(cfg, ctx, model, optimizer, scheduler, batches, tokenizer.pad_token_id)
        step, tokens_seen = step + 1, tokens_seen + tokens
        last_loss = _mean_across_ranks(loss_sum, ctx)
        if not math.isfinite(last_loss):
            raise NonFiniteLoss(f"training loss became {last_loss} at step {step}; lower training.learning_rate")
        if ctx.rank == 0 and (step % t.log_every == 0 or step == total_steps):
            ctx.log({"train_loss": last_loss, "learning_rate": lr}, step)
        now = time.perf_counter()
        if ctx.rank == 0 and (step == start_step + 1 or step % max(total_steps // 10, 1) == 0 or step == total_steps
                              or now - last_line >= PROGRESS_EVERY_S):
            ctx.progress(progress_line(step, total_steps, step - start_step, last_loss, now - started,
                                       tokens_seen * ctx.world_size))
            last_line = now
        if step == total_steps or (t.checkpoint_every and step % t.checkpoint_every == 0):
            elapsed = time.perf_counter() - started
            _checkpoint(model, optimizer, scheduler, step, ctx, {
                "train_loss": last_loss, "start_step": start_step, "precision": compute.precision,
                "train_tokens_per_s": tokens_seen * ctx.world_size / elapsed, "train_loop_seconds": elapsed,
            })
    if start_step == total_steps:  # resumed from the final checkpoint: report it again as the result
        _checkpoint(model, optimizer, scheduler, step, ctx, {"start_step": start_step})
    return {"step": step, "train_loss": last_loss, "total_steps": total_steps, "start_step": start_step}


def progress_line(step: int, total: int, done: int, loss: float, elapsed: float, tokens: int) -> str:
    """`training step 8/48 (17%): loss 0.412, 1,230 tokens/s, 4.6 s/step, about 3 min 4 s left`:
    `done` steps (of this attempt) took `elapsed` seconds and saw `tokens` tokens on all ranks.
    Figures to 3 significant digits: a log line is read, not parsed (MLflow has every value)."""
    per_step = elapsed / max(done, 1)
    left = round(per_step * (total - step))
    eta = f"{left // 60} min {left % 60} s" if left >= 60 else f"{left} s"
    rate = float(f"{tokens / max(elapsed, 1e-9):.3g}")
    return (f"training step {step}/{total} ({step / total:.0%}): loss {loss:.3g}, {rate:,.0f} tokens/s, "
            f"{float(f'{per_step:.2g}'):g} s/step, about {eta} left")


def _setup_model(cfg: PipelineConfig, ctx: WorkerContext, pad_token_id: int | None, longest: int):
    """The base model with LoRA applied (or every weight trainable), trainable weights in fp32,
    on the worker's device, resumed weights loaded, wrapped for DDP/FSDP, in train mode."""
    bm, t = cfg.base_model, cfg.training
    model = load_base_model(
        bm.name_or_path, cfg.task, revision=bm.revision, num_labels=len(cfg.data.labels) if cfg.data.labels else None,
        torch_dtype=bm.torch_dtype, trust_remote_code=bm.trust_remote_code, pad_token_id=pad_token_id,
        quantization=bm.quantization, device=ctx.device,
    )
    if (kernel := attention_kernel(cfg, compute_for(cfg.training.precision, ctx.device), longest)) != model.config._attn_implementation:
        model.set_attn_implementation(kernel)
    if t.method == "full":  # the baseline: every weight trains, no adapter
        model.requires_grad_(True)
    else:
        lc = cfg.lora
        model = apply_lora(model, cfg.task, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules,
                           bias=lc.bias)
    for p in model.parameters():  # trained weights (LoRA's, or all) train in fp32 whatever the base dtype
        if p.requires_grad:
            p.data = p.data.float()
    if not bm.quantization:  # a 4-bit base is already on its GPU
        model.to(ctx.device)
    if t.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    if ctx.resume_from:
        _load_adapter_weights(model, ctx.resume_from)
    model = wrap_model(model, cfg, ctx)
    model.train()
    return model


def _setup_optimizer(cfg: PipelineConfig, model, ctx: WorkerContext, total_steps: int):
    """AdamW over the trainable weights and the warmup + decay schedule of `training`."""
    t = cfg.training
    optimizer = make_optimizer(_trainable(model), t.learning_rate, t.weight_decay, ctx.device)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_lambda(s, t.warmup_steps, total_steps, t.lr_schedule))
    return optimizer, scheduler


def _trainable(model) -> list:
    return [p for p in model.parameters() if p.requires_grad]


def _setup_batches(cfg: PipelineConfig, ctx: WorkerContext, examples: list[dict], tokenizer, start: int) -> Iterator[list[dict]]:
    """This rank's encoded micro-batches from micro-batch `start` on: a seeded shard of the rows
    in memory, or the launcher's stream encoded as it arrives."""
    t = cfg.training
    if ctx.stream is None:
        order = iterate_batches(len(examples), t.batch_size, ctx.rank, ctx.world_size, t.seed, start=start)
        return ([examples[i] for i in idx] for idx in order)
    return (encode_examples(chunk, tokenizer, cfg) for chunk in ctx.stream(start))


def _train_step(cfg: PipelineConfig, ctx: WorkerContext, model, optimizer, scheduler, batches, pad_id: int | None
                ) -> tuple[float, int, float]:
    """One optimizer step over `gradient_accumulation_steps` micro-batches: (summed loss, tokens
    seen, learning rate used). DDP syncs gradients on the last micro-batch only."""
    t = cfg.training
    accum, packing = t.gradient_accumulation_steps, t.packing and cfg.task == "causal_lm"
    loss_sum, tokens = 0.0, 0
    for micro in range(accum):
        examples = next(batches)
        tokens += sum(len(x["input_ids"]) for x in examples)
        batch = pack(examples, pad_id) if packing else collate(examples, pad_id, cfg.task)
        batch = {k: v.to(ctx.device) for k, v in batch.items()}
        sync = micro == accum - 1 or not isinstance(model, torch.nn.parallel.DistributedDataParallel)
        with contextlib.nullcontext() if sync else model.no_sync():
            with compute_for(t.precision, ctx.device).autocast():
                if cfg.task == "causal_lm":
                    token_loss, n_tokens = causal_lm_loss(model, batch, _base_of(model), cfg.replay.kl_weight)
                    loss = token_loss / max(n_tokens, 1) / accum
                else:
                    loss = model(**batch).loss / accum
            loss.backward()
        loss_sum += loss.item()
    if t.max_grad_norm:
        torch.nn.utils.clip_grad_norm_(_trainable(model), t.max_grad_norm)
    lr = scheduler.get_last_lr()[0]
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss_sum, tokens, lr


def _base_of(model):
    """The base model, called without the adapter: the LoRA model on this worker with its adapter
    disabled (not through DDP: a forward without gradients needs no other rank)."""
    peft_model = _unwrap(model)

    def base(**inputs):
        with peft_model.disable_adapter():
            return peft_model(**inputs)

    return base


def _checkpoint(model, optimizer, scheduler, step: int, ctx: WorkerContext, metrics: dict) -> None:
    """Every rank reports `metrics` at `step`; rank 0 also writes the checkpoint folder."""
    rng_states = _gather(torch.get_rng_state(), ctx)
    states = _full_states(model, optimizer)  # every rank: a collective under FSDP
    tmp = tempfile.mkdtemp(prefix="lora-ckpt-") if ctx.rank == 0 else None
    try:
        if tmp:
            save_checkpoint(model, optimizer, scheduler, step, tmp, rng_states, states)
        ctx.report({"step": step, **metrics}, tmp)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
