import math

import pytest
import torch
from prefect_lora.lora_tasks.config import GenerationEvalConfig, config_from_dict
from prefect_lora.lora_tasks.measurement.evaluation import evaluate_adapter
from prefect_lora.lora_tasks.measurement.stats import macro_f1


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
    from prefect_lora.lora_tasks.modeling import apply_lora, load_base_model

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


def test_classifier_report_reads_the_baseline_not_the_untrained_head(tiny_model_dir, tmp_path):
    cfg = _cfg("sequence_classification", tmp_path)
    words = ["harbour", "lantern", "meadow", "copper", "violin", "glacier", "orchard", "tunnel", "saddle", "pepper",
             "walnut", "thunder"]
    (tmp_path / "ref.txt").write_text("".join(" ".join([w] * 10) + "\n" for w in words))  # each line keeps to its word
    cfg.evaluation.reference.max_tokens = 5000  # every paragraph
    train = [{"text": f"item {i}", "label": "b" if i % 4 else "a"} for i in range(40)]  # 3 in 4 are b
    rows = [{"text": f"thing {i}", "label": "a" if i % 2 else "b"} for i in range(12)]
    report = evaluate_adapter(cfg, _fresh_adapter(cfg, tmp_path / "ad"), rows, train_rows=train)
    assert report.primary_metric == "accuracy" and report.higher_is_better
    b = report.baseline
    assert b["kind"] in ("majority", "probe") and b["majority_label"] == 1 and b["majority_accuracy"] == 0.5
    assert report.base["accuracy"] == max(b["majority_accuracy"], b["probe_accuracy"]) == b[f"{b['kind']}_accuracy"]
    assert 0.0 <= report.adapted["accuracy"] <= 1.0 and 0.0 <= report.adapted["macro_f1"] <= 1.0
    flat = report.flat_metrics()
    assert flat["baseline_majority_accuracy"] == 0.5 and flat["base_accuracy"] == report.base["accuracy"]
    # the adapter as initialised (B = 0) is the base encoder: it finds every continuation the base finds
    f = report.forgetting
    assert f["reference_retrieval_adapted"] == f["reference_retrieval_base"] and f["reference_retrieval_pairs"] == 12
    assert f["reference_retrieval_base"] > 0 and f["reference_retrieval_loss"] == 0.0


def test_probe_reference_uses_given_base_description(tiny_model_dir, tmp_path, monkeypatch):
    from prefect_lora.lora_tasks.training import probes
    from prefect_lora.lora_tasks.modeling import describe_base_model

    monkeypatch.setattr(probes, "cache_dir", lambda: tmp_path)
    monkeypatch.setattr(probes, "GENERAL_PROBES", probes.GENERAL_PROBES[:3])
    cfg = _cfg("causal_lm", tmp_path)
    cfg.evaluation.reference = type(cfg.evaluation.reference)(probes="general")
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(4)]
    info = describe_base_model(cfg.base_model.name_or_path)
    report = evaluate_adapter(cfg, _fresh_adapter(cfg, tmp_path / "ad"), rows, base_info=info)
    assert report.forgetting["self_retention_kl"] == pytest.approx(0.0, abs=1e-6)
    assert not [k for k in report.forgetting if k.startswith("reference_")], "the probes' figures are reported once"
    assert probes._cache_file(info.content_hash, 64).exists(), "the answers are kept under the given base's hash"


