"""Typed pipeline config, loaded from YAML with every problem reported at once.

Field checks are pydantic's; the cross-field rules are each section's `_check_*` methods. Every
problem, of either kind, is reported at once in one ConfigError, each under its key path.

Relative filesystem paths in a config (data, reference corpus, local base model, storage) are
resolved against the current working directory when the config is loaded, so Ray workers,
whose working directory differs, see the same files.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, ClassVar, Iterator, Literal  # noqa: UP035

from pydantic import ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .config_io import (  # noqa: F401  (part of the API)
    StrictNumbers,
    apply_overrides,
    config_digest,
    format_error,
    parse_overrides,
    read_yaml,
    resolve_paths,
    without_defaults_added_later,
    yaml_error,
)
from .errors import ConfigError
from .secrets import webhook_url_problem

TaskType = Literal["causal_lm", "sequence_classification"]

Problem = tuple[str, str]
"""A broken cross-field rule: (key path within the section, '' for the section itself; what to fix)."""

COLLECT_PROBLEMS = "cross_field_problems"
"""Validation-context key of a list that collects cross-field problems instead of raising them."""


def _problem_line(prefix: str, key: str, message: str) -> str:
    path = ".".join(p for p in (prefix, key) if p)
    return f"{path}: {message}" if path else message


class _Section(StrictNumbers):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              allow_inf_nan=False)  # no setting means anything with inf or nan

    key_path: ClassVar[str] = ""
    """Where the section sits in a pipeline config: the prefix of its problems' key paths."""

    def cross_field_problems(self) -> list[Problem]:
        """Every cross-field rule the section breaks (its `_check_*` methods); none by default."""
        return []

    @model_validator(mode="after")
    def _check_cross_fields(self, info: ValidationInfo):
        """Collect the section's broken rules into the validation context when `config_from_dict`
        gives one (so they join every other problem), else raise them together."""
        problems = self.cross_field_problems()
        sink = (info.context or {}).get(COLLECT_PROBLEMS)
        if sink is not None:
            sink.extend(_problem_line(self.key_path, key, message) for key, message in problems)
        elif problems:
            raise ValueError("; ".join(_problem_line("", key, message) for key, message in problems))
        return self


class BaseModelConfig(_Section):
    name_or_path: str
    """Hugging Face hub id (e.g. `HuggingFaceTB/SmolLM2-135M-Instruct`), a local folder, or
    `builtin:tiny-llama` (a 2-layer Llama built in code, for smoke tests)."""
    revision: str | None = None
    """Hub revision (branch, tag or commit); a commit lets runs keep the base's scores. Ignored for folders."""
    trust_remote_code: bool = False
    """Allow model code from the hub; off unless you trust the repository."""
    torch_dtype: Literal["float32", "bfloat16", "float16", "auto"] = "float32"
    """Dtype of the loaded weights; LoRA matrices train in float32 either way."""
    quantization: Literal["4bit"] | None = None
    """`4bit`: QLoRA, the frozen base loaded as 4-bit NF4 with double quantization and bfloat16
    compute (bitsandbytes; CUDA only, so it needs `scaling.use_gpu`)."""


class ValidationPolicy(_Section):
    key_path: ClassVar[str] = "data.validation"

    policy: Literal["fail", "quarantine"] = "fail"
    """`fail` stops on any invalid row; `quarantine` writes invalid rows to a file and goes on."""
    max_invalid_fraction: float = Field(0.05, ge=0.0, le=1.0)
    """With `quarantine`: the largest share of invalid rows (per split) that still continues."""
    min_chars: int = Field(1, ge=1)
    """Shortest text (after stripping) that counts as a real example."""
    max_chars: int = Field(20_000, ge=1)
    """Longest text accepted; longer rows are reported (they would be truncated anyway)."""
    check_duplicates: bool = True
    """Report rows repeated within a split."""
    check_overlap: bool = True
    """Report eval rows whose input also appears in the train split (leakage)."""
    check_conflicts: bool = True
    """Report every row of an input given different answers in one split: a text with two labels, or a prompt
    with two completions where `evaluation.generation.metric` is exact or json (one right answer). In-memory
    splits only: a train split streamed by Ray Data is validated batch by batch, never whole, so is not checked."""

    def cross_field_problems(self) -> list[Problem]:
        return [*self._check_bounds()]

    def _check_bounds(self) -> Iterator[Problem]:
        if self.min_chars > self.max_chars:
            yield "", f"min_chars ({self.min_chars}) is larger than max_chars ({self.max_chars})"


