"""MLflow metric names: flat in the code, grouped by `/` in MLflow, and back."""

from __future__ import annotations

import pytest
from prefect_lora.lora_tasks.registry.tracking import flat_name, metric_key

BEFORE = {  # how runs logged before the headline names grouped each figure: they read back the same
    "train_loss": "train/loss", "learning_rate": "train/learning_rate", "train_tokens_per_s": "train/tokens_per_s",
    "train_rows": "train/rows", "eval_rows": "eval/rows", "eval_forgetting_seconds": "time/eval_forgetting_seconds",
    "train_loop_seconds": "time/train_loop_seconds", "eval_seconds": "time/eval_seconds",
    "base_exact_match": "eval/base/exact_match", "adapted_eval_loss": "eval/adapted/eval_loss",
    "champion_exact_match": "eval/champion/exact_match", "champion_reference_kl": "forgetting/champion/reference_kl",
    "reference_kl": "forgetting/reference_kl", "benchmark_quiz_accuracy_drop": "forgetting/benchmark_quiz_accuracy_drop",
    "self_retention_perplexity_ratio": "forgetting/self_retention_perplexity_ratio",
    "task_gain": "gate/task_gain", "champion_delta": "gate/champion_delta",
}


@pytest.mark.parametrize("flat,grouped", BEFORE.items())
def test_runs_logged_before_read_back_under_flat_names(flat, grouped):
    assert flat_name(grouped) == flat


def test_the_curve_is_the_first_section_and_its_loss_the_first_chart():
    """MLflow lists the sections of `/` prefixes first, then unprefixed metrics, each sorted by name."""
    assert (metric_key("train_loss"), metric_key("learning_rate")) == ("train/loss", "train/lr")
    assert min(metric_key("learning_rate"), metric_key("train_loss")) == "train/loss"
    assert flat_name("train/loss") == "train_loss" and flat_name("train/lr") == "learning_rate"


@pytest.mark.parametrize("name", ["task_gain", "adapted_exact_match", "self_retention_kl", "champion_delta"])
def test_headline_figures_keep_their_flat_names(name):
    assert metric_key(name) == name and flat_name(name) == name


@pytest.mark.parametrize("name", ["system/cpu_utilization_percentage", "custom", "other/x"])
def test_names_of_others_pass_through(name):
    assert flat_name(name) == name and metric_key(name) == name


def test_the_training_curve_is_logged_in_batches_and_nothing_is_left_behind(monkeypatch):
    from prefect_lora.lora_tasks.registry import tracking

    writes: list[list] = []
    monkeypatch.setattr(tracking.MlflowClient, "log_batch", lambda self, run_id, metrics: writes.append(list(metrics)))
    log = tracking.MetricLogger("sqlite:///unused.db", "run", every_s=60, background=False)
    for step in range(1, 11):
        log({"train_loss": 1.0 / step, "learning_rate": 0.1, "note": "skipped: not a number"}, step)
    assert writes == [], "within every_s: nothing written yet"
    log.flush()
    (batch,) = writes
    assert [(m.key, m.step) for m in batch[:2]] == [("train/loss", 1), ("train/lr", 1)] and len(batch) == 20
    log.flush()
    assert len(writes) == 1, "a flush with nothing pending writes nothing"
    each = tracking.MetricLogger("sqlite:///unused.db", "run", every_s=0, background=False)
    each({"train_loss": 0.5}, 1)
    each({"train_loss": 0.4}, 2)
    assert [len(w) for w in writes[1:]] == [1, 1]