def _trained_like_adapter(cfg, folder, seed=0):
    """A LoRA adapter with random B (as after training): the adapted model differs from its base."""
    from prefect_lora.lora_tasks.modeling import apply_lora, load_base_model

    torch.manual_seed(seed)
    base = load_base_model(cfg.base_model.name_or_path, cfg.task, pad_token_id=0)
    model = apply_lora(base, cfg.task, r=4, alpha=8, dropout=0.0, target_modules="all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    model.save_pretrained(folder)
    return str(folder)


def test_a_scaled_adapter_is_evaluated_in_memory_as_it_is_written(tiny_model_dir, tmp_path):
    """Scaling LoRA's update in memory (the remedy's trials) and writing the scaled adapter (what
    gets registered and served) give the same model; a scale near 0 is the base."""
    from prefect_lora.lora_tasks.measurement.evaluation import Evaluation
    from prefect_lora.lora_tasks.modeling import write_scaled_adapter

    cfg = _cfg("causal_lm", tmp_path)
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(8)]
    adapter = _trained_like_adapter(cfg, tmp_path / "ad")
    ev = Evaluation(cfg, adapter)
    full, half, tiny = (ev.report(rows, scale=s) for s in (1.0, 0.5, 1e-6))
    assert full.adapted["eval_loss"] != pytest.approx(full.base["eval_loss"], abs=1e-3)
    assert tiny.adapted["eval_loss"] == pytest.approx(tiny.base["eval_loss"], abs=1e-4)
    assert tiny.forgetting["reference_kl"] < 1e-6 < half.forgetting["reference_kl"] < full.forgetting["reference_kl"]
    written = Evaluation(cfg, str(write_scaled_adapter(adapter, tmp_path / "half", 0.5))).report(rows)
    assert written.adapted["eval_loss"] == pytest.approx(half.adapted["eval_loss"], rel=1e-5)
    assert written.forgetting["reference_kl"] == pytest.approx(half.forgetting["reference_kl"], rel=1e-4)
    assert half.adapter_scale == 0.5 and written.adapter_scale == 1.0
    assert ev.report(rows, scale=1.0).adapted == full.adapted, "the view's scale is restored after each use"


def _remedy_cfg(tmp_path, max_kl):
    cfg = _cfg("causal_lm", tmp_path)
    raw = cfg.model_dump(mode="json")
    raw["evaluation"]["reference"]["max_tokens"] = 600
    raw["promotion"] = {"min_task_gain": -100.0, "max_perplexity_ratio": None, "max_kl": max_kl, "beat_champion": False}
    raw["remedy"] = {"strategy": "scale", "scales": [1.0, 0.6, 0.3, 0.1]}
    return config_from_dict(raw)


def test_the_scale_remedy_confirms_the_best_admissible_scale_on_held_out_evidence(tiny_model_dir, tmp_path):
    from prefect_lora.lora_tasks.gate.decide import apply_outcome
    from prefect_lora.lora_tasks.gate.promotion import Decision
    from prefect_lora.lora_tasks.gate.remedies import evaluate_remedies
    from prefect_lora.lora_tasks.measurement.evaluation import Evaluation

    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(24)]
    adapter = _trained_like_adapter(_cfg("causal_lm", tmp_path), tmp_path / "ad")
    kl_full = Evaluation(_cfg("causal_lm", tmp_path), adapter).report(rows).forgetting["reference_kl"]
    cfg = _remedy_cfg(tmp_path, max_kl=kl_full * 0.3)  # the adapter as trained forgets too much
    report = evaluate_remedies(Evaluation(cfg, adapter), rows)
    r = report.remedy
    assert r["needed"] and [t["name"] for t in r["trials"]] == ["scale=1", "scale=0.6", "scale=0.3", "scale=0.1"]
    assert not r["trials"][0]["admissible"] and "reference_kl" in r["trials"][0]["failed_checks"]
    admissible = [t for t in r["trials"] if t["admissible"]]
    assert admissible and r["chosen"] == admissible[0]["name"], "the largest admissible scale keeps the most gain here"
    assert report.evidence == "confirm" and report.adapter_scale == r["chosen_settings"]["scale"] < 1.0
    assert r["search_rows"] + r["confirm_rows"] == 24 and report.eval_rows == r["confirm_rows"]
    assert report.intervals["reference_kl"][2] < report.forgetting["reference_kl"] * 3
    ok = Decision(True, ["all checks passed"], [])
    assert apply_outcome(ok, r) is ok

    destructive = evaluate_remedies(Evaluation(_remedy_cfg(tmp_path, max_kl=1e-9), adapter), rows)
    assert destructive.remedy["chosen"] is None and destructive.remedy["closest"] == "scale=0.1"
    refused = apply_outcome(ok, destructive.remedy)
    assert not refused.promote and "remedy" in refused.failed_checks and "none of 4 trial(s)" in refused.reasons[-1]


