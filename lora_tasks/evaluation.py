"""Task metrics of the base and the adapted model on the eval split, plus forgetting.

The adapter is loaded onto the base once; base scores come from `disable_adapter()`."""

from __future__ import annotations

import contextlib
import json
import math
import time
from dataclasses import asdict, dataclass, field

import torch

from .config import PipelineConfig
from .forgetting import causal_lm_forgetting, chunk_reference, read_reference_texts, representation_drift
from .modeling import BaseModelInfo, describe_base_model, load_adapted_model, load_base_model, load_tokenizer
from .probes import GENERAL_PROBES, base_answers, probe_blocks
from .training import causal_lm_loss, collate, encode_examples, format_prompts

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
    samples: list[dict] = field(default_factory=list)
    """Generated answers of base and adapted next to the target (generation scoring only)."""

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
        loss_sum, n = causal_lm_loss(model, batch)
        total += float(loss_sum)
        count += n
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


def score_json(prediction: str, target: str) -> tuple[bool, float, bool]:
    """(exact match, share of the target's fields right, prediction is a JSON object)."""
    want = json.loads(target)
    try:
        got = json.loads(prediction.strip())
    except ValueError:
        return False, 0.0, False
    if not isinstance(got, dict) or not isinstance(want, dict):
        return got == want, float(got == want), isinstance(got, dict)
    right = sum(k in got and got[k] == v for k, v in want.items())
    return got == want, right / max(len(want), 1), True


def generation_metrics(predictions: list[str], targets: list[str], metric: str) -> dict:
    """Exact match of stripped answers; with `json`, per-field accuracy and valid-JSON rate too."""
    n = max(len(targets), 1)
    if metric == "exact":
        return {"exact_match": sum(p.strip() == t.strip() for p, t in zip(predictions, targets)) / n}
    scores = [score_json(p, t) for p, t in zip(predictions, targets)]
    return {
        "exact_match": sum(s[0] for s in scores) / n,
        "field_accuracy": sum(s[1] for s in scores) / n,
        "valid_json": sum(s[2] for s in scores) / n,
    }


@torch.no_grad()
def generate_answers(model, tokenizer, prompts: list[str], data, max_new_tokens: int, batch_size: int, device="cpu") -> list[str]:
    """Greedy answers to `prompts`, batched with left padding so every row continues from its last token."""
    texts, special = format_prompts(prompts, tokenizer, data)
    side, tokenizer.padding_side = tokenizer.padding_side, "left"
    answers = []
    try:
        for i in range(0, len(texts), batch_size):
            enc = tokenizer(texts[i : i + batch_size], return_tensors="pt", padding=True, add_special_tokens=special).to(device)
            out = model.generate(
                **enc, max_new_tokens=max_new_tokens, do_sample=False,
                pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id,
            )
            answers += tokenizer.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    finally:
        tokenizer.padding_side = side
    return answers


def _task_metrics(model, cfg: PipelineConfig, examples, rows, tokenizer, device) -> tuple[dict, list[str]]:
    bs, pad_id = cfg.evaluation.batch_size, tokenizer.pad_token_id
    if cfg.task == "sequence_classification":
        return classification_metrics(model, examples, pad_id, len(cfg.data.labels), bs, device), []
    metrics = causal_lm_metrics(model, examples, pad_id, bs, device)
    gen = cfg.evaluation.generation
    if gen is None:
        return metrics, []
    rows = rows[: gen.max_rows] if gen.max_rows else rows
    answers = generate_answers(model, tokenizer, [r[cfg.data.prompt_column] for r in rows], cfg.data,
                               gen.max_new_tokens, bs, device)
    metrics.update(generation_metrics(answers, [r[cfg.data.completion_column] for r in rows], gen.metric))
    return metrics, answers


def evaluate_adapter(
    cfg: PipelineConfig, adapter_dir: str, eval_rows: list[dict], device: str = "cpu", base_info: BaseModelInfo | None = None
) -> EvalReport:
    """Score base and adapted on the eval split, and measure forgetting when a reference is set.

    `base_info` (from `describe_base_model`, computed when absent) keys the cache of probe answers."""
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

    def autocast():  # score in the precision the adapter trained in
        if cfg.training.precision == "bf16":
            return torch.autocast(torch.device(device).type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    with autocast():
        adapted, adapted_answers = _task_metrics(model, cfg, examples, eval_rows, tokenizer, device)
        with model.disable_adapter():
            base_metrics, base_outputs = _task_metrics(model, cfg, examples, eval_rows, tokenizer, device)
    samples = [
        {"prompt": r[cfg.data.prompt_column], "target": r[cfg.data.completion_column], "base": b, "adapted": a}
        for r, b, a in zip(eval_rows, base_outputs, adapted_answers)
    ]

    forgetting: dict[str, float] = {}
    ref = cfg.evaluation.reference
    bs, max_len = cfg.evaluation.batch_size, cfg.training.max_seq_length
    with autocast():
        if ref is not None and ref.probes and cfg.task == "causal_lm":
            info = base_info or describe_base_model(bm.name_or_path, bm.revision)
            rows = base_answers(model, tokenizer, info.content_hash or f"{info.name_or_path}@{info.revision}", batch_size=bs)
            blocks, starts = probe_blocks(rows, tokenizer, max(max_len, 256))
            forgetting = causal_lm_forgetting(model, tokenizer, blocks, bs, device, score_from=starts)
        elif ref is not None:
            texts = read_reference_texts(ref.path) if ref.path else GENERAL_PROBES
            blocks = chunk_reference(texts, tokenizer, ref.max_tokens, max_len)
            measure = causal_lm_forgetting if cfg.task == "causal_lm" else representation_drift
            forgetting = measure(model, tokenizer, blocks, bs, device)
    metric, higher = ("exact_match", True) if cfg.evaluation.generation else PRIMARY_METRIC[cfg.task]
    return EvalReport(
        task=cfg.task, primary_metric=metric, higher_is_better=higher, base=base_metrics, adapted=adapted,
        forgetting=forgetting, eval_rows=len(examples), seconds=time.perf_counter() - started, samples=samples,
    )
