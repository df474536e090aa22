"""Power before the run (lora_tasks/measurement/power.py): what each check can show at the configured sizes,
checked against the gate's own bootstrap on simulated scores."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from prefect_lora.lora_tasks.config import config_from_dict
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.measurement import power, stats
from prefect_lora.lora_tasks.measurement.stats import check_outcome


def _benchmark(tmp_path: Path, questions: int) -> str:
    path = tmp_path / "mc.jsonl"
    path.write_text("".join(json.dumps({"question": f"q{i}?", "choices": ["a", "b"], "answer": 0}) + "\n"
                            for i in range(questions)))
    return str(path)


def _cfg(tmp_path: Path, questions: int = 40, remedy: dict | None = None, **promotion):
    return config_from_dict({"remedy": remedy or {},
        "model_name": "t", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": str(tmp_path / "train.jsonl"), "prompt_column": "p", "completion_column": "c"},
        "training": {"max_steps": 1},
        "evaluation": {"reference": {"probes": "general", "benchmarks": [_benchmark(tmp_path, questions)]}},
        "promotion": promotion})


@pytest.fixture(autouse=True)
def _own_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_LORA_CACHE", str(tmp_path / "cache"))


def _check(checks, prefix):
    return next(p for p in checks if p.check.startswith(prefix))


def test_a_40_question_benchmark_cannot_show_a_005_drop_and_says_what_would(tmp_path):
    cfg = _cfg(tmp_path, 40)
    bench = _check(power.plan(cfg, eval_rows=100), "benchmark_")
    assert (bench.size, bench.unit, bench.limit) == (40, "benchmark questions", 0.05)
    assert bench.verdict(0.95) == "cannot" and bench.power_if_harmless(0.95) < 0.5
    # (z_.975 + z_.8)^2 * q / limit^2 with q = 0.15 questions changed: ~471
    assert bench.needed(0.95) == math.ceil(((1.959964 + 0.841621) ** 2) * 0.15 / 0.05 ** 2)
    with pytest.raises(ConfigError) as err:
        power.enforce(cfg, power.plan(cfg, 100))
    assert "benchmark_mc_accuracy_drop: 40 benchmark questions" in str(err.value)
    assert "about 471 benchmark questions would show the limit" in str(err.value)
    assert "underpowered: warn" in str(err.value)
    warned = _cfg(tmp_path, 40, underpowered="warn")
    assert len(power.enforce(warned, power.plan(warned, 100))) == 1  # a warning, no error


def test_enough_questions_pass_and_every_check_has_a_line(tmp_path):
    cfg = _cfg(tmp_path, 600)
    checks = power.plan(cfg, eval_rows=100)
    # no corpus: the probes stand in for it, each figure checked once (their KL under max_kl)
    assert {p.check for p in checks} == {"task_gain", "self_retention_perplexity_ratio", "self_retention_kl",
                                         "benchmark_mc_accuracy_drop", "champion"}
    assert _check(checks, "self_retention_kl").limit == cfg.promotion.max_kl
    assert _check(checks, "benchmark_").verdict(0.95) == "ok" and power.enforce(cfg, checks) == []
    lines = power.report(cfg, checks)
    assert len(lines) == 1 + len(checks) and all("spread assumed" in line for line in lines[1:])
    gain = _check(checks, "task_gain")  # min_task_gain + (z + z_0.8) * sd / sqrt(n)
    assert gain.smallest_shown(0.95) == pytest.approx(0.0 + 2.8016 * 0.5 / 10, rel=1e-3)
    saved = tmp_path / "power.json"
    power.save(cfg, checks, saved)
    rows = json.loads(saved.read_text())["checks"]
    assert [r["check"] for r in rows] == [p.check for p in checks] and rows[0]["needed"] is None


def test_a_disabled_limit_has_no_check(tmp_path):
    checks = power.plan(_cfg(tmp_path, 40, max_benchmark_accuracy_drop=None, beat_champion=False), 100)
    assert not any(p.check.startswith(("benchmark_", "champion")) for p in checks)


def test_the_next_run_plans_with_the_spread_this_one_measured(tmp_path):
    cfg = _cfg(tmp_path, 600)
    # a run's interval of the drop: half-width 0.02 on 600 questions -> sd = 0.02 / 1.96 * sqrt(600)
    power.remember(cfg, 100, {"benchmark_mc_accuracy_drop": [0.0, -0.02, 0.02], "task_gain": [0.3, 0.2, 0.4]}, "run12345abc")
    checks = power.plan(cfg, 100)
    bench = _check(checks, "benchmark_")
    assert bench.measured == "run12345abc" and bench.sd == pytest.approx(0.02 / 1.959964 * math.sqrt(600), rel=1e-4)
    assert "spread measured in this model's run run12345" in bench.describe(0.95)
    assert _check(checks, "task_gain").sd == pytest.approx(0.1 / 1.959964 * 10, rel=1e-4)
    assert _check(checks, "self_retention").measured is None  # not in that run's intervals: still assumed


def test_a_destructive_runs_spread_warns_but_does_not_stop_the_next_run(tmp_path):
    cfg = _cfg(tmp_path, 600)
    power.remember(cfg, 100, {"benchmark_mc_accuracy_drop": [0.4, 0.3, 0.5]}, "destroyed")
    checks = power.plan(cfg, 100)
    assert _check(checks, "benchmark_").verdict(0.95) == "cannot"
    assert len(power.enforce(cfg, checks)) == 1  # the assumed spread can show it: a warning, not an error


@pytest.mark.parametrize("questions", [40, 150, 400])
def test_predicted_power_matches_the_gates_own_bootstrap(questions):
    """Simulated harmless adapters (15% of answers changed, no drop) through the gate's check:
    the share that passes is the predicted power (the normal approximation is rougher at 40
    questions, where a sample holds only ~6 changed answers, but on the same side of one half)."""
    predicted = power.CheckPower("benchmark_x_accuracy_drop", "benchmark questions", questions, 0.05, 0.0, True,
                                 math.sqrt(0.15)).power_if_harmless(0.95)
    rng = np.random.default_rng(questions)
    passed = []
    for seed in range(300):
        drop = rng.choice([1.0, -1.0, 0.0], size=questions, p=[0.075, 0.075, 0.85])
        ci = stats.paired_diff_ci(drop, np.zeros(questions), resamples=400, seed=seed)
        passed.append(check_outcome((ci.low, ci.high), 0.05, upper_is_worse=True) == "pass")
    observed = float(np.mean(passed))
    assert abs(observed - predicted) < (0.15 if questions < 100 else 0.07), (observed, predicted)
    assert (observed < 0.5) == (predicted < 0.5)


def test_with_a_remedy_the_plan_counts_the_confirm_part_the_gate_reads(tmp_path):
    cfg = _cfg(tmp_path, 600, remedy={"strategy": "scale", "confirm_fraction": 0.5})
    checks = power.plan(cfg, eval_rows=120)
    assert (_check(checks, "benchmark_").size, _check(checks, "task_gain").size) == (300, 60)
    assert "the gate reads the remedy's confirm part, 50% of the evidence" in power.report(cfg, checks)[0]
    # a run's confirm-part interval on 300 questions gives the spread per question
    power.remember(cfg, 120, {"benchmark_mc_accuracy_drop": [0.0, -0.02, 0.02]}, "r1", share=0.5)
    assert _check(power.plan(cfg, 120), "benchmark_").sd == pytest.approx(0.02 / 1.959964 * math.sqrt(300), rel=1e-4)


def test_max_probes_scores_a_spread_of_the_probes_and_the_plan_counts_them(tmp_path):
    from prefect_lora.lora_tasks.training.probes import GENERAL_PROBES, probe_prompts

    some = probe_prompts(60)
    assert len(some) == len(set(some)) == 60 and some[0] == GENERAL_PROBES[0]
    where = sorted(GENERAL_PROBES.index(p) for p in some)
    assert max(b - a for a, b in zip(where, where[1:])) <= 2 * 352 // 60  # spread over the list, not its first 60
    assert probe_prompts(100)[:60] == some, "a larger limit only adds probes"
    assert sorted(probe_prompts(None)) == sorted(GENERAL_PROBES) == sorted(probe_prompts(1000))
    cfg = config_from_dict({
        "model_name": "t", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": str(tmp_path / "t.jsonl"), "prompt_column": "p", "completion_column": "c"},
        "training": {"max_steps": 1}, "evaluation": {"reference": {"probes": "general", "max_probes": 60}}})
    assert _check(power.plan(cfg, 100), "self_retention").size == 60