class DataConfig(_Section):
    key_path: ClassVar[str] = "data"

    train_path: str
    """CSV, TSV, JSONL, Parquet file, or a folder saved by `datasets.Dataset.save_to_disk`."""
    eval_path: str | None = None
    """Held-out split; when absent, `eval_fraction` of the train rows are split off."""
    format: Literal["auto", "csv", "tsv", "jsonl", "parquet", "datasets"] = "auto"
    """File format; `auto` picks it from the file extension."""
    eval_fraction: float = Field(0.1, gt=0.0, lt=1.0)
    """Share of rows held out for evaluation when there is no `eval_path`."""
    text_column: str = "text"
    """Input text (classification) or the whole text to model (causal LM without a prompt)."""
    prompt_column: str | None = None
    """Causal LM: the prompt; the loss is taken on the completion only."""
    completion_column: str | None = None
    """Causal LM: the target text that follows the prompt."""
    chat_template: bool = False
    """Causal LM: wrap each prompt in the tokenizer's chat template as a user turn (instruct models)."""
    system_prompt: str | None = None
    """With `chat_template`: the system turn (set it, or the template may add its own default)."""
    label_column: str = "label"
    """Classification: the label column."""
    labels: list[str | int] | None = None
    """Classification: the declared label set, in class-index order. Required for classification."""
    max_train_rows: int | None = Field(None, ge=1)
    """Use at most this many train rows (a seeded sample), e.g. for quick runs."""
    max_eval_rows: int | None = Field(None, ge=1)
    """Use at most this many eval rows (a seeded sample)."""
    validation: ValidationPolicy = Field(default_factory=ValidationPolicy)
    """The data contract's policy."""
    loader: Literal["auto", "memory", "ray_data"] = "auto"
    """How the train split reaches the workers. `memory`: read and validated with pandas on the
    driver, rows shipped to each worker (exact row numbers in the report, all checks). `ray_data`:
    streamed through Ray Data (`read_parquet` / `read_json` / `read_csv`), the contract run per
    batch with `map_batches` on the cluster, every worker reading its share of each batch; for
    data larger than the driver's memory. `auto` streams when the train source is a URI or larger
    than `streaming_threshold_mb`."""
    streaming_threshold_mb: float = Field(1024, gt=0)
    """Size of the train source above which `loader: auto` streams it through Ray Data."""

    def cross_field_problems(self) -> list[Problem]:
        return [*self._check_columns()]

    def _check_columns(self) -> Iterator[Problem]:
        if (self.prompt_column is None) != (self.completion_column is None):
            yield "", "prompt_column and completion_column go together: set both or neither"
        if self.chat_template and self.prompt_column is None:
            yield "chat_template", "needs prompt_column and completion_column"


class LoraConfig(_Section):
    r: int = Field(8, ge=1, le=1024)
    """Rank of the LoRA update matrices."""
    alpha: float = Field(16.0, gt=0)
    """Scaling numerator: the update is scaled by alpha / r."""
    dropout: float = Field(0.05, ge=0.0, lt=1.0)
    """Dropout on the LoRA input."""
    target_modules: list[str] | Literal["all-linear"] = "all-linear"
    """Module names to adapt (e.g. [q_proj, v_proj]) or `all-linear`."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases train along with the adapter."""


