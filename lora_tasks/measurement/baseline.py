"""What a team would deploy without the adapter, for a classifier: the gate's base row.

A classifier's base model has no head for the task: its freshly initialised head is a random
guess, and against it any training that learns the label prior looks like a gain. The fair
baseline is what the base does on the task without an adapter: the better, on the eval rows, of
the train split's majority class and a linear probe (an L2-regularised logistic regression) on
the frozen base's pooled embeddings of the train rows. The probe is kept on disk per base and
train rows, so a repeated or skipped run pays nothing for it."""

from __future__ import annotations

import hashlib
import io
import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import LoraTaskError
from ..modeling import cache_dir, write_cache_file
from ..training.encoding import encode_examples
from . import stats
from .embeddings import kept_embeddings

KINDS = ("majority", "probe")
"""The baselines, simplest first: a tie on the eval rows goes to the simpler."""

PROBE_C = (1e-3, 1e-2, 1e-1, 1.0)
"""Inverse L2 strengths the probe chooses from by cross-validation on the train rows."""


@dataclass(frozen=True)
class LinearProbe:
    """A multinomial (or binary) logistic regression on standardised embeddings, as plain arrays."""

    classes: np.ndarray
    """Label indices seen in the train rows, in the order of the coefficients."""
    mean: np.ndarray
    scale: np.ndarray
    coef: np.ndarray
    intercept: np.ndarray
    c: float
    """The inverse regularisation strength chosen by cross-validation."""

    def predict(self, features: np.ndarray) -> np.ndarray:
        scores = ((features - self.mean) / self.scale) @ self.coef.T + self.intercept
        if scores.shape[1] == 1:  # binary: one column, positive means the second class
            return self.classes[(scores[:, 0] > 0).astype(int)]
        return self.classes[scores.argmax(1)]


@dataclass(frozen=True)
class ClassifierBaseline:
    """The majority class of the train rows and, when it could be fit, the linear probe."""

    majority: int
    probe: LinearProbe | None
    train_rows: int
    note: str = ""
    """Why there is no probe (a single-class train split), empty otherwise."""

    def predictions(self, features: np.ndarray) -> dict[str, np.ndarray]:
        """Each baseline's predicted label index per row of `features`."""
        out = {"majority": np.full(len(features), self.majority)}
        if self.probe is not None:
            out["probe"] = self.probe.predict(features)
        return out


def majority_label(labels: np.ndarray, num_labels: int) -> int:
    """The most frequent label index; a tie goes to the label declared first."""
    return int(np.bincount(np.asarray(labels, dtype=int), minlength=num_labels).argmax())


def fit_probe(features: np.ndarray, labels: np.ndarray, seed: int) -> LinearProbe | None:
    """A logistic regression on standardised `features`, its L2 strength chosen from `PROBE_C` by
    stratified cross-validation (seeded); None when the rows hold fewer than two labels."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression, LogisticRegressionCV

    labels = np.asarray(labels, dtype=int)
    classes, counts = np.unique(labels, return_counts=True)
    if len(classes) < 2:
        return None
    mean, scale = features.mean(0), features.std(0)
    scale = np.where(scale > 1e-8, scale, 1.0)
    x = (features - mean) / scale
    folds = int(min(3, counts.min()))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        if folds >= 2:
            model = LogisticRegressionCV(Cs=list(PROBE_C), cv=folds, max_iter=1000, random_state=seed).fit(x, labels)
            c = float(np.atleast_1d(model.C_)[0])
        else:  # a label with one row: nothing to cross-validate on
            c = PROBE_C[-1]
            model = LogisticRegression(C=c, max_iter=1000, random_state=seed).fit(x, labels)
    return LinearProbe(model.classes_.astype(int), mean, scale, np.atleast_2d(model.coef_), np.atleast_1d(model.intercept_), c)


def fit_baseline(features: np.ndarray, labels: np.ndarray, num_labels: int, seed: int) -> ClassifierBaseline:
    """The majority class and the linear probe of the train rows' embeddings and label indices."""
    probe = fit_probe(features, labels, seed)
    note = "" if probe is not None else f"the train rows hold one label only ({majority_label(labels, num_labels)}): no probe"
    return ClassifierBaseline(majority_label(labels, num_labels), probe, len(labels), note)


def choose_baseline(y_true: np.ndarray, predictions: dict[str, np.ndarray]) -> str:
    """The baseline of higher accuracy on these rows; a tie goes to the simpler (`KINDS` order)."""
    accuracy = {k: float(np.mean(predictions[k] == y_true)) if len(y_true) else 0.0 for k in KINDS if k in predictions}
    return max(accuracy, key=lambda k: (accuracy[k], -KINDS.index(k)))