def test_scores_are_reused_across_runs_and_todays_adapter_is_tomorrows_champion(tiny_model_dir, tmp_path, monkeypatch):
    """A second run on the same rows reads the base's and the champion's task scores (generated
    answers included) from the disk cache, to the same figures; other rows, another champion or
    another new adapter are scored afresh; and a new adapter, once it is the champion, is read
    back (same files, same scores) instead of scored again."""
    from prefect_lora.lora_tasks.measurement import evaluation, score_cache
    from prefect_lora.lora_tasks.modeling import describe_base_model

    monkeypatch.setattr(score_cache, "cache_dir", lambda: tmp_path / "cache")
    scored = []
    real = evaluation.task_scores
    monkeypatch.setattr(evaluation, "task_scores", lambda m, *a: scored.append(m) or real(m, *a))
    cfg = _cfg("causal_lm", tmp_path)
    cfg.evaluation.generation = GenerationEvalConfig(max_new_tokens=4)
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(6)]
    info = describe_base_model(cfg.base_model.name_or_path)
    champion = _trained_like_adapter(cfg, tmp_path / "champion")
    new, newer = _fresh_adapter(cfg, tmp_path / "new"), _trained_like_adapter(cfg, tmp_path / "newer", seed=2)

    def run(rows, champion_dir=champion, adapter=new):
        scored.clear()
        report = evaluate_adapter(cfg, adapter, rows, base_info=info, champion_adapter_dir=champion_dir)
        return report, len(scored)

    first, n_first = run(rows)
    again, n_again = run(rows, adapter=newer)
    assert (n_first, n_again) == (3, 1), "second run: only the (other) new adapter is scored"
    assert again.base == first.base and again.champion == first.champion
    assert [s["base"] for s in again.samples] == [s["base"] for s in first.samples]
    assert run(rows[:5])[1] == 3, "other rows: scored afresh"
    assert run(rows, _trained_like_adapter(cfg, tmp_path / "other", seed=1))[1] == 1, \
        "another champion: its scores afresh (the new adapter's and the base's reused)"
    promoted, n = run(rows, champion_dir=newer, adapter=_trained_like_adapter(cfg, tmp_path / "third", seed=3))
    assert n == 1 and promoted.champion == again.adapted, "yesterday's adapter, now the champion: read back, not scored"

def test_the_base_kept_ahead_of_the_first_run_gives_it_the_same_report_without_running_the_base(
        tiny_model_dir, tmp_path, monkeypatch):
    """`keep_base_scores` (what `prefect-lora warm` runs) keeps the base's task scores, probe
    answers and forgetting states on both parts of a remedy's evidence: the first evaluation then
    scores only the new adapter, runs the base's output layer alone, and reports what a run
    without anything kept reports."""
    from prefect_lora.lora_tasks.gate.remedies import evaluate_with_remedies
    from prefect_lora.lora_tasks.measurement import evaluation
    from prefect_lora.lora_tasks.measurement.evaluation import keep_base_scores
    from prefect_lora.lora_tasks.modeling import describe_base_model

    raw = _remedy_cfg(tmp_path, max_kl=100.0).model_dump(mode="json")
    raw["evaluation"]["reference"].update(probes="general", max_probes=6)
    raw["promotion"]["max_self_retention_ratio"] = None  # the adapter as trained is admissible: one trial
    raw["evaluation"]["generation"] = {"max_new_tokens": 4}
    cfg = config_from_dict(raw)
    rows = [{"prompt": f"{i} + 1 =", "completion": f" {i + 1}"} for i in range(16)]
    adapter, info = _trained_like_adapter(cfg, tmp_path / "ad"), describe_base_model(cfg.base_model.name_or_path)
    scored = []
    real = evaluation.task_scores
    monkeypatch.setattr(evaluation, "task_scores", lambda *a: scored.append(a[6]) or real(*a))  # a[6]: the view

    monkeypatch.setenv("PREFECT_LORA_CACHE", str(tmp_path / "cold"))
    cold = evaluate_with_remedies(cfg, adapter, rows, base_info=info)
    assert scored == ["adapted", "base"] * 2, "search part, then confirm part"

    warm = tmp_path / "warm"
    monkeypatch.setenv("PREFECT_LORA_CACHE", str(warm))
    scored.clear()
    keep_base_scores(cfg, rows, base_info=info)
    kept = {p: p.stat().st_mtime_ns for p in warm.rglob("*") if p.is_file()}
    assert scored == ["base", "base"] and len(list(warm.glob("scores/*.json"))) == 2
    assert len(list(warm.glob("forgetting/*.pt"))) == 4, "base states: probes and corpus, on each part"
    scored.clear()
    first = evaluate_with_remedies(cfg, adapter, rows, base_info=info)
    assert scored == ["adapted", "adapted"], "the base's task scores were read, not computed"
    assert [p.name for p, t in kept.items() if p.stat().st_mtime_ns != t] == [], "nothing of the base computed again"
    assert len(list(warm.glob("forgetting/*.pt"))) == 4, "the base's states were reused"
    assert first.base == cold.base and first.adapted == cold.adapted and first.samples == cold.samples
    assert first.forgetting == pytest.approx(cold.forgetting, rel=1e-6)
    assert first.forgetting["self_retention_tokens"] > 0 and first.forgetting["reference_tokens"] > 0
    assert first.intervals.keys() == cold.intervals.keys() and first.remedy["chosen"] == cold.remedy["chosen"] == "scale=1"


