"""LoRA vs full fine-tuning on the same base, data and steps: what LoRA saves and how much less
it forgets. Used by `prefect-lora compare-full CONFIG` and by `bench/lora_vs_full.py`.

Each method is trained in this process by the project's own loop (`training.train_worker`, one
worker, no Ray) and scored by `evaluation.evaluate_adapter` against the same base on the same
eval rows. Reported per method: trainable parameters; training-state memory (weights +
gradients + optimizer state, measured on the tensors after one optimizer step); the peak
resident memory during training (RSS, sampled); median step time; artifact size; task gain and
forgetting with their intervals.
"""

from __future__ import annotations

import gc
import itertools
import os
import shutil
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..config import PipelineConfig

MIB = 2**20


@dataclass
class MethodResult:
    method: str
    learning_rate: float
    steps: int
    trainable_params: int
    total_params: int
    state_bytes: dict[str, int]
    """`weights`, `gradients`, `optimizer` and their `total`: the training state's tensors."""
    peak_rss_mb: float
    """Highest resident memory of this process while the method trained."""
    rss_before_mb: float
    step_seconds: float
    """Median seconds per optimizer step (the first step, with its warm-up, left out)."""
    train_seconds: float
    artifact_bytes: int
    final_train_loss: float
    eval_seconds: float = 0.0
    metrics: dict[str, float] = field(default_factory=dict)
    intervals: dict[str, list[float]] = field(default_factory=dict)
    base_eval_loss: float | None = None
    adapted_eval_loss: float | None = None
    remedy: dict = field(default_factory=dict)
    """LoRA with `remedy.strategy` set: every scale tried, as `EvalReport.remedy` records them."""


def config_for(cfg: PipelineConfig, method: str, learning_rate: float | None = None) -> PipelineConfig:
    """`cfg` trained by `method` on one in-process worker (no intermediate checkpoints). Full
    fine-tuning has no update to scale and no adapter to disable for the base's logits: its
    remedy and replay's KL penalty are off."""
    raw = cfg.model_dump(mode="json")
    raw["training"]["method"] = method
    if method == "full":
        raw["remedy"] = {"strategy": "none"}
        raw["replay"]["kl_weight"] = 0.0
    raw["training"]["checkpoint_every"] = None
    if learning_rate is not None:
        raw["training"]["learning_rate"] = learning_rate
    raw["scaling"]["num_workers"] = 1
    return PipelineConfig.model_validate(raw)


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / MIB


class _PeakRss:
    """Samples this process's RSS every 20 ms in a thread; `.peak` after the block."""

    def __enter__(self):
        self.peak, self._stop = _rss_mb(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, _rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss_mb())


