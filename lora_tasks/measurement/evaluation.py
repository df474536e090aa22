"""Task metrics of the base and the adapted model on the eval split, plus forgetting.

The adapter is loaded onto the base once; base scores come from `disable_adapter()`."""

from __future__ import annotations

import gc
import json
import logging
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from ..config import PipelineConfig
from ..errors import DataError
from ..modeling import BaseModelInfo, load_adapted_model, load_base_model, load_tokenizer
from ..training.compute import compute_for
from ..training.encoding import (
    causal_lm_row_losses,
    collate,
    encode_examples,
    generate_answers,
    greedy_answers_read_off,
)
from ..training.views import ADAPTED, BASE, CHAMPION, PeftViews, SeparateViews
from . import score_cache, stats
from .baseline import ClassifierBaseline, baseline_scores, fitted_baseline
from .block_cache import BlockCache
from .embeddings import kept_embeddings
from .evidence_split import Part, split_for_confirmation
from .forgetting import measure_forgetting

log = logging.getLogger(__name__)


def log_line(line: str) -> None:
    """Where progress lines go without a `progress` callback: this module's logger (a flow run's
    log when `PREFECT_LOGGING_EXTRA_LOGGERS` names the library; stderr under `prefect-lora warm`)."""
    log.info("%s", line)

# The metric the promotion gate reads, and whether larger is better.
PRIMARY_METRIC = {"causal_lm": ("eval_loss", False), "sequence_classification": ("accuracy", True)}


@dataclass
class EvalReport:
    """Metrics of base, champion (when there is one) and adapted on the same data, forgetting on
    the reference, and bootstrap intervals `[point, low, high]` of what the gate reads."""

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
    champion: dict[str, float] | None = None
    champion_version: str | None = None
    champion_forgetting: dict[str, float] = field(default_factory=dict)
    """The champion's forgetting on the same reference, for the report's comparison."""
    intervals: dict[str, list[float]] = field(default_factory=dict)
    """`[point, low, high]` at confidence `promotion.confidence`: `task_gain` (adapted vs base,
    paired), `champion_delta` (adapted minus champion, paired, positive = better),
    `champion_task_gain`, the primary metric per model (`base_<m>`, `champion_<m>`,
    `adapted_<m>`), each forgetting metric of the adapted model, and `champion_<forgetting>`."""
    timings: dict[str, float] = field(default_factory=dict)
    """Seconds spent loading models, scoring the task, measuring forgetting."""
    method: str = "lora"
    """`lora` or `full` (`training.method`)."""
    adapter_scale: float = 1.0
    """The share of the trained update the adapted figures are for (a remedy's choice; 1 = as trained)."""
    evidence: str = "all"
    """Which eval rows and forgetting evidence the figures come from: `all`, or with a remedy the
    `confirm` part that took no part in choosing among trials."""
    remedy: dict = field(default_factory=dict)
    """With a remedy: its strategy, every trial's search figures, the choice and its cost."""
    baseline: dict = field(default_factory=dict)
    """A classifier's base row (`lora_tasks/measurement/baseline.py`): `kind` (`majority` or `probe`, the
    better on these rows) and each baseline's `<kind>_accuracy` and `<kind>_macro_f1`, side by side."""

    @property
    def task_gain(self) -> float:
        """Improvement of the primary metric over the base, positive when the adapter helps."""
        b, a = self.base[self.primary_metric], self.adapted[self.primary_metric]
        return a - b if self.higher_is_better else b - a

    def to_dict(self) -> dict:
        return {**asdict(self), "task_gain": self.task_gain}

    def flat_metrics(self) -> dict[str, float]:
        """`base_*`, `champion_*`, `adapted_*`, forgetting, gain and `*_ci_low/high`, for MLflow."""
        out = {f"base_{k}": v for k, v in self.base.items()}
        out.update({f"champion_{k}": v for k, v in (self.champion or {}).items()})
        out.update({f"adapted_{k}": v for k, v in self.adapted.items()})
        out.update(self.forgetting)
        out.update({f"champion_{k}": v for k, v in (self.champion_forgetting or {}).items()})
        out.update({f"baseline_{k}": v for k, v in self.baseline.items() if k.endswith(("_accuracy", "_macro_f1"))})
        out["task_gain"] = self.task_gain
        out["eval_seconds"] = self.seconds
        out.update({f"eval_{k}_seconds": v for k, v in self.timings.items()})
        for k, (_, low, high) in self.intervals.items():
            out[f"{k}_ci_low"], out[f"{k}_ci_high"] = low, high
        for k in ("champion_delta", "champion_task_gain"):
            if k in self.intervals:
                out[k] = self.intervals[k][0]
        return out