def test_answers_a_model_writes_token_by_token_are_read_off_its_loss_pass_not_generated(tiny_model_dir, tmp_path, monkeypatch):
    """Rows whose reference is the model's own greedy answer need no decoding: the loss pass shows
    the model choosing each reference token, so `task_scores` generates only the other rows, and
    every answer and metric is what generating them all gives."""
    from prefect_lora.lora_tasks.measurement import evaluation
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer
    from prefect_lora.lora_tasks.training import encoding

    cfg = _cfg("causal_lm", tmp_path)
    cfg.evaluation.generation = GenerationEvalConfig(max_new_tokens=4, metric="exact")
    tok, model = load_tokenizer(tiny_model_dir), load_base_model(tiny_model_dir, "causal_lm")
    torch.manual_seed(0)
    for p in model.parameters():  # weights that answer each prompt differently...
        p.data.normal_(0, 0.3)
    plain = torch.tensor([tok.decode([i]).isascii() and tok.decode([i]).isalnum() or i == tok.eos_token_id
                          for i in range(model.config.vocab_size)])
    model.lm_head.register_forward_hook(lambda module, args, out: out.masked_fill(~plain, -1e4))  # ...in plain text
    prompts = [f"{'9' * (i % 5)}{i} + 2 =" for i in range(12)]
    own = encoding.generate_answers(model, tok, prompts, 4, 4)
    rows = [{"prompt": p, "completion": a if i % 3 else "no"} for i, (p, a) in enumerate(zip(prompts, own))]
    asked: list[str] = []
    monkeypatch.setattr(evaluation, "generate_answers", lambda m, t, ps, *a, **k: asked.extend(ps) or encoding.generate_answers(m, t, ps, *a, **k))
    metrics, _, answers = evaluation.task_scores(model, cfg, evaluation.encode_examples(rows, tok, cfg), rows, tok, "cpu")

    assert answers == own and metrics["exact_match"] == pytest.approx(8 / 12)
    assert asked == [prompts[i] for i in range(0, 12, 3)], "only the rows with another reference are generated"
    assert len(set(own)) > 4 and any(len(a) < 4 for a in own), "distinct answers, some ended by the end token"


def test_a_greedy_answer_is_read_off_only_when_every_token_decoding_would_write_agrees(tiny_model_dir):
    """All of the answer and its end token, or the first max_new_tokens of it; never a prompt cut
    to fit max_seq_length (generation would see another prompt)."""
    from prefect_lora.lora_tasks.modeling import load_tokenizer
    from prefect_lora.lora_tasks.training.encoding import IGNORE_INDEX, format_prompts, greedy_answers_read_off

    tok = load_tokenizer(tiny_model_dir)
    prompt = tok(format_prompts(["2 + 2 ="], tok)[0][0])["input_ids"]
    answer, eos = tok(" 4", add_special_tokens=False)["input_ids"], tok.eos_token_id

    def example(p, a):
        return {"input_ids": p + a, "labels": [IGNORE_INDEX] * len(p) + a}

    def read(ex, agreed, max_new=8):
        return greedy_answers_read_off([ex], [agreed], ["2 + 2 ="], tok, max_new)

    whole = example(prompt, answer + [eos])
    assert read(whole, len(answer) + 1) == {0: " 4"}
    assert read(whole, len(answer)) == {}, "the end token not agreed: decoding would go on"
    assert read(whole, 1, max_new=1) == {0: tok.decode(answer[:1])}, "decoding stops after max_new_tokens"
    assert read(example(prompt, answer), len(answer)) == {}, "an answer cut by max_seq_length: what follows is unknown"
    assert read(example(prompt[1:], answer + [eos]), len(answer) + 1) == {}, "the loss pass saw a shorter prompt"