def training_state_bytes(cfg: PipelineConfig, rows: list[dict]) -> tuple[dict[str, int], int, int]:
    """(bytes of weights, gradients and optimizer state after one optimizer step, trainable
    params, total params) of the model `train_worker` would build for `cfg`."""
    import torch

    from ..modeling import apply_lora, count_parameters, load_base_model, load_tokenizer
    from ..training.encoding import causal_lm_loss, collate, encode_examples
    from ..training.loop import make_optimizer

    bm, t = cfg.base_model, cfg.training
    tok = load_tokenizer(bm.name_or_path, bm.revision, bm.trust_remote_code)
    model = load_base_model(bm.name_or_path, cfg.task, revision=bm.revision, torch_dtype=bm.torch_dtype,
                            num_labels=len(cfg.data.labels) if cfg.data.labels else None,
                            trust_remote_code=bm.trust_remote_code, pad_token_id=tok.pad_token_id)
    if t.method == "full":
        model.requires_grad_(True)
    else:
        lc = cfg.lora
        model = apply_lora(model, cfg.task, r=lc.r, alpha=lc.alpha, dropout=lc.dropout, target_modules=lc.target_modules, bias=lc.bias)
    for p in model.parameters():
        if p.requires_grad:
            p.data = p.data.float()
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = make_optimizer(params, t.learning_rate, t.weight_decay, torch.device("cpu"))
    batch = collate(encode_examples(rows[:2], tok, cfg), tok.pad_token_id, cfg.task)
    loss = causal_lm_loss(model, batch)[0] if cfg.task == "causal_lm" else model(**batch).loss
    loss.backward()
    optimizer.step()

    def nbytes(tensors) -> int:
        seen, total = set(), 0
        for x in tensors:
            if torch.is_tensor(x) and x.data_ptr() not in seen:
                seen.add(x.data_ptr())
                total += x.numel() * x.element_size()
        return total

    state = {
        "weights": nbytes(model.parameters()),  # tied weights once
        "gradients": nbytes(p.grad for p in params if p.grad is not None),
        "optimizer": nbytes(v for s in optimizer.state.values() for v in s.values()),
    }
    state["total"] = sum(state.values())
    trainable, total = count_parameters(model)
    del model, optimizer
    gc.collect()
    return state, trainable, total


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def _train(cfg: PipelineConfig, rows: list[dict], out: Path) -> dict:
    from ..training.loop import ADAPTER_DIR, WorkerContext, train_worker

    stamps: list[float] = []

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir:
            shutil.copytree(Path(checkpoint_dir) / ADAPTER_DIR, out, dirs_exist_ok=True)

    gc.collect()
    started = time.perf_counter()
    with _PeakRss() as rss:
        before = _rss_mb()
        raw = cfg.model_dump(mode="json")
        raw["training"]["log_every"] = 1
        result = train_worker(PipelineConfig.model_validate(raw), rows,
                              WorkerContext(log=lambda m, s: stamps.append(time.perf_counter()), report=keep))
    gaps = sorted(b - a for a, b in itertools.pairwise(stamps))
    return {"train_seconds": time.perf_counter() - started, "step_seconds": gaps[len(gaps) // 2] if gaps else float("nan"),
            "final_train_loss": result["train_loss"], "peak_rss_mb": rss.peak, "rss_before_mb": before}


def compare_methods(cfg: PipelineConfig, train_rows: list[dict], eval_rows: list[dict], *,
                    methods: tuple[str, ...] = ("lora", "full"), learning_rates: dict[str, float] | None = None,
                    evaluate: bool = True, log=print) -> dict[str, MethodResult]:
    """Train and score each method on the same data and steps; see the module docstring."""
    from .evaluation import evaluate_adapter

    learning_rates = learning_rates or {}
    work = Path(tempfile.mkdtemp(prefix="lora-vs-full-"))
    out: dict[str, MethodResult] = {}
    try:
        for method in methods:
            mcfg = config_for(cfg, method, learning_rates.get(method))
            t = mcfg.training
            log(f"[{method}] measuring training state ...")
            state, trainable, total = training_state_bytes(mcfg, train_rows)
            log(f"[{method}] training {t.max_steps or t.epochs} {'steps' if t.max_steps else 'epochs'} x {t.batch_size} rows, "
                f"lr {t.learning_rate:g} ...")
            folder = work / method
            timing = _train(mcfg, train_rows, folder)
            res = MethodResult(method=method, learning_rate=t.learning_rate, steps=t.max_steps or 0,
                               trainable_params=trainable, total_params=total, state_bytes=state,
                               artifact_bytes=_folder_bytes(folder), **timing)
            if evaluate and eval_rows:
                log(f"[{method}] evaluating on {len(eval_rows)} eval rows ...")
                report = evaluate_adapter(mcfg, str(folder), eval_rows, train_rows=train_rows)
                res.eval_seconds, res.metrics, res.intervals = report.seconds, report.flat_metrics(), report.intervals
                res.base_eval_loss, res.adapted_eval_loss = report.base.get("eval_loss"), report.adapted.get("eval_loss")
                res.remedy = report.remedy
            out[method] = res
            gc.collect()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return out


def _ci(r: MethodResult, key: str) -> str:
    if key not in r.intervals:
        return "-"
    p, lo, hi = r.intervals[key]
    return f"{p:.3f} [{lo:.3f}, {hi:.3f}]"


def ratios(results: dict[str, MethodResult]) -> dict[str, float]:
    """LoRA over full fine-tuning: training state, peak RSS growth, step time, artifact size."""
    if not {"lora", "full"} <= results.keys():
        return {}
    lo, fu = results["lora"], results["full"]
    return {
        "training_state": lo.state_bytes["total"] / fu.state_bytes["total"],
        "trainable_state": (lo.state_bytes["gradients"] + lo.state_bytes["optimizer"])
        / max(1, fu.state_bytes["gradients"] + fu.state_bytes["optimizer"]),
        "peak_rss": lo.peak_rss_mb / fu.peak_rss_mb,
        "step_time": lo.step_seconds / fu.step_seconds,
        "artifact": lo.artifact_bytes / fu.artifact_bytes,
    }


def format_table(results: dict[str, MethodResult]) -> str:
    """A plain-text table, one column per method, and the LoRA/full ratios."""
    rows = [
        ("trainable params", lambda r: f"{r.trainable_params:,} ({r.trainable_params / r.total_params:.2%})"),
        ("learning rate", lambda r: f"{r.learning_rate:g}"),
        ("weights (MiB)", lambda r: f"{r.state_bytes['weights'] / MIB:.0f}"),
        ("gradients (MiB)", lambda r: f"{r.state_bytes['gradients'] / MIB:.1f}"),
        ("optimizer state (MiB)", lambda r: f"{r.state_bytes['optimizer'] / MIB:.1f}"),
        ("training state total (MiB)", lambda r: f"{r.state_bytes['total'] / MIB:.0f}"),
        ("peak RSS in training (MiB)", lambda r: f"{r.peak_rss_mb:.0f}"),
        ("step time (s, median)", lambda r: f"{r.step_seconds:.2f}"),
        ("artifact size (MiB)", lambda r: f"{r.artifact_bytes / MIB:.2f}"),
        ("final train loss", lambda r: f"{r.final_train_loss:.3f}"),
        ("eval loss adapted (base)", lambda r: f"{r.adapted_eval_loss:.3f} ({r.base_eval_loss:.3f})" if r.adapted_eval_loss is not None else "-"),
        ("task gain", lambda r: _ci(r, "task_gain")),
        ("reference ppl ratio", lambda r: _ci(r, "reference_perplexity_ratio")),
        ("reference KL(base||adapted)", lambda r: _ci(r, "reference_kl")),
        ("self-retention ppl ratio", lambda r: _ci(r, "self_retention_perplexity_ratio")),
        ("self-retention KL(base||adapted)", lambda r: _ci(r, "self_retention_kl")),
    ]
    width = max(len(n) for n, _ in rows)
    lines = [f"{'':{width}}" + "".join(f"  {m:>26}" for m in results)]
    for name, fn in rows:
        cells = [fn(r) for r in results.values()]
        if all(c == "-" for c in cells):
            continue
        lines.append(f"{name:{width}}" + "".join(f"  {c:>26}" for c in cells))
    for k, v in ratios(results).items():
        lines.append(f"LoRA / full: {k:<{width - 13}}  {v:>26.3f}")
    return "\n".join(lines)


def to_json(results: dict[str, MethodResult]) -> dict:
    return {"results": {m: asdict(r) for m, r in results.items()}, "ratios": ratios(results)}