@torch.no_grad()
def causal_lm_metrics(model, examples: list[dict], pad_id: int, batch_size: int, device="cpu") -> dict:
    """Token-weighted mean loss on the target tokens, and its perplexity."""
    return causal_lm_scores(model, examples, pad_id, batch_size, device)[0]


@torch.no_grad()
def causal_lm_scores(model, examples: list[dict], pad_id: int, batch_size: int, device="cpu"
                     ) -> tuple[dict, dict, list[int]]:
    """(metrics, per-example units: loss sums and target-token counts, per example how many of its
    first target tokens the model itself would write: see `greedy_answers_read_off`)."""
    losses, tokens, agreed = [], [], []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id, "causal_lm").items()}
        row_loss, row_tokens, row_agreed = causal_lm_row_losses(model, batch)
        losses += row_loss.tolist()
        tokens += row_tokens.tolist()
        agreed += row_agreed.tolist()
    loss = sum(losses) / max(sum(tokens), 1)
    metrics = {"eval_loss": loss, "perplexity": math.exp(min(loss, 50.0)), "eval_tokens": sum(tokens)}
    return metrics, {"loss_sum": np.array(losses), "tokens": np.array(tokens)}, agreed


@torch.no_grad()
def classification_metrics(model, examples: list[dict], pad_id: int, num_labels: int, batch_size: int, device="cpu") -> dict:
    """Accuracy and macro-F1 of argmax predictions."""
    return classification_scores(model, examples, pad_id, num_labels, batch_size, device)[0]


