"""MLflow metric names: flat in the code, grouped by `/` in MLflow, and back."""

from __future__ import annotations

import pytest

from lora_tasks.tracking import flat_name, metric_key

GROUPED = {
    "train_loss": "train/loss", "learning_rate": "train/learning_rate", "train_tokens_per_s": "train/tokens_per_s",
    "train_rows": "train/rows", "eval_rows": "eval/rows", "eval_forgetting_seconds": "time/eval_forgetting_seconds",
    "train_loop_seconds": "time/train_loop_seconds", "eval_seconds": "time/eval_seconds",
    "base_exact_match": "eval/base/exact_match", "adapted_eval_loss": "eval/adapted/eval_loss",
    "champion_exact_match": "eval/champion/exact_match", "champion_reference_kl": "forgetting/champion/reference_kl",
    "reference_kl": "forgetting/reference_kl", "benchmark_quiz_accuracy_drop": "forgetting/benchmark_quiz_accuracy_drop",
    "self_retention_perplexity_ratio": "forgetting/self_retention_perplexity_ratio",
    "task_gain": "gate/task_gain", "champion_delta": "gate/champion_delta",
}


@pytest.mark.parametrize("flat,grouped", GROUPED.items())
def test_each_metric_lands_in_its_group_and_reads_back_flat(flat, grouped):
    assert metric_key(flat) == grouped
    assert flat_name(grouped) == flat


@pytest.mark.parametrize("name", ["system/cpu_utilization_percentage", "custom", "other/x"])
def test_names_of_others_pass_through(name):
    assert flat_name(name) == name and metric_key(name) == name


def test_runs_logged_before_the_grouping_read_the_same():
    assert flat_name("task_gain") == "task_gain" and flat_name("adapted_accuracy") == "adapted_accuracy"
