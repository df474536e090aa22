"""Task metrics of the base and the adapted model on the eval split, plus forgetting.

The adapter is loaded onto the base once; base scores come from `disable_adapter()`."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F

from .config import PipelineConfig
from .forgetting import causal_lm_forgetting, chunk_reference, read_reference_texts, representation_drift
from .modeling import load_adapted_model, load_base_model, load_tokenizer
from .training import IGNORE_INDEX, collate, encode_examples

# The metric the promotion gate reads, and whether larger is better.
PRIMARY_METRIC = {"causal_lm": ("eval_loss", False), "sequence_classification": ("accuracy", True)}


@dataclass
class EvalReport:
    """Metrics of base and adapted on the same data, and forgetting on the reference corpus."""

    task: str
    primary_metric: str
    higher_is_better: bool
    base: dict[str, float]
    adapted: dict[str, float]
    forgetting: dict[str, float] = field(default_factory=dict)
    eval_rows: int = 0
    seconds: float = 0.0

    @property
    def task_gain(self) -> float:
        """Improvement of the primary metric over the base, positive when the adapter helps."""
        b, a = self.base[self.primary_metric], self.adapted[self.primary_metric]
        return a - b if self.higher_is_better else b - a

    def to_dict(self) -> dict:
        return {**asdict(self), "task_gain": self.task_gain}

    def flat_metrics(self) -> dict[str, float]:
        """`base_*`, `adapted_*`, forgetting and gain as one flat dict, for MLflow."""
        out = {f"base_{k}": v for k, v in self.base.items()}
        out.update({f"adapted_{k}": v for k, v in self.adapted.items()})
        out.update(self.forgetting)
        out["task_gain"] = self.task_gain
        out["eval_seconds"] = self.seconds
        return out


@torch.no_grad()
def causal_lm_metrics(model, examples: list[dict], pad_id: int, batch_size: int, device="cpu") -> dict:
    """Token-weighted mean loss on the target tokens, and its perplexity."""
    total, count = 0.0, 0
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id, "causal_lm").items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        target = batch["labels"][:, 1:]
        ce = F.cross_entropy(logits.float().transpose(1, 2), target, ignore_index=IGNORE_INDEX, reduction="sum")
        total += float(ce)
        count += int((target != IGNORE_INDEX).sum())
    loss = total / max(count, 1)
    return {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": count}


def macro_f1(y_true: list[int], y_pred: list[int], num_labels: int) -> float:
    """Unweighted mean of per-class F1; a class absent from both truth and prediction is skipped."""
    scores = []
    for c in range(num_labels):
        tp = sum(t == c and p == c for t, p in zip(y_true, y_pred))
        fp = sum(t != c and p == c for t, p in zip(y_true, y_pred))
        fn = sum(t == c and p != c for t, p in zip(y_true, y_pred))
        if tp + fp + fn:
            scores.append(2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores) if scores else 0.0


@torch.no_grad()
def classification_metrics(model, examples: list[dict], pad_id: int, num_labels: int, batch_size: int, device="cpu") -> dict:
    """Accuracy and macro-F1 of argmax predictions."""
    y_true, y_pred = [], []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id, "sequence_classification").items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        y_pred += logits.argmax(-1).tolist()
        y_true += batch["labels"].tolist()
    accuracy = sum(t == p for t, p in zip(y_true, y_pred)) / max(len(y_true), 1)
    return {"accuracy": accuracy, "macro_f1": macro_f1(y_true, y_pred, num_labels)}


def _task_metrics(model, cfg: PipelineConfig, examples, pad_id, device) -> dict:
    bs = cfg.evaluation.batch_size
    if cfg.task == "causal_lm":
        return causal_lm_metrics(model, examples, pad_id, bs, device)
    return classification_metrics(model, examples, pad_id, len(cfg.data.labels), bs, device)


def evaluate_adapter(cfg: PipelineConfig, adapter_dir: str, eval_rows: list[dict], device: str = "cpu") -> EvalReport:
    """Score base and adapted on the eval split, and measure forgetting when a reference is set."""
    started = time.perf_counter()
    bm = cfg.base_model
    tokenizer = load_tokenizer(bm.name_or_path, bm.revision, bm.trust_remote_code)
    torch.manual_seed(cfg.training.seed)  # a classifier's fresh head starts as it did in training
    base = load_base_model(
        bm.name_or_path, cfg.task, revision=bm.revision,
        num_labels=len(cfg.data.labels) if cfg.data.labels else None,
        torch_dtype=bm.torch_dtype, trust_remote_code=bm.trust_remote_code, pad_token_id=tokenizer.pad_token_id,
    )
    model = load_adapted_model(base, adapter_dir).to(device)
    examples = encode_examples(eval_rows, tokenizer, cfg)
    pad_id = tokenizer.pad_token_id
    adapted = _task_metrics(model, cfg, examples, pad_id, device)
    with model.disable_adapter():
        base_metrics = _task_metrics(model, cfg, examples, pad_id, device)

    forgetting: dict[str, float] = {}
    ref = cfg.evaluation.reference
    if ref is not None:
        blocks = chunk_reference(read_reference_texts(ref.path), tokenizer, ref.max_tokens, cfg.training.max_seq_length)
        measure = causal_lm_forgetting if cfg.task == "causal_lm" else representation_drift
        forgetting = measure(model, tokenizer, blocks, cfg.evaluation.batch_size, device)
    metric, higher = PRIMARY_METRIC[cfg.task]
    return EvalReport(
        task=cfg.task, primary_metric=metric, higher_is_better=higher, base=base_metrics, adapted=adapted,
        forgetting=forgetting, eval_rows=len(examples), seconds=time.perf_counter() - started,
    )
