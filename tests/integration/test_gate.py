"""The gate on real adapters of the tiny Llama, trained in-process and scored by evaluate_adapter
with bootstrap intervals: a destructive adapter is blocked for forgetting while a sound one passes;
a challenger worse than the champion on the same data is refused though it beats the base."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROWS = [json.loads(line) for line in (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text().splitlines()]


def tiny_cfg(**training):
    from prefect_lora.lora_tasks.config import config_from_dict

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    raw["training"].update(training)
    raw["scaling"]["num_workers"] = 1
    return config_from_dict(raw)


def train(cfg, rows, out: Path) -> str:
    from prefect_lora.lora_tasks.training.loop import WorkerContext, train_worker

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir:
            shutil.copytree(Path(checkpoint_dir) / "adapter", out, dirs_exist_ok=True)

    train_worker(cfg, rows, WorkerContext(report=keep))
    return str(out)


@pytest.fixture(scope="module")
def split():
    rows = ROWS[:]
    random.Random(0).shuffle(rows)
    return rows[:320], rows[320:]


@pytest.fixture(scope="module")
def sound(tmp_path_factory, split):
    return train(tiny_cfg(), split[0], tmp_path_factory.mktemp("sound") / "adapter")


@pytest.fixture(scope="module")
def destructive(tmp_path_factory, split):
    """Trained to destroy: language modelling of scrambled symbols at 10x the learning rate, with
    the output layer adapted too (the tiny model's frozen head keeps its logits near uniform)."""
    rng = random.Random(1)
    noise = [{"text": "".join(rng.choice("qzxjkvwy#@%&") for _ in range(60))} for _ in split[0]]
    wreck = tiny_cfg(learning_rate=3e-2, max_steps=80)
    modules = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj", "lm_head"]
    wreck = wreck.model_copy(update={
        "data": wreck.data.model_copy(update={"prompt_column": None, "completion_column": None}),
        "lora": wreck.lora.model_copy(update={"target_modules": modules}),
    })
    return train(wreck, noise, tmp_path_factory.mktemp("destructive") / "adapter")


def decide(cfg, adapter, eval_rows, champion_dir=None, champion_version=None):
    from prefect_lora.lora_tasks.gate.promotion import Candidate, candidate_from_metrics, decide_promotion
    from prefect_lora.lora_tasks.measurement.evaluation import evaluate_adapter

    report = evaluate_adapter(cfg, adapter, eval_rows, champion_adapter_dir=champion_dir, champion_version=champion_version)
    flat = report.flat_metrics()
    candidate = candidate_from_metrics(flat, report.primary_metric, report.higher_is_better, report.forgetting, "2")
    champion = Candidate(report.primary_metric, False, None, flat.get(f"champion_{report.primary_metric}"), version="1") if champion_dir else None
    return report, decide_promotion(candidate, champion, cfg.promotion)


def test_destructive_adapter_is_blocked_for_forgetting_and_the_sound_one_passes(split, sound, destructive):
    eval_rows = split[1]
    cfg = tiny_cfg()
    report, decision = decide(cfg, sound, eval_rows)
    print(f"\nsound: {report.intervals}")
    assert decision.promote, decision.reasons

    report, decision = decide(cfg, destructive, eval_rows)
    print(f"destructive: {report.intervals}\n{decision.reasons}")
    assert not decision.promote
    assert {"reference_perplexity_ratio", "reference_kl"} & set(decision.failed_checks), decision.reasons
    assert any("forgetting" in r for r in decision.reasons)


def test_challenger_worse_than_the_champion_on_the_same_data_is_refused(tmp_path, split, sound):
    train_rows, eval_rows = split
    cfg = tiny_cfg()
    weaker = train(tiny_cfg(max_steps=12), train_rows, tmp_path / "weaker")
    report, decision = decide(cfg, weaker, eval_rows, champion_dir=sound, champion_version="1")
    print(f"\nweaker vs champion: {report.intervals}\n{decision.reasons}")
    assert report.task_gain > cfg.promotion.min_task_gain, "the weaker adapter still beats the base"
    assert report.champion is not None and report.champion["eval_loss"] < report.adapted["eval_loss"]
    assert not decision.promote and decision.failed_checks == ["champion"], decision.reasons
    # The champion scored here is the champion: the same numbers as scoring it alone.
    alone, _ = decide(cfg, sound, eval_rows)
    assert report.champion["eval_loss"] == pytest.approx(alone.adapted["eval_loss"], rel=1e-5)


def test_self_retention_alone_blocks_a_destructive_adapter(split, sound, destructive):
    """With the corpus limits off, the self-retention probes alone (the base's own greedy answers)
    refuse the destructive adapter with their own reason; the sound one passes.

    Multiple-choice benchmarks are gated by the same code (tests/unit/test_forgetting_sources.py);
    the random tiny model knows no answers, so no benchmark could show it forgetting one."""
    eval_rows, check = split[1], "self_retention_perplexity_ratio"
    cfg = tiny_cfg()
    cfg = cfg.model_copy(update={
        "evaluation": cfg.evaluation.model_copy(update={"reference": cfg.evaluation.reference.model_copy(
            update={"path": None, "probes": "general"})}),
        # The random base's greedy answers are arbitrary, and any training moves them: the sound
        # adapter's self-retention ratio is ~2.2 here (a real base keeps its own answers far
        # better), the destructive one's ~2800. The limit sits between, at 3.
        "promotion": cfg.promotion.model_copy(update={
            "max_perplexity_ratio": None, "max_kl": None, "max_retrieval_loss": None,
            "max_self_retention_ratio": 3.0}),
    })
    report, kept = decide(cfg, sound, eval_rows)
    print(f"\nsound: {check} {report.intervals.get(check)} -> {kept.reasons}")
    assert check in report.forgetting, report.forgetting
    assert not [k for k in report.forgetting if k.startswith("reference_")], "the probes' figures, once"
    assert kept.promote, kept.reasons
    report, decision = decide(cfg, destructive, eval_rows)
    print(f"destructive: {check} {report.intervals.get(check)} -> {decision.reasons}")
    assert not decision.promote
    assert check in decision.failed_checks, decision.reasons
    assert any(r.startswith(check) and "forgetting" in r for r in decision.reasons)
    assert not [r for r in decision.reasons if r.startswith("reference_")], "one reason a figure, under its own name"


# ----------------------------------------------------------------------------- a classifier's gate


def _xor_rows(n: int, seed: int) -> list[dict]:
    """Label 1 when the text says red or big but not both, among filler words: the frozen base's
    pooled embedding (a sum of what each word brings) gives a linear probe next to nothing, a
    classifier fine-tuned through LoRA learns it."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        red, big = rng.random() < 0.5, rng.random() < 0.5
        words = [rng.choice(["the", "a", "of", "and", "to", "in", "on", "it"]) for _ in range(6)]
        words += ["red" if red else "blue", "big" if big else "small"]
        rng.shuffle(words)
        rows.append({"text": " ".join(words), "label": int(red != big)})
    return rows


@pytest.fixture(scope="module")
def classifier_cfg(tmp_path_factory):
    from prefect_lora.lora_tasks.config import config_from_dict

    ref = tmp_path_factory.mktemp("ref") / "paragraphs.txt"
    rng = random.Random(3)
    # paragraphs that keep to their topic (a word of their own), so a sound encoder finds each one's continuation
    ref.write_text("".join(" ".join(["".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=7))] * 10) + "\n"
                           for _ in range(150)))
    return config_from_dict({  # the default promotion policy
        "model_name": "xor", "task": "sequence_classification", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x", "labels": [0, 1]}, "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
        "training": {"max_steps": 200, "learning_rate": 1e-3, "batch_size": 16, "max_seq_length": 48, "warmup_steps": 5},
        "scaling": {"num_workers": 1}, "evaluation": {"batch_size": 32, "reference": {"path": str(ref), "max_tokens": 100_000}},
    })


@pytest.mark.parametrize("labels", ["real", "shuffled"])
def test_a_classifier_is_gated_against_the_baseline_a_team_would_deploy(classifier_cfg, tmp_path, labels):
    from prefect_lora.lora_tasks.gate.promotion import candidate_from_metrics, decide_promotion
    from prefect_lora.lora_tasks.measurement.evaluation import evaluate_adapter, primary_metric

    train_rows, eval_rows = _xor_rows(800, 0), _xor_rows(300, 1)
    if labels == "shuffled":  # a useless adapter: it can learn the label prior and nothing else
        shuffled = random.Random(2).sample([r["label"] for r in train_rows], len(train_rows))
        train_rows = [{**r, "label": y} for r, y in zip(train_rows, shuffled)]
    adapter = train(classifier_cfg, train_rows, tmp_path / "adapter")
    report = evaluate_adapter(classifier_cfg, adapter, eval_rows, train_rows=train_rows)
    metric, higher = primary_metric(classifier_cfg)
    decision = decide_promotion(candidate_from_metrics(report.flat_metrics(), metric, higher, report.forgetting), None,
                                classifier_cfg.promotion)
    b = report.baseline
    assert report.base["accuracy"] == max(b["majority_accuracy"], b["probe_accuracy"]) < 0.65, b  # not the random head
    if labels == "real":
        assert report.adapted["accuracy"] > 0.9 and decision.promote, decision.reasons
    else:  # refused for its gain, not for forgetting
        assert not decision.promote and decision.failed_checks == ["task_gain"], decision.reasons
    assert report.intervals["reference_retrieval_loss"][2] <= classifier_cfg.promotion.max_retrieval_loss