@torch.no_grad()
def classification_scores(model, examples, pad_id: int, num_labels: int, batch_size: int, device="cpu") -> tuple[dict, dict]:
    """(metrics, per-example units: truth, prediction, correctness)."""
    y_true, y_pred = [], []
    for i in range(0, len(examples), batch_size):
        batch = {k: v.to(device) for k, v in collate(examples[i : i + batch_size], pad_id, "sequence_classification").items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        y_pred += logits.argmax(-1).tolist()
        y_true += batch["labels"].tolist()
    correct = np.array([t == p for t, p in zip(y_true, y_pred)], dtype=float)
    metrics = {"accuracy": float(correct.mean()) if len(correct) else 0.0, "macro_f1": stats.macro_f1(y_true, y_pred, num_labels)}
    return metrics, {"accuracy": correct, "y_true": np.array(y_true), "y_pred": np.array(y_pred)}


def rouge_l(prediction: str, target: str) -> float:
    """ROUGE-L F1: longest common subsequence of lowercased whitespace tokens."""
    p, t = prediction.lower().split(), target.lower().split()
    if not p or not t:
        return float(p == t)
    prev = [0] * (len(t) + 1)
    for a in p:
        cur = [0]
        for j, b in enumerate(t):
            cur.append(prev[j] + 1 if a == b else max(prev[j + 1], cur[j]))
        prev = cur
    lcs = prev[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(p), lcs / len(t)
    return 2 * precision * recall / (precision + recall)


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
    """Exact match of stripped answers; with `json`, per-field accuracy and valid-JSON rate too;
    with `rouge_l`, the mean ROUGE-L F1."""
    return {k: float(v.mean()) if len(v) else 0.0 for k, v in generation_units(predictions, targets, metric).items()}


def generation_units(predictions: list[str], targets: list[str], metric: str) -> dict[str, np.ndarray]:
    """Per-row scores of the generated answers (see `generation_metrics`)."""
    out = {"exact_match": np.array([p.strip() == t.strip() for p, t in zip(predictions, targets)], dtype=float)}
    if metric == "json":
        scores = [score_json(p, t) for p, t in zip(predictions, targets)]
        out = {"exact_match": np.array([s[0] for s in scores], dtype=float),
               "field_accuracy": np.array([s[1] for s in scores], dtype=float),
               "valid_json": np.array([s[2] for s in scores], dtype=float)}
    elif metric == "rouge_l":
        out["rouge_l"] = np.array([rouge_l(p, t) for p, t in zip(predictions, targets)], dtype=float)
    return out


def task_scores(model, cfg: PipelineConfig, examples, rows, tokenizer, device, name: str = "model",
                progress: Callable[[str], None] = log_line) -> tuple[dict, dict, list[str]]:
    """(metrics, per-unit values, generated answers) of one model (`name`, for the lines to
    `progress`) on the eval split."""
    bs, pad_id = cfg.evaluation.batch_size, tokenizer.pad_token_id
    if cfg.task == "sequence_classification":
        return (*classification_scores(model, examples, pad_id, len(cfg.data.labels), bs, device), [])
    metrics, units, agreed = causal_lm_scores(model, examples, pad_id, bs, device)
    gen = cfg.evaluation.generation
    if gen is None:
        return metrics, units, []
    rows = rows[: gen.max_rows] if gen.max_rows else rows
    prompts, prompting = [r[cfg.data.prompt_column] for r in rows], {
        "chat_template": cfg.data.chat_template, "system_prompt": cfg.data.system_prompt}
    # A model that writes the reference answer token by token (its loss pass shows it) needs no decoding for it.
    known = greedy_answers_read_off(examples, agreed, prompts, tokenizer, gen.max_new_tokens, **prompting)
    todo = [p for i, p in enumerate(prompts) if i not in known]
    progress(f"{name}'s answers on the eval rows: {len(known)} of {len(rows)} read off its loss pass (it writes the "
             f"reference), {len(todo)} to generate")
    fresh = iter(generate_answers(model, tokenizer, todo, gen.max_new_tokens, bs, device, **prompting,
                                  label=f"{name}'s answers on the eval rows", batch_tokens=gen.batch_tokens,
                                  progress=progress) if todo else [])
    answers = [known[i] if i in known else next(fresh) for i in range(len(rows))]
    per_row = generation_units(answers, [r[cfg.data.completion_column] for r in rows], gen.metric)
    metrics.update({k: float(v.mean()) if len(v) else 0.0 for k, v in per_row.items()})
    return metrics, {**units, **per_row}, answers


def primary_metric(cfg: PipelineConfig) -> tuple[str, bool]:
    """The metric the gate reads and whether larger is better."""
    gen = cfg.evaluation.generation
    if gen is not None:
        return ("rouge_l", True) if gen.metric == "rouge_l" else ("exact_match", True)
    return PRIMARY_METRIC[cfg.task]


def _intervals(metric: str, higher: bool, scores: dict[str, dict], stats_kw: dict) -> dict[str, list[float]]:
    """Intervals of the primary metric per model, of the gain over base and of the lead over the
    champion (both oriented so that positive is better)."""
    out = {}
    if metric == "eval_loss":
        t = scores["adapted"]["tokens"]
        for name, u in scores.items():
            out[f"{name}_{metric}"] = stats.ratio_ci(u["loss_sum"], t, **stats_kw).to_list()
        diff = lambda better, worse: stats.paired_ratio_diff_ci(worse["loss_sum"], better["loss_sum"], t, **stats_kw)
    else:
        for name, u in scores.items():
            out[f"{name}_{metric}"] = stats.mean_ci(u[metric], **stats_kw).to_list()
        sign = 1 if higher else -1
        diff = lambda better, worse: stats.paired_diff_ci(sign * better[metric], sign * worse[metric], **stats_kw)
    out["task_gain"] = diff(scores["adapted"], scores["base"]).to_list()
    if "champion" in scores:
        out["champion_delta"] = diff(scores["adapted"], scores["champion"]).to_list()
        out["champion_task_gain"] = diff(scores["champion"], scores["base"]).to_list()
    return out


def load_views(cfg: PipelineConfig, adapter_dir: str | None, champion_adapter_dir: str | None = None, device: str = "cpu",
               tokenizer=None):
    """The models to compare, as named views (`base`, `adapted`, `champion` when given; the base
    alone without `adapter_dir`).

    LoRA: ONE copy of the base weights, both adapters loaded into the same PeftModel under the
    names `default` and `champion`; the base is the PeftModel under `disable_adapter()`.
    Full fine-tuning (`training.method: full`): `adapter_dir` holds a whole model, so the base is
    loaded separately beside it: two copies of the weights are unavoidable there."""
    bm = cfg.base_model
    if tokenizer is None:
        tokenizer = load_tokenizer(bm.name_or_path, bm.revision, bm.trust_remote_code)
    kw = {"num_labels": len(cfg.data.labels) if cfg.data.labels else None, "torch_dtype": bm.torch_dtype,
          "trust_remote_code": bm.trust_remote_code, "pad_token_id": tokenizer.pad_token_id}
    torch.manual_seed(cfg.training.seed)  # a classifier's fresh head starts as it did in training
    base = load_base_model(bm.name_or_path, cfg.task, revision=bm.revision, **kw)
    if adapter_dir is None:
        return SeparateViews({BASE: base.to(device)})
    if cfg.training.method == "full":
        tuned = load_base_model(str(adapter_dir), cfg.task, **kw).to(device)
        if not champion_adapter_dir:
            return SeparateViews({BASE: base.to(device), ADAPTED: tuned})
        from peft import PeftModel

        model = PeftModel.from_pretrained(base, str(champion_adapter_dir), adapter_name="champion", is_trainable=False).to(device)
        return PeftViews(model, {CHAMPION: "champion"}, separate={ADAPTED: tuned})
    model = load_adapted_model(base, adapter_dir).to(device)
    adapters = {ADAPTED: "default"}
    if champion_adapter_dir:
        model.load_adapter(str(champion_adapter_dir), adapter_name="champion", is_trainable=False)
        adapters[CHAMPION] = "champion"
    return PeftViews(model, adapters)


class Evaluation:
    """The models of one evaluation, loaded once (LoRA: one copy of the base weights, both
    adapters on one PeftModel, the base through `disable_adapter()`; a fully fine-tuned model
    beside a separately loaded base), scored on any rows, part of the forgetting evidence and
    scale of the new adapter. Scores of a view on a part are computed once and reused."""

    def __init__(self, cfg: PipelineConfig, adapter_dir: str | None, device: str = "cpu", base_info: BaseModelInfo | None = None,
                 champion_adapter_dir: str | None = None, champion_version: str | None = None,
                 train_rows: list[dict] | None = None, progress: Callable[[str], None] | None = None):
        started = time.perf_counter()
        self.say = progress or log_line  # each phase's line: a flow's run logger, or this module's logger
        bm = cfg.base_model
        self.cfg, self.device, self.base_info, self.champion_version = cfg, device, base_info, champion_version
        self.compute = compute_for(cfg.training.precision, device)  # the precision the adapter trained in
        self.adapter_dir, self.champion_adapter_dir = adapter_dir, champion_adapter_dir
        self.tokenizer = load_tokenizer(bm.name_or_path, bm.revision, bm.trust_remote_code)
        self.views = load_views(cfg, adapter_dir, champion_adapter_dir, device, self.tokenizer)
        self.stats_kw = {"resamples": cfg.evaluation.bootstrap_samples, "confidence": cfg.promotion.confidence,
                         "seed": cfg.training.seed}
        self.load_seconds = time.perf_counter() - started
        self._task: dict[tuple, tuple] = {}
        self._blocks = BlockCache()  # the forgetting comparison's reuse: the base's states, unchanging models' units
        self.train_rows = train_rows  # a classifier's baseline is fit on them
        self._baseline: ClassifierBaseline | None = None
        self._baseline_kind: str | None = None  # chosen on the first rows scored (a remedy: its search part), then kept
        self.baseline_summary: dict[str, dict] = {}  # per part: the classifier baseline's choice and figures

    def with_adapter(self, adapter_dir: str) -> Evaluation:
        """The same evaluation (base, champion) for another new adapter: a search trial's. This
        one's models are released first: one copy of the base weights at a time."""
        self.views = None
        gc.collect()
        ev = Evaluation(self.cfg, adapter_dir, self.device, self.base_info, self.champion_adapter_dir,
                        self.champion_version, self.train_rows, self.say)
        ev._baseline, ev._baseline_kind = self._baseline, self._baseline_kind  # the same base, the same baseline
        return ev

    def _scores(self, name: str, scale: float, part: str, examples, rows) -> tuple[dict, dict, list[str]]:
        """One view's task scores on `rows`: computed once per evaluation, and kept on disk across
        runs (`score_cache`, keyed by the weights' bytes): the base and a champion never change, and
        today's adapter is tomorrow's champion."""
        key = (name, scale if name == ADAPTED else 1.0, part)
        if key in self._task:
            return self._task[key]
        if name == BASE and self.cfg.task == "sequence_classification":
            self._task[key] = self._baseline_scores(part, examples)
            return self._task[key]
        stored, started = self._stored_key(name, key[1], rows), time.perf_counter()
        scores = score_cache.load(stored) if stored else None
        when = "read from the score cache" if scores is not None else None
        if scores is None:
            with self.views.scaled(name, key[1]), self.views.use(name) as m:
                scores = task_scores(m, self.cfg, examples, rows, self.tokenizer, self.device, name, self.say)
            if stored:
                score_cache.save(stored, scores)
        self._task[key] = scores
        metric, when = primary_metric(self.cfg)[0], when or f"{time.perf_counter() - started:.0f} s"
        self.say(f"{name}'s task scores on {len(rows)} {'eval' if part == 'all' else part} rows: "
                 f"{metric} {stats.figure(scores[0][metric])} ({when})")
        return scores

    def _baseline_scores(self, part: str, examples: list[dict]) -> tuple[dict, dict, list[str]]:
        """A classifier's base row: the better of the majority class and the linear probe on the
        frozen base (`baseline.py`), never its untrained head."""
        started = time.perf_counter()
        with self.views.use(BASE) as m:
            identity = self._identity(BASE, 1.0)
            if self._baseline is None:
                self._baseline = fitted_baseline(self.cfg, m, self.tokenizer, self.train_rows, identity, self.device)
            features = kept_embeddings(m, [e["input_ids"] for e in examples], self.tokenizer.pad_token_id or 0,
                                       self.cfg.evaluation.batch_size,  # the eval rows, kept from the last run
                                       identity and f"{identity}|{self.cfg.model_name}|eval-{part}", self.device)
        y_true = np.array([e["labels"] for e in examples])
        metrics, units, summary = baseline_scores(self._baseline, features, y_true, len(self.cfg.data.labels),
                                                  self._baseline_kind)
        self._baseline_kind = summary["kind"]
        self.baseline_summary[part] = {**summary, "seconds": time.perf_counter() - started}
        probe = stats.figure(summary["probe_accuracy"]) if "probe_accuracy" in summary else "none"
        majority = stats.figure(summary["majority_accuracy"])
        self.say(f"baseline on {len(examples)} {part} rows: majority class {majority}, linear probe {probe}: "
                 f"the {summary['kind']} is the base row ({time.perf_counter() - started:.0f} s)")
        return metrics, units, []

    def _stored_key(self, name: str, scale: float, rows: list[dict]) -> str | None:
        """The disk cache key of a view's scores on `rows` (None: not kept, see `_identity`)."""
        identity = self._identity(name, scale)
        return score_cache.scores_key(self.cfg, identity, rows) if identity else None

    def _identity(self, name: str, scale: float) -> str | None:
        """What a view's scores kept on disk are keyed by: the base, the champion, and the new
        adapter as trained (scale 1), which the next run reads back if it became the champion
        (its registered files are the trained ones, byte for byte). None for a scaled adapter."""
        if self.base_info is None or (name == ADAPTED and scale != 1.0):
            return None
        adapter = {CHAMPION: self.champion_adapter_dir, ADAPTED: self.adapter_dir}.get(name)
        return score_cache.model_identity(self.base_info.content_hash, adapter, self.compute.precision, self.device)

    def keep_base(self, rows: list[dict], part: Part | None = None) -> None:
        """Compute and keep on disk what every evaluation on `rows` and `part` reads of the base
        alone: its task scores (`score_cache`; a classifier's baseline, `baseline.py`), its answers to
        the probes and its side of the forgetting comparison on a causal LM's probes and corpus
        (`block_cache`). Needs no adapter."""
        cfg = self.cfg
        self.say(f"the base alone on {len(rows)} {part.name if part else 'eval'} rows: task scores, then forgetting")
        self._blocks.identities = {BASE: self._identity(BASE, 1.0)}
        with self.compute.autocast():
            self._scores(BASE, 1.0, part.name if part else "all", encode_examples(rows, self.tokenizer, cfg), rows)
            measure_forgetting(cfg, self.views, self.tokenizer, self.device, self.base_info, self.stats_kw, part,
                               self._blocks, sources=("corpus", "probes"), progress=self.say)

    def report(self, rows: list[dict], *, part: Part | None = None, scale: float = 1.0) -> EvalReport:
        """Base, champion and the new adapter at `scale` on `rows`, forgetting on `part` of the
        reference (all of it when None), and the intervals the gate reads."""
        cfg, started = self.cfg, time.perf_counter()
        examples = encode_examples(rows, self.tokenizer, cfg)
        names = [n for n in (CHAMPION, ADAPTED, BASE) if n in self.views.names]
        what = f"{', '.join(names)} at scale {scale:g} on {len(examples)} {part.name if part else 'eval'} rows"
        self.say(f"evaluating {what}: task scores, then forgetting")  # minutes of work on a small CPU: say so
        with self.compute.autocast():
            scored = {n: self._scores(n, scale, part.name if part else "all", examples, rows) for n in names}
        metrics, units, answers = ({n: s[i] for n, s in scored.items()} for i in range(3))
        metric, higher = primary_metric(cfg)
        intervals = _intervals(metric, higher, units, self.stats_kw)
        task_done = time.perf_counter()
        self._blocks.identities = {n: self._identity(n, scale) for n in self.views.names}
        with self.compute.autocast(), self.views.scaled(ADAPTED, scale):
            forgetting, f_intervals = measure_forgetting(cfg, self.views, self.tokenizer, self.device, self.base_info,
                                                         self.stats_kw, part, self._blocks, progress=self.say)
        intervals.update(f_intervals[ADAPTED])
        if CHAMPION in names:
            intervals.update({f"champion_{k}": v for k, v in f_intervals[CHAMPION].items()})
        done = time.perf_counter()
        self.say(f"evaluated {what}: task scores {task_done - started:.0f} s, forgetting {done - task_done:.0f} s")
        return EvalReport(
            task=cfg.task, primary_metric=metric, higher_is_better=higher, base=metrics[BASE], adapted=metrics[ADAPTED],
            forgetting=forgetting[ADAPTED], eval_rows=len(examples), seconds=self.load_seconds + done - started,
            samples=_samples(cfg, rows, answers), champion=metrics.get(CHAMPION),
            champion_version=self.champion_version if CHAMPION in names else None,
            intervals=intervals, champion_forgetting=forgetting.get(CHAMPION, {}),
            timings={"load": self.load_seconds, "task": task_done - started, "forgetting": done - task_done},
            method=cfg.training.method, adapter_scale=scale, evidence=part.name if part else "all",
            baseline=self.baseline_summary.get(part.name if part else "all", {}),
        )


def _samples(cfg: PipelineConfig, rows: list[dict], answers: dict[str, list[str]]) -> list[dict]:
    """Generated answers of base, champion and adapted next to the target (generation scoring only)."""
    return [
        {"prompt": r[cfg.data.prompt_column], "target": r[cfg.data.completion_column], "base": b, "adapted": a,
         **({"champion": answers[CHAMPION][i]} if CHAMPION in answers else {})}
        for i, (r, b, a) in enumerate(zip(rows, answers[BASE], answers[ADAPTED]))
    ]


def evaluate_adapter(cfg: PipelineConfig, adapter_dir: str, eval_rows: list[dict], device: str = "cpu",
                     base_info: BaseModelInfo | None = None, champion_adapter_dir: str | None = None,
                     champion_version: str | None = None, train_rows: list[dict] | None = None) -> EvalReport:
    """Score base, champion (when given) and the adapter as trained on the same eval rows, measure
    forgetting of each against the base on the reference section's sources, and bootstrap
    intervals of everything the gate reads. `base_info` keys the caches; a classifier's base row is
    fit on `train_rows` (`baseline.py`). A remedy's trials: `gate.remedies.evaluate_with_remedies`."""
    return Evaluation(cfg, adapter_dir, device, base_info, champion_adapter_dir, champion_version, train_rows).report(eval_rows)


def keep_base_scores(cfg: PipelineConfig, eval_rows: list[dict], device: str = "cpu",
                     base_info: BaseModelInfo | None = None, train_rows: list[dict] | None = None) -> None:
    """What `evaluate_adapter` would compute of the base alone on `eval_rows` (on both parts of
    a remedy's split evidence), computed now and kept on disk for every later evaluation. Nothing
    for a base without a content hash (a hub id at a branch): its scores are never kept, so the
    model is not even loaded."""
    if base_info is None or not base_info.content_hash:
        return
    ev = Evaluation(cfg, None, device, base_info, train_rows=train_rows)
    if cfg.remedy.strategy == "none":
        ev.keep_base(eval_rows)
        return
    for part, rows in zip(("search", "confirm"), evidence_split(cfg, eval_rows)):
        ev.keep_base(rows, Part(part, cfg.remedy.confirm_fraction))


def evidence_split(cfg: PipelineConfig, eval_rows: list[dict]) -> tuple[list[dict], list[dict]]:
    """A remedy's (search rows, confirm rows) of `eval_rows`, by each row's content."""
    keys = [json.dumps([row.get(c) for c in sorted(row)], default=str) for row in eval_rows]
    try:
        return split_for_confirmation(eval_rows, keys, cfg.remedy.confirm_fraction)
    except ValueError as exc:
        raise DataError(f"remedy: {exc} (remedy.confirm_fraction: {cfg.remedy.confirm_fraction})") from None


