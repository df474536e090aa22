import math

import pytest
import torch

from lora_tasks.config import config_from_dict
from lora_tasks.evaluation import evaluate_adapter
from lora_tasks.stats import macro_f1


@pytest.mark.parametrize("y_true, y_pred, n, expected", [
    ([0, 1, 0, 1], [0, 1, 0, 1], 2, 1.0),
    ([0, 0, 0, 0], [1, 1, 1, 1], 2, 0.0),
    # class 0: tp=1 fp=1 fn=1 -> 0.5; class 1: tp=1 fp=1 fn=1 -> 0.5
    ([0, 0, 1, 1], [0, 1, 0, 1], 2, 0.5),
    # class 2 never appears in truth or prediction: skipped, not counted as 0
    ([0, 1], [0, 1], 3, 1.0),
])
def test_macro_f1(y_true, y_pred, n, expected):
    assert macro_f1(y_true, y_pred, n) == pytest.approx(expected)


def _cfg(task, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("General text about rivers and bridges.\nAnother line of ordinary prose.\n" * 5)
    data = ({"prompt_column": "prompt", "completion_column": "completion"} if task == "causal_lm"
            else {"labels": ["a", "b"]})
    return config_from_dict({
        "model_name": "t", "task": task, "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x", **data}, "training": {"max_steps": 1, "max_seq_length": 32},
        "evaluation": {"reference": {"path": str(ref), "max_tokens": 200}, "batch_size": 4},
    })


def _fresh_adapter(cfg, folder):
    """A LoRA adapter as initialised (B = 0): the adapted model equals its base exactly."""
    from lora_tasks.modeling import apply_lora, load_base_model

    torch.manual_seed(cfg.training.seed)
    base = load_base_model(cfg.base_model.name_or_path, cfg.task, num_labels=2 if cfg.data.labels else None, pad_token_id=0)
    model = apply_lora(base, cfg.task, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    model.save_pretrained(folder)
    return str(folder)


def test_untrained_adapter_equals_base_and_forgets_nothing(tiny_model_dir, tmp_path):
    cfg = _cfg("causal_lm", tmp_path)
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(10)]
    report = evaluate_adapter(cfg, _fresh_adapter(cfg, tmp_path / "ad"), rows)
    assert report.adapted["eval_loss"] == pytest.approx(report.base["eval_loss"], abs=1e-6)
    assert report.task_gain == pytest.approx(0.0, abs=1e-6)
    assert report.forgetting["reference_perplexity_ratio"] == pytest.approx(1.0, abs=1e-6)
    assert report.forgetting["reference_kl"] == pytest.approx(0.0, abs=1e-6)
    assert report.base["perplexity"] == pytest.approx(math.exp(report.base["eval_loss"]))
    assert report.eval_rows == 10 and report.forgetting["reference_tokens"] > 100


def test_classifier_report_has_accuracy_f1_and_drift(tiny_model_dir, tmp_path):
    cfg = _cfg("sequence_classification", tmp_path)
    rows = [{"text": f"item {i}", "label": "a" if i % 2 else "b"} for i in range(12)]
    report = evaluate_adapter(cfg, _fresh_adapter(cfg, tmp_path / "ad"), rows)
    assert report.primary_metric == "accuracy" and report.higher_is_better
    assert 0.0 <= report.adapted["accuracy"] <= 1.0 and 0.0 <= report.adapted["macro_f1"] <= 1.0
    assert report.adapted["accuracy"] == pytest.approx(report.base["accuracy"])  # same head, B = 0
    assert report.forgetting["reference_representation_drift"] == pytest.approx(0.0, abs=1e-5)


def test_probe_reference_uses_given_base_description(tiny_model_dir, tmp_path, monkeypatch):
    from lora_tasks import probes
    from lora_tasks.modeling import describe_base_model

    monkeypatch.setattr(probes, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(probes, "GENERAL_PROBES", probes.GENERAL_PROBES[:3])
    cfg = _cfg("causal_lm", tmp_path)
    cfg.evaluation.reference = type(cfg.evaluation.reference)(probes="general")
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(4)]
    info = describe_base_model(cfg.base_model.name_or_path)
    report = evaluate_adapter(cfg, _fresh_adapter(cfg, tmp_path / "ad"), rows, base_info=info)
    assert report.forgetting["reference_kl"] == pytest.approx(0.0, abs=1e-6)
    assert list((tmp_path / "probes").glob(f"{info.content_hash[:16]}-*.jsonl"))
