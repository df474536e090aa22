"""The classifier's fair baseline: majority class or linear probe, whichever a team would deploy."""

import numpy as np
import pytest
from prefect_lora.lora_tasks.measurement.baseline import (
    ClassifierBaseline,
    baseline_key,
    baseline_scores,
    choose_baseline,
    fit_baseline,
    fit_probe,
    load_baseline,
    majority_label,
    save_baseline,
)


def _blobs(n_per_class: int, classes: list[int], dim: int = 8, seed: int = 0, spread: float = 0.5):
    """Rows around one centre per class: a linear probe separates them."""
    centres = np.random.default_rng(0).normal(size=(3, dim)) * 3  # the same centres in every split
    rng = np.random.default_rng(seed)
    x = np.concatenate([centres[c] + spread * rng.normal(size=(n_per_class, dim)) for c in classes])
    y = np.repeat(classes, n_per_class)
    return x.astype(np.float32), y


@pytest.mark.parametrize("labels, num_labels, expected", [
    ([0, 1, 1, 1], 2, 1),
    ([2, 2, 0], 3, 2),
    ([0, 1, 1, 0], 2, 0),  # a tie goes to the label declared first
    ([1, 1, 1], 3, 1),  # a single-class split
])
def test_majority_label(labels, num_labels, expected):
    assert majority_label(np.array(labels), num_labels) == expected


@pytest.mark.parametrize("accuracy, expected", [
    ({"majority": 0.5, "probe": 0.8}, "probe"),
    ({"majority": 0.7, "probe": 0.6}, "majority"),
    ({"majority": 0.6, "probe": 0.6}, "majority"),  # a tie goes to the simpler baseline
    ({"majority": 0.6}, "majority"),  # no probe (a single-class train split)
])
def test_choose_baseline_takes_the_better_on_the_rows_and_the_simpler_on_a_tie(accuracy, expected):
    y = np.zeros(10, dtype=int)
    preds = {k: np.where(np.arange(10) < round(a * 10), 0, 1) for k, a in accuracy.items()}
    assert choose_baseline(y, preds) == expected


def test_a_separable_task_is_won_by_the_probe_and_the_gain_is_measured_from_it():
    x, y = _blobs(60, [0, 1, 2])
    base = fit_baseline(x, y, num_labels=3, seed=0)
    assert base.probe is not None and base.probe.c in (1e-3, 1e-2, 1e-1, 1.0)
    ex, ey = _blobs(20, [0, 1, 2], seed=1)
    metrics, units, summary = baseline_scores(base, ex, ey, 3)
    assert summary["kind"] == "probe" and summary["probe_accuracy"] > 0.9
    assert summary["majority_accuracy"] == pytest.approx(1 / 3)
    assert metrics["accuracy"] == summary["probe_accuracy"] and units["accuracy"].mean() == metrics["accuracy"]
    assert list(units["y_pred"]) == list(base.probe.predict(ex))


def test_a_probe_no_better_than_the_prior_leaves_the_majority_as_baseline():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(200, 6)).astype(np.float32)  # features that say nothing of the label
    y = (rng.random(200) < 0.8).astype(int)  # 80% positive
    base = fit_baseline(x, y, num_labels=2, seed=0)
    ex = rng.normal(size=(100, 6)).astype(np.float32)
    ey = np.ones(100, dtype=int)
    _, _, summary = baseline_scores(base, ex, ey, 2)
    assert summary["majority_accuracy"] == 1.0 and summary["kind"] == "majority"


def test_a_single_class_train_split_has_no_probe_and_says_why():
    x, y = _blobs(30, [1])
    base = fit_baseline(x, y, num_labels=2, seed=0)
    assert base.probe is None and base.majority == 1 and "one label" in base.note
    metrics, _, summary = baseline_scores(base, x[:4], np.array([1, 1, 0, 1]), 2)
    assert summary["kind"] == "majority" and metrics["accuracy"] == 0.75 and "probe_accuracy" not in summary


def test_a_label_absent_from_the_eval_rows_scores_without_error():
    x, y = _blobs(40, [0, 1, 2])
    base = fit_baseline(x, y, num_labels=3, seed=0)
    ex, ey = _blobs(10, [0, 1], seed=2)  # label 2 never appears in eval
    metrics, _, summary = baseline_scores(base, ex, ey, 3)
    assert 0.0 <= metrics["macro_f1"] <= 1.0 and summary["majority_accuracy"] in (0.0, 0.5)


def test_a_label_with_one_train_row_still_fits_a_probe():
    x, y = _blobs(20, [0, 1])
    x = np.concatenate([x, _blobs(1, [2], seed=5)[0]])
    y = np.concatenate([y, [2]])
    probe = fit_probe(x, y, seed=0)
    assert probe is not None and list(probe.classes) == [0, 1, 2]


def test_the_probe_is_seeded():
    x, y = _blobs(50, [0, 1], spread=3.0)
    a, b = fit_probe(x, y, seed=7), fit_probe(x, y, seed=7)
    assert np.array_equal(a.coef, b.coef) and a.c == b.c


def test_a_kept_baseline_reads_back_the_same_predictions(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_LORA_CACHE", str(tmp_path))
    x, y = _blobs(30, [0, 1, 2])
    base = fit_baseline(x, y, num_labels=3, seed=0)
    key = baseline_key("model-a", {"max_seq_length": 64}, ["t"] * len(y), y.tolist())
    assert load_baseline(key) is None
    save_baseline(key, base)
    back = load_baseline(key)
    assert isinstance(back, ClassifierBaseline) and back.majority == base.majority and back.train_rows == 90
    assert np.array_equal(back.probe.predict(x), base.probe.predict(x))
    assert baseline_key("model-b", {"max_seq_length": 64}, ["t"] * len(y), y.tolist()) != key
    single = fit_baseline(x[:5], np.zeros(5, dtype=int), num_labels=3, seed=0)
    save_baseline("k2" * 16, single)
    assert load_baseline("k2" * 16).probe is None and load_baseline("k2" * 16).note == single.note