def baseline_scores(baseline: ClassifierBaseline, features: np.ndarray, y_true: np.ndarray, num_labels: int,
                    kind: str | None = None) -> tuple[dict, dict, dict]:
    """(metrics, per-row units, summary) of the baseline `kind` (default: the better on these rows,
    `choose_baseline`) on rows with these embeddings and true label indices, as
    `evaluation.classification_scores` gives a model's; the summary names the choice and every
    baseline's accuracy and macro-F1, side by side. A remedy chooses on its search part and keeps
    that choice on the confirm part, which the gate reads."""
    predictions = baseline.predictions(features)
    kind = kind if kind in predictions else choose_baseline(y_true, predictions)
    summary = {"kind": kind, "train_rows": baseline.train_rows, "majority_label": baseline.majority,
               **({"note": baseline.note} if baseline.note else {}),
               **({"probe_c": baseline.probe.c} if baseline.probe is not None else {})}
    for k, pred in predictions.items():
        summary[f"{k}_accuracy"] = float(np.mean(pred == y_true)) if len(y_true) else 0.0
        summary[f"{k}_macro_f1"] = stats.macro_f1(y_true.tolist(), pred.tolist(), num_labels)
    pred = predictions[kind]
    correct = (pred == y_true).astype(float)
    metrics = {"accuracy": summary[f"{kind}_accuracy"], "macro_f1": summary[f"{kind}_macro_f1"]}
    return metrics, {"accuracy": correct, "y_true": y_true, "y_pred": pred}, summary


# ----------------------------------------------------------------------------- kept on disk


def baseline_key(model_identity: str, settings: dict, texts: list[str], labels: list[int]) -> str:
    """The identity of a fitted baseline: the base as it embeds, the settings that change an
    embedding (sequence length), and the train rows."""
    blob = json.dumps({"model": model_identity, "settings": settings, "texts": texts, "labels": labels,
                       "probe_c": PROBE_C}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()


def load_baseline(key: str) -> ClassifierBaseline | None:
    """The baseline kept under `key`, or None (never kept, or unreadable: fit again)."""
    try:
        with np.load(_path(key), allow_pickle=False) as z:
            d = {k: z[k] for k in z.files}
    except (OSError, ValueError, KeyError):
        return None
    probe = None
    if "classes" in d:
        probe = LinearProbe(d["classes"], d["mean"], d["scale"], d["coef"], d["intercept"], float(d["c"]))
    return ClassifierBaseline(int(d["majority"]), probe, int(d["train_rows"]), str(d["note"]))


def save_baseline(key: str, baseline: ClassifierBaseline) -> None:
    """Keep `baseline` under `key` as plain arrays (no pickle), atomically."""
    arrays = {"majority": np.array(baseline.majority), "train_rows": np.array(baseline.train_rows),
              "note": np.array(baseline.note)}
    p = baseline.probe
    if p is not None:
        arrays.update(classes=p.classes, mean=p.mean, scale=p.scale, coef=p.coef, intercept=p.intercept, c=np.array(p.c))
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    write_cache_file(_path(key), lambda f: f.write(buf.getvalue()))


def _path(key: str) -> Path:
    return cache_dir() / "baselines" / f"{key[:32]}.npz"


def fitted_baseline(cfg, model, tokenizer, train_rows: list[dict], identity: str | None, device="cpu") -> ClassifierBaseline:
    """The baseline of `cfg`'s train rows (a seeded sample of `evaluation.baseline_rows`) on the
    frozen base `model`: read back when kept, else embedded, fit and kept (when the base has an
    `identity`, see `score_cache.model_identity`). Rows embedded for an earlier train split are
    read back, so a split that grew pays only for its new rows (`kept_embeddings`)."""
    if not train_rows:
        raise LoraTaskError("a classifier's baseline (majority class, linear probe) is fit on the train rows: none given")
    limit, seed = cfg.evaluation.baseline_rows, cfg.training.seed
    if limit and len(train_rows) > limit:
        keep = np.sort(np.random.default_rng(seed).choice(len(train_rows), limit, replace=False))
        train_rows = [train_rows[i] for i in keep]
    examples = encode_examples(train_rows, tokenizer, cfg)
    texts, labels = [str(r[cfg.data.text_column]) for r in train_rows], [e["labels"] for e in examples]
    settings = {"max_seq_length": cfg.training.max_seq_length, "batch_size": cfg.evaluation.batch_size, "seed": seed}
    key = baseline_key(identity, settings, texts, labels) if identity else None
    if key and (kept := load_baseline(key)) is not None:
        return kept
    features = kept_embeddings(model, [e["input_ids"] for e in examples], tokenizer.pad_token_id or 0,
                               cfg.evaluation.batch_size, key and f"{identity}|{cfg.model_name}", device)
    baseline = fit_baseline(features, np.array(labels), len(cfg.data.labels), seed)
    if key:
        save_baseline(key, baseline)
    return baseline