class TrainingConfig(_Section):
    key_path: ClassVar[str] = "training"

    method: Literal["lora", "full"] = "lora"
    """`lora`: train a LoRA adapter on the frozen base (the product). `full`: train every weight,
    a baseline to see what LoRA saves and how much less it forgets; the run is trained, evaluated
    and logged to MLflow but never registered or promoted, and the `lora` section is ignored."""
    max_steps: int | None = Field(None, ge=1)
    """Optimizer steps to train; takes precedence over `epochs`."""
    epochs: float | None = Field(None, gt=0)
    """Passes over the train split, used when `max_steps` is not set."""
    learning_rate: float = Field(2e-4, gt=0)
    """Peak learning rate of AdamW."""
    weight_decay: float = Field(0.0, ge=0)
    """AdamW weight decay on the LoRA weights."""
    warmup_steps: int = Field(0, ge=0)
    """Linear warmup from 0 to the peak learning rate."""
    lr_schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Decay after warmup."""
    batch_size: int = Field(8, ge=1)
    """Examples per worker per micro-batch."""
    gradient_accumulation_steps: int = Field(1, ge=1)
    """Micro-batches per optimizer step."""
    max_seq_length: int = Field(256, ge=8)
    """Tokens per example; longer ones are truncated (causal LM keeps the prompt's end)."""
    max_grad_norm: float | None = Field(1.0, gt=0)
    """Gradient clipping; null turns it off."""
    seed: int = Field(42, ge=0, le=2**32 - 1)
    """Seeds data order, LoRA init and dropout: 0 to 2**32 - 1 (numpy's range)."""
    gradient_checkpointing: bool = False
    """Recompute activations in the backward pass instead of keeping them: much less memory for
    long sequences, about a third more compute."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """`bf16` runs forward and backward under bfloat16 autocast (CPU and GPU); weights stay fp32.
    `auto`: bf16 where the device runs it at full speed (a CUDA GPU with bf16, a CPU with AVX-512
    BF16 or AMX), fp32 elsewhere: on a CPU with AVX2 only, a bf16 matmul is ~150x slower than
    fp32. Decided where the work runs (each worker, the evaluation), and recorded with the run."""
    packing: bool = False
    """Causal LM: pack each micro-batch's examples into as few rows as fit the longest one,
    instead of padding every row to it. Position ids restart per example and attention stays
    within each example (block-diagonal), so the loss is the same; fewer padded tokens go
    through the model. Same examples per step, so resume and sharding are unchanged."""
    attention: Literal["auto", "sdpa", "eager"] = "auto"
    """Attention kernel while training. `auto`: eager for causal LM examples of at most 192
    tokens in bf16 on CPU (torch's CPU flash-attention is slow in bf16: eager measured 1.2x the
    tokens/s at ~110 tokens, equal at 256, 0.85x with a third more memory at 512); `sdpa`
    (flash or memory-efficient kernels) otherwise, and always on GPU."""
    checkpoint_every: int | None = Field(None, ge=1)
    """Save the adapter every N optimizer steps (always at the end)."""
    log_every: int = Field(1, ge=1)
    """Log loss and learning rate every N optimizer steps."""

    def cross_field_problems(self) -> list[Problem]:
        return [*self._check_length()]

    def _check_length(self) -> Iterator[Problem]:
        if self.max_steps is None and self.epochs is None:
            yield "", "set training.max_steps or training.epochs"
        if self.warmup_steps and self.max_steps and self.warmup_steps >= self.max_steps:
            yield "", f"warmup_steps ({self.warmup_steps}) must be below max_steps ({self.max_steps})"


class ScalingConfig(_Section):
    num_workers: int = Field(1, ge=1)
    """Ray Train workers (one DDP process each)."""
    use_gpu: bool = False
    """One GPU per worker, NCCL backend; otherwise CPU with gloo."""
    cpus_per_worker: int = Field(1, ge=1)
    """CPUs (and torch threads) per worker."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """`ddp`: every worker holds the whole model. `fsdp`: the weights are sharded across the
    workers (FSDP2 `fully_shard` per decoder layer), for base models that do not fit one device."""
    address: str | None = None
    """Ray cluster address (`ray://...` or `auto`); null starts a local Ray (or uses RAY_ADDRESS)."""
    storage_path: str = ".prefect-lora/runs"
    """Where checkpoints, adapters and reports of each run are kept: a local or NFS path, or a
    URI that pyarrow reads (`s3://bucket/prefix`, `gs://...`). With a URI, checkpoints go there
    and reports and the final adapter also stay in a local folder under `.prefect-lora/runs`."""
    max_failures: int = Field(2, ge=0)
    """Worker failures (a killed process, a lost node) that Ray Train recovers from by restarting
    the workers from the latest checkpoint; `training.checkpoint_every` bounds the lost work."""
    launcher: Literal["auto", "ray", "local"] = "auto"
    """How training starts. `ray`: Ray Train, on a local Ray instance or the cluster at `address`.
    `local`: the same training loop in the flow's own process, for one worker on this machine:
    no Ray start-up (~20 s a run saved on a small machine); a retry of the flow's training task
    continues from the latest checkpoint, but there are no in-run restarts (`max_failures`).
    `auto`: `local` for one worker with no cluster address, no storage URI and no streamed
    data; `ray` otherwise."""


class ReferenceConfig(_Section):
    """What forgetting is measured on: a text corpus, the built-in probes, multiple-choice
    benchmarks, or any combination of them (at least one)."""

    key_path: ClassVar[str] = "evaluation.reference"

    path: str | None = None
    """Plain-text corpus of general text (one passage per line; blank lines are skipped): a causal
    LM's `reference_perplexity_ratio` and `reference_kl`, a classifier's `reference_retrieval_loss`."""
    probes: Literal["general"] | None = None
    """`general`: the built-in probe prompts, scored on the base model's own (cached) greedy
    answers: `self_retention_perplexity_ratio` (perplexity ratio adapted/base on those answers) and
    `self_retention_kl`. Without `path` the probes stand in for the corpus: the corpus's limits
    (`max_perplexity_ratio`, `max_kl`) bound these two figures too, each reported once."""
    benchmarks: list[str] = Field(default_factory=list)
    """Multiple-choice benchmarks, JSONL files of `{"question", "choices", "answer"}` (`answer`:
    the 0-based index of the right choice, or its text). Each choice is scored by the model's
    log-likelihood of it after the question; `benchmark_<file stem>_accuracy_drop` is base minus
    adapted accuracy."""
    max_tokens: int = Field(4096, ge=16)
    """Token budget read from the corpus for forgetting metrics (a classifier's retrieval pairs
    take ~60 each; `prefect-lora validate` says what a budget can show)."""
    max_benchmark_questions: int | None = Field(None, ge=1)
    """Score at most this many questions of each benchmark (the first ones); null scores all."""
    max_probes: int | None = Field(None, ge=2)
    """Score this many of the 352 probes, spread evenly over them (fewer answers to generate once
    and score every run); null scores all. `prefect-lora validate` shows what a number can show."""

    def cross_field_problems(self) -> list[Problem]:
        return [*self._check_source()]

    def _check_source(self) -> Iterator[Problem]:
        if self.path is None and self.probes is None and not self.benchmarks:
            yield "", "set at least one of path (a text corpus), probes: general, or benchmarks (JSONL files)"


class GenerationEvalConfig(_Section):
    max_new_tokens: int = Field(64, ge=1)
    """Tokens generated per eval prompt (greedy)."""
    max_rows: int | None = Field(200, ge=1)
    """Eval rows scored by generation (the slow part); null scores all."""
    batch_tokens: int = Field(8192, ge=1)
    """Tokens per generation batch (prompt and new tokens per row): as many prompts as fit, not
    `evaluation.batch_size`; each decoding step reads the weights once for the whole batch."""
    metric: Literal["exact", "json", "rouge_l"] = "exact"
    """`exact`: answer equals the completion after stripping; `json`: also per-field accuracy and
    valid-JSON rate; `rouge_l`: ROUGE-L F1 (summaries), which then is the primary metric."""
    required_fields: list[str] = Field(default_factory=list)
    """`json`: fields every answer's object must hold; the registered version carries them, and
    serving counts live answers that are no JSON object or lack one (`/metrics`, `live/` metrics)."""


class EvaluationConfig(_Section):
    batch_size: int = Field(8, ge=1)
    """Examples per forward pass during evaluation."""
    generation: GenerationEvalConfig | None = None
    """Causal LM: score greedy generations against the completions; `exact_match` becomes the primary metric."""
    reference: ReferenceConfig | None = None
    """General corpus for forgetting metrics; without it no forgetting is measured."""
    bootstrap_samples: int = Field(1000, ge=0)
    """Bootstrap resamples behind every confidence interval (0: intervals collapse to points)."""
    baseline_rows: int | None = Field(20_000, ge=2)
    """Classification: train rows (a seeded sample; null: all) the baseline's linear probe reads."""


class PromotionPolicy(_Section):
    min_task_gain: float = 0.0
    """Smallest improvement of the primary metric over the base model (a classifier: over its
    baseline, the better of the majority class and a linear probe), in the metric's units (loss:
    base minus adapted). The lower bound of the paired gain's interval must reach it."""
    max_perplexity_ratio: float | None = Field(1.2, gt=0)
    """Largest allowed reference perplexity ratio adapted/base (causal LM; paired over blocks, its
    upper bound checked; null skips it). Without a corpus it bounds the probes' ratio too."""
    max_kl: float | None = Field(0.5, ge=0)
    """Largest allowed mean per-token KL(base || adapted) on the reference (causal LM; its upper
    bound checked; null skips it). Without a corpus it bounds the probes' `self_retention_kl`."""
    max_retrieval_loss: float | None = Field(0.7, ge=0)
    """Largest share of the base's hits a classifier's encoder may lose at finding which reference
    passage continues which (`forgetting.retrieval_correct`: 1 - adapted / base); the upper bound
    of its paired interval is checked; null skips it. Calibrated in docs/gate.md."""
    require_forgetting_metrics: bool = True
    """Refuse promotion when no forgetting metric was measured."""
    beat_champion: bool = True
    """The candidate must be at least as good as the current champion on the primary metric."""
    champion_tolerance: float = Field(0.0, ge=0)
    """How much worse than the champion still counts as not worse: the lower bound of the
    paired lead (challenger minus champion, same eval rows, oriented so positive is better) must
    be at least `-champion_tolerance`."""
    max_self_retention_ratio: float | None = Field(1.2, gt=0)
    """Largest allowed perplexity ratio adapted/base on the base model's own greedy answers to
    the probe set (`evaluation.reference.probes`); its upper bound is checked; null skips it."""
    max_benchmark_accuracy_drop: float | None = Field(0.05, ge=0)
    """Largest allowed accuracy drop (base minus adapted, a share in [0, 1]) on each
    multiple-choice benchmark (`evaluation.reference.benchmarks`); the upper bound of the paired
    drop is checked; null skips it."""
    confidence: float = Field(0.95, gt=0.5, lt=1.0)
    """Confidence of the bootstrap intervals the gate compares: each check reads the bound on its
    worse side (gain and lead: the lower; forgetting: the upper), all on the same data and run."""
    more_evidence: float | None = Field(None, gt=1.0, le=100.0)
    """Staged benchmark checks: score each benchmark's questions in stages, from
    `evaluation.reference.max_benchmark_questions` up to this many times that (at most the whole
    file), stopping at the first look that passes or fails the check, or finds its estimate
    well past the limit. Each look's interval is group-sequential (`lora_tasks/measurement/sequential.py`), so
    an adapter at the limit passes no more often than in one look. null: one fixed-size look."""
    underpowered: Literal["error", "warn"] = "error"
    """A check whose limit the configured evidence cannot show (a harmless adapter would pass it
    less than half the time: e.g. 40 benchmark questions against a 0.05 accuracy drop) is a
    config error before training (`error`, with the size that would show it), or a warning
    (`warn`: the run goes on and the check will likely stay undecided). `prefect-lora validate`
    prints every check's power."""


class ReplayConfig(_Section):
    """General data mixed into training so the adapter keeps what the base knew (causal LM).
    Off while `share` is 0. See `lora_tasks/training/replay.py`."""

    share: float = Field(0.0, ge=0.0, le=0.5)
    """Share of the training examples that are replay (0.2: one in five)."""
    source: Literal["self", "corpus"] = "self"
    """`self`: the base model's own greedy answers to general prompts (self-distillation; needs no
    outside data; generated once per base model and cached); `corpus`: passages of a text file,
    trained as plain text."""
    path: str | None = None
    """`self`: a file of prompts, one per line (default: the built-in set, disjoint from the
    probes); `corpus`: the text file (one passage per line). Must not overlap what forgetting is
    measured on (probes, the reference corpus, benchmarks): that would fake the evidence."""
    max_new_tokens: int = Field(64, ge=1)
    """`self`: tokens generated per replay prompt."""
    kl_weight: float = Field(0.0, ge=0.0)
    """Weight of a KL(base || adapted) penalty on the replay rows' target tokens, added to their
    loss: replay then pulls towards the base's whole next-token distribution, not only the tokens
    of its text. The base's logits come from the same model with the adapter disabled (one more
    forward pass, without gradients, over the replay rows). 0: off."""

    key_path: ClassVar[str] = "replay"

    def cross_field_problems(self) -> list[Problem]:
        return [*self._check_source()]

    def _check_source(self) -> Iterator[Problem]:
        if self.share and self.source == "corpus" and not self.path:
            yield "path", "replay.source: corpus needs replay.path (a text file, one passage per line)"
        if self.kl_weight and not self.share:
            yield "kl_weight", "the KL penalty applies to replay rows: set replay.share > 0 (or kl_weight 0)"


class SearchSpace(_Section):
    """What a `remedy.strategy: search` varies. Each list's first value is the configured one;
    unset, a list is derived from the configured run (see each field)."""

    learning_rate: list[float] | None = None
    """Default: the configured rate, half of it, a quarter of it."""
    r: list[int] | None = None
    """LoRA ranks (alpha follows, so alpha / r stays the configured ratio). Default: the
    configured rank and half of it."""
    replay_share: list[float] | None = None
    """Default: the configured share and 0.25 (when smaller)."""

    @field_validator("learning_rate", "r", "replay_share")
    @classmethod
    def _check_values(cls, values: list | None, info) -> list | None:
        if values is not None and not values:
            raise ValueError("give at least one value, or leave the key out for the default")
        least = 0.0 if info.field_name == "replay_share" else 0.0 + 1e-300
        if values is not None and any(v < least for v in values):
            raise ValueError(f"values must be {'0 or more' if least == 0 else 'positive'}, got {values}")
        return values


class RemedyConfig(_Section):
    """What to do when the gate would refuse the adapter for forgetting: try variants of it and
    keep the best one that passes (see `lora_tasks/gate/remedy.py`). Off by default."""

    strategy: Literal["none", "scale", "search"] = "none"
    """`scale`: evaluate the trained adapter at smaller scales of its update (LoRA's scaling
    factor: no retraining, one model in memory) and register the best admissible scale; the
    registered, exported and served adapter carries that scale. `search`: the scales first; when
    none is admissible (or with `when: always`), train up to `max_trials` - 1 more adapters over
    `search_space` as Ray Tune trials (each a child MLflow run), each tried at every scale."""
    when: Literal["refused", "always"] = "refused"
    """`refused`: only when the unscaled adapter's forgetting on the search part is shown past a
    limit, or undecided with its estimate past it (`remedy.remedy_needed`; undecided within the
    limit needs more evidence, not a remedy); `always`: every variant each run (a full frontier)."""
    scales: list[float] = Field(default_factory=lambda: [1.0, 0.8, 0.65, 0.5, 0.35])
    """Scales tried, each in (0, 1]; 1.0 (the adapter as trained) is always tried first."""
    confirm_fraction: float = Field(0.5, gt=0.0, lt=1.0)
    """Share of the eval rows and forgetting probes held out from the choice among trials: the
    gate reads the chosen trial's figures on this part only, so the choice cannot inflate them."""
    max_trials: int = Field(4, ge=1, le=64)
    """`search`: trainings in all, the configured one included (trials run in parallel where the
    cluster has room for more than one at `scaling.num_workers x cpus_per_worker` CPUs)."""
    search_space: SearchSpace = Field(default_factory=SearchSpace)

    @field_validator("scales")
    @classmethod
    def _check_scales(cls, scales: list[float]) -> list[float]:
        bad = [s for s in scales if not 0.0 < s <= 1.0]
        if bad:
            raise ValueError(f"each scale must be in (0, 1] (a share of the trained update), got {bad}")
        return [1.0, *sorted({s for s in scales if s != 1.0}, reverse=True)]


class TrackingConfig(_Section):
    tracking_uri: str = "sqlite:///.prefect-lora/mlflow.db"
    """MLflow tracking URI: a SQLite file (default) or a server `http://host:5000`."""
    experiment: str | None = Field(None, min_length=1, max_length=250)
    """MLflow experiment name (at most 250 characters); defaults to the registered model name."""
    artifact_location: str = ".prefect-lora/mlartifacts"
    """Artifact root for a new experiment (ignored when the experiment exists)."""


class NotificationsConfig(_Section):
    key_path: ClassVar[str] = "notifications"

    webhook_url: str | None = None
    """URL that gets a JSON POST when a run fails (naming the failed step) or promotes a version;
    the env var PREFECT_LORA_WEBHOOK_URL, then `webhook_secret_block`, are used when unset. A
    failed POST never fails the flow. Treated as a secret: redacted in MLflow params and logs,
    left out of registration.json (prefer the env var or the block)."""
    webhook_secret_block: str | None = None
    """Name of a Prefect Secret block holding the webhook URL (read when the run notifies)."""
    on_failure: bool = True
    """Notify when a run fails or crashes."""
    on_promotion: bool = True
    """Notify when a run moves `champion` to its new version."""
    timeout_s: float = Field(5.0, gt=0)
    """Seconds to wait for the webhook to answer."""

    def cross_field_problems(self) -> list[Problem]:
        return [*self._check_url()]

    def _check_url(self) -> Iterator[Problem]:  # the URL is shown redacted, if at all: it may hold a token
        yield from [("webhook_url", p)] if self.webhook_url and (p := webhook_url_problem(self.webhook_url)) else []


class RetentionConfig(_Section):
    keep_checkpoints: int | None = Field(None, ge=1)
    """Run folders of this model whose training checkpoints (`RUN_DIR/train`) are kept after a
    run: the newest ones and always the current run; older runs keep their final adapter,
    reports and registration.json, and would retrain from scratch if run again. Null keeps all."""
    keep_versions: int | None = Field(None, ge=1)
    """Registered versions kept after a run (the newest); older ones are deleted from MLflow,
    except the champion, the previous champion and the challenger. Null keeps all."""


class PipelineConfig(_Section):
    model_name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$", max_length=100)
    """Registered model name in MLflow and folder of its runs (letters, digits, `_ . -`; at most 100)."""
    task: TaskType
    """`causal_lm` or `sequence_classification`."""
    base_model: BaseModelConfig
    data: DataConfig
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig
    scaling: ScalingConfig = Field(default_factory=ScalingConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    promotion: PromotionPolicy = Field(default_factory=PromotionPolicy)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    notifications: NotificationsConfig = Field(default_factory=NotificationsConfig)
    retention: RetentionConfig = Field(default_factory=RetentionConfig)
    remedy: RemedyConfig = Field(default_factory=RemedyConfig)
    replay: ReplayConfig = Field(default_factory=ReplayConfig)

    def cross_field_problems(self) -> list[Problem]:
        return [*self._check_task(), *self._check_hardware(), *self._check_generation(), *self._check_method(),
                *self._check_launcher(), *self._check_packing(), *self._check_remedies()]

    def _check_task(self) -> Iterator[Problem]:
        if self.task == "sequence_classification":
            if not self.data.labels or len(self.data.labels) < 2:
                yield "task", "sequence_classification needs data.labels with at least two labels"
            elif len(set(map(str, self.data.labels))) != len(self.data.labels):
                yield "data.labels", "has duplicates"

    def _check_hardware(self) -> Iterator[Problem]:
        if self.base_model.quantization and not self.scaling.use_gpu:
            yield "base_model.quantization", "4bit runs on CUDA GPUs only: set scaling.use_gpu: true, or drop it"
        if self.base_model.quantization and self.scaling.strategy == "fsdp":
            yield "base_model.quantization", "4bit and scaling.strategy: fsdp do not go together here: use ddp with 4bit"

    def _check_generation(self) -> Iterator[Problem]:
        if self.evaluation.generation and (self.task != "causal_lm" or self.data.prompt_column is None):
            yield "evaluation.generation", "needs task causal_lm with prompt_column and completion_column"
        gen = self.evaluation.generation
        if gen and gen.required_fields and gen.metric != "json":
            yield "evaluation.generation.required_fields", "needs metric: json (answers that are JSON objects)"
        ref = self.evaluation.reference
        if ref is not None and self.task != "causal_lm" and (ref.probes or ref.benchmarks):
            yield "evaluation.reference", ("probes and benchmarks score generations and choices: causal_lm only "
                                           "(a classifier is compared on a corpus, path)")

    def _check_method(self) -> Iterator[Problem]:
        if self.training.method == "full" and self.base_model.quantization:
            yield "training.method", "full trains every weight and cannot train a 4-bit base: drop base_model.quantization"

    def _check_remedies(self) -> Iterator[Problem]:
        if self.remedy.strategy != "none" and self.training.method != "lora":
            yield "remedy.strategy", f"{self.remedy.strategy} scales a LoRA adapter's update: it needs training.method: lora"
        if self.remedy.strategy == "search" and self.data.loader == "ray_data":
            yield "remedy.strategy", "search trains its trials on rows held in memory: set data.loader: memory or auto"
        shares = self.remedy.search_space.replay_share or []
        if self.remedy.strategy == "search" and any(shares) and self.task != "causal_lm":
            yield "remedy.search_space.replay_share", "replay needs task: causal_lm; leave replay out of the search"
        if any(s > 0.5 for s in shares):
            yield "remedy.search_space.replay_share", f"each share must be at most 0.5 (as replay.share), got {shares}"
        if self.replay.share and self.task != "causal_lm":
            yield "replay.share", "replay mixes general text into causal LM training: it needs task: causal_lm (or share 0)"
        if self.replay.share and self.replay.source == "self" and not self.data.prompt_column:
            yield "replay.source", ("self trains on prompt/answer pairs: it needs data.prompt_column and completion_column "
                                    "(or replay.source: corpus)")
        if self.replay.kl_weight and (self.training.method != "lora" or self.scaling.strategy == "fsdp"):
            yield "replay.kl_weight", ("the KL penalty reads the base by disabling the LoRA adapter on each worker: it needs "
                                       "training.method: lora and scaling.strategy: ddp (or kl_weight 0)")
        if self.replay.share and self.data.loader == "ray_data":
            yield "replay.share", "replay is mixed into training rows held in memory: set data.loader: memory or auto, or share 0"

    def _check_launcher(self) -> Iterator[Problem]:
        if self.scaling.launcher == "local" and self.why_not_in_process(streaming=self.data.loader == "ray_data"):
            yield "scaling.launcher", ("local trains one worker in this process: it needs scaling.num_workers: 1, "
                                       "no scaling.address, a local scaling.storage_path and data.loader other than "
                                       "ray_data; set scaling.launcher: ray (or auto)")

    def _check_packing(self) -> Iterator[Problem]:
        if self.training.packing and self.task != "causal_lm":
            yield "training.packing", "packs causal LM examples; a classifier reads one example per row: drop it"

    def why_not_in_process(self, streaming: bool = False) -> str | None:
        """Why training cannot run in the flow's own process (`scaling.launcher: local`), or None."""
        s = self.scaling
        if s.num_workers != 1:
            return f"scaling.num_workers is {s.num_workers}"
        if s.address:
            return f"a Ray cluster is set (scaling.address or RAY_ADDRESS: {s.address})"
        if "://" in s.storage_path:
            return f"checkpoints go to {s.storage_path}, which Ray Train writes"
        if streaming:
            return "the train data streams through Ray Data (data.loader)"
        return None

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.model_name

    def config_hash(self) -> str:
        """sha256 of the canonical JSON of this config: equal configs give equal hashes. The
        operational sections (`notifications`, `retention`) are left out: changing where alerts go
        or how much is kept does not make a new model, so a scheduled run still skips."""
        return config_digest(self.model_dump(mode="json", exclude={"notifications", "retention"}))

    def training_hash(self) -> str:
        """sha256 of the settings that decide the trained weights (task, base model, data, LoRA,
        training, worker count), not of where it runs, how it is evaluated or gated, or where
        results go. A run is identified by this hash and the data's fingerprint."""
        d = self.model_dump(mode="json", include={"task", "base_model", "data", "lora", "training", "replay"})
        d["num_workers"], d["strategy"] = self.scaling.num_workers, self.scaling.strategy
        return config_digest(d)


def config_from_dict(raw: Any, source: str = "config", overrides: list[str] | None = None) -> PipelineConfig:
    """Validate a raw mapping (plus overrides) into a PipelineConfig, raising one ConfigError."""
    if not isinstance(raw, dict):
        raise ConfigError([f"top level must be a mapping of sections, got {type(raw).__name__}"], source)
    raw = apply_overrides(raw, overrides, source)
    cross_field: list[str] = []  # filled by every section whose fields validated (`_check_cross_fields`)
    try:
        cfg = PipelineConfig.model_validate(raw, context={COLLECT_PROBLEMS: cross_field})
    except ValidationError as exc:
        raise ConfigError([format_error(e, PipelineConfig) for e in exc.errors()] + cross_field, source) from None
    if cross_field:
        raise ConfigError(cross_field, source)
    return resolve_paths(cfg, source)


def load_config(path: str | os.PathLike, overrides: list[str] | None = None) -> PipelineConfig:
    """Load and validate a YAML config file; `overrides` are `key.path=value` strings."""
    p = Path(path)
    try:
        if not p.is_file():
            raise ConfigError([f"no such file: {p} (give the path to a YAML config, e.g. configs/tiny.yaml)"], str(p))
        raw = read_yaml(p, str(p))
    except OSError as exc:  # unreadable, or a name too long for the file system
        raise ConfigError([f"cannot read it ({exc.strerror or exc}): give the path to a YAML config"], str(p)) from None
    return config_from_dict(raw if raw is not None else {}, source=str(p), overrides=overrides)
