"""The Markdown report and its two plots, from a synthetic evaluation."""

from __future__ import annotations

import base64
import re

import pytest
from prefect_lora.lora_tasks.measurement.evaluation import EvalReport
from prefect_lora.lora_tasks.registry.report import embed_images, write_report


def report(champion: bool) -> EvalReport:
    return EvalReport(
        task="causal_lm", primary_metric="eval_loss", higher_is_better=False,
        base={"eval_loss": 2.0}, adapted={"eval_loss": 1.5},
        forgetting={"reference_perplexity_ratio": 1.05, "reference_kl": 0.1},
        samples=[{"prompt": "a | b", "target": "t", "base": "x", "adapted": "t", **({"champion": "y"} if champion else {})}],
        champion={"eval_loss": 1.6} if champion else None,
        champion_forgetting={"reference_perplexity_ratio": 1.1} if champion else {},
        intervals={"task_gain": [0.5, 0.4, 0.6], "reference_perplexity_ratio": [1.05, 1.01, 1.09]},
    )


def test_report_has_markdown_html_and_both_plots(tmp_path):
    history = {"train_loss": [(1, 2.0), (2, 1.7), (3, 1.5)], "learning_rate": [(1, 1e-3), (2, 8e-4), (3, 5e-4)]}
    files = write_report(report(True), "# summary\n", history, tmp_path, {"reference_perplexity_ratio": 1.2, "min_task_gain": 0.05})
    names = sorted(f.name for f in files)
    assert names == ["evaluation_report.html", "evaluation_report.md", "gain_vs_forgetting.png", "loss_curve.png"]
    for f in files:
        assert f.stat().st_size > 0
    png = (tmp_path / "loss_curve.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "evaluation_report.md").read_text()
    assert "![loss_curve](loss_curve.png)" in md and "| prompt | target | base | champion | adapted |" in md
    assert "a \\| b" in md  # table cells are escaped
    html = (tmp_path / "evaluation_report.html").read_text()
    embedded = re.findall(r'<img alt="(\w+)" src="data:image/png;base64,([A-Za-z0-9+/=]+)"', html)
    assert [name for name, _ in embedded] == ["loss_curve", "gain_vs_forgetting"]
    assert base64.b64decode(embedded[0][1]) == png, "the HTML carries the plot itself: MLflow shows it with no file to resolve"
    assert "<th>prompt</th>" in html and "<td>a | b</td>" in html


def test_embedded_markdown_carries_its_images_for_a_prefect_artifact(tmp_path):
    png = b"\x89PNG-bytes"
    (tmp_path / "p.png").write_bytes(png)
    text = embed_images("# r\n![p](p.png) and ![web](http://x/y.png)\n", tmp_path)
    uri = "data:image/png;base64," + base64.b64encode(png).decode()
    assert text == f"# r\n![p]({uri}) and ![web](http://x/y.png)\n"


def test_without_history_or_forgetting_only_what_exists_is_drawn(tmp_path):
    r = report(False)
    r.forgetting = {}
    files = write_report(r, "# summary\n", {}, tmp_path, {})
    assert [f.name for f in files] == ["evaluation_report.md", "evaluation_report.html"]


def _summary(decision, version="3", champion_version="2", **sections):
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.registry.lifecycle import DataSummary
    from prefect_lora.lora_tasks.registry.report import summary_markdown

    cfg = config_from_dict({"model_name": "m", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
                            "data": {"train_path": "x.jsonl", "prompt_column": "p", "completion_column": "c"},
                            "training": {"max_steps": 5}, **sections})
    data = DataSummary(340, 60, "f" * 64, "Validation passed", "/q/invalid.jsonl")
    return summary_markdown(cfg, data, report(True), decision, version, "run1", champion_version)


def test_summary_reads_the_data_summary_and_names_decision_and_tracking():
    from prefect_lora.lora_tasks.gate.promotion import Decision

    md = _summary(Decision(True, ["gain 0.5 above 0"], []))
    assert md.startswith("# m: version 3 **promoted to `champion`**")
    assert "train rows: 340, eval rows: 60" in md and "contract: Validation passed" in md
    assert f"`{'f' * 16}`" in md and "quarantine: `/q/invalid.jsonl`" in md
    assert "| metric | base | champion | adapted |" in md and "| eval_loss | 2 | 1.6 | 1.5 |" in md
    assert "champion before this run: version 2" in md and "- gain 0.5 above 0" in md
    assert "MLflow run `run1` in experiment `m`" in md
    assert "replay" not in md


def test_summary_says_what_replay_the_adapter_trained_with():
    from prefect_lora.lora_tasks.gate.promotion import Decision

    md = _summary(Decision(True, ["ok"], []), replay={"share": 0.1, "kl_weight": 1.0})
    assert ("- replay: 10% of the training examples are the base model's own answers to general prompts, with a "
            "KL-to-base penalty (weight 1) on those rows") in md


def test_version_description_is_one_plain_sentence_then_the_reasons():
    from prefect_lora.lora_tasks.gate.promotion import Decision
    from prefect_lora.lora_tasks.registry.report import version_description

    text = version_description(report(True), Decision(False, ["no gain", "perplexity ratio 1.09 above 1.05"], ["task_gain"]))
    first, _, rest = text.partition("\n\n")
    assert first == ("Not promoted: eval_loss 2 → 1.5 (gain +0.5 [0.4, 0.6]); forgetting: reference perplexity ratio "
                     "1.05, reference kl 0.1.")
    assert rest == "- no gain\n- perplexity ratio 1.09 above 1.05"
    assert "#" not in text and "|" not in text  # the version list shows it raw: no Markdown structure


def test_a_handful_of_headline_metrics_and_the_rest_in_one_table():
    from prefect_lora.lora_tasks.registry.report import comparison_rows, headline_metrics, metrics_rows

    flat = {**report(True).flat_metrics(), "reference_tokens": 4096.0, "train_rows": 10, "train_tokens_per_s": 900.0}
    flat["champion_delta"] = 0.1
    assert list(headline_metrics(flat, "eval_loss")) == [
        "task_gain", "task_gain_ci_low", "task_gain_ci_high", "adapted_eval_loss", "champion_delta",
        "reference_kl", "reference_perplexity_ratio"]  # no score of base or champion, no count, no timing
    rows = {r["metric"]: r for r in metrics_rows(flat)}
    assert rows["task_gain"] == {"metric": "task_gain", "value": 0.5, "ci_low": 0.4, "ci_high": 0.6}
    assert rows["reference_tokens"]["value"] == 4096.0 and rows["train_rows"]["value"] == 10
    assert rows["champion_eval_loss"]["value"] == 1.6 and rows["base_eval_loss"]["ci_low"] is None
    assert not [m for m in rows if "_ci_" in m]
    table = {r["metric"]: r for r in comparison_rows(flat)}  # base | champion | adapted, one row a figure
    assert table["eval_loss"] == {"metric": "eval_loss", "base": "2", "champion": "1.6", "adapted": "1.5"}
    assert table["task_gain"]["adapted"] == "0.5 [0.4, 0.6]"
    assert table["reference_perplexity_ratio"] == {"metric": "reference_perplexity_ratio", "base": "",
                                                   "champion": "1.1", "adapted": "1.05 [1.01, 1.09]"}


def test_a_decided_run_is_named_for_what_it_is():
    from prefect_lora.lora_tasks.registry.report import run_title

    assert run_title("demo-orders", "3", True) == "demo-orders v3 promoted"
    assert run_title("demo-orders", "4", False) == "demo-orders v4 refused"


def test_closing_notes_say_what_happened_to_champion():
    from prefect_lora.lora_tasks.gate.promotion import Decision
    from prefect_lora.lora_tasks.registry.report import mlflow_markdown, redecision_markdown, skip_markdown

    again = redecision_markdown(Decision(False, ["worse than version 7"], ["beat_champion"]), "7")
    assert again == ("\n## Decided again\nThe champion moved to version 7 during this run; the gate was re-run "
                     "against it: **not promoted**.\n- worse than version 7\n")
    assert mlflow_markdown("r1", "http://ui/r1", "3", "http://ui/m/3", "auto-promote", "2", "3") == (
        "\n## MLflow\n- run: [r1](http://ui/r1)\n- registered version: [version 3](http://ui/m/3)\n"
        "- audit: auto-promote, champion moved from version 2 to 3\n")
    skipped = skip_markdown("m", "skipped: no new data: same inputs", "2", "r9")
    assert skipped.startswith("# m: skipped: no new data\n") and "champion version 2 stays" in skipped and "`r9`" in skipped
    refused = skip_markdown("m", "skipped: no new data: equal those of version 1, which the gate did not promote", None, "r9")
    assert "Nothing was trained or registered; there is no champion yet." in refused


def test_a_baseline_summary_is_not_registered():
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.registry.lifecycle import BASELINE_REASON, DataSummary
    from prefect_lora.lora_tasks.registry.report import baseline_markdown

    cfg = config_from_dict({"model_name": "m", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
                            "data": {"train_path": "x.jsonl"}, "training": {"max_steps": 5, "method": "full"}})
    md = baseline_markdown(cfg, DataSummary(10, 2, "f" * 64, "ok"), report(False), "r1", None)
    assert md.startswith("# m: version (not registered) **not promoted**") and BASELINE_REASON in md
    assert "champion before this run: none" in md

def _remedied() -> EvalReport:
    from prefect_lora.lora_tasks.config import PromotionPolicy
    from prefect_lora.lora_tasks.gate.promotion import Candidate
    from prefect_lora.lora_tasks.gate.remedy import Trial, choose, judge, remedy_summary

    policy = PromotionPolicy(min_task_gain=0.3, max_self_retention_ratio=1.2)
    trials = [judge(Trial(f"scale={s:g}", {"scale": s}, Candidate(
        "exact_match", True, 0.0, g, {"self_retention_perplexity_ratio": ratio},
        intervals={"task_gain": (g - 0.08, g + 0.08), "self_retention_perplexity_ratio": (ratio - 0.03, ratio + 0.04)}),
        order=i), None, policy) for i, (s, g, ratio) in enumerate([(1.0, 0.75, 1.21), (0.65, 0.7, 1.1), (0.35, 0.4, 1.03)])]
    chosen, needed = choose(trials, policy)
    r = report(False)
    r.forgetting = {"self_retention_perplexity_ratio": 1.09}
    r.remedy = remedy_summary("scale", trials, chosen, needed, policy, 42.0, 60, 60)
    return r


def test_a_remedy_adds_its_frontier_and_its_trials_to_the_report(tmp_path):
    from prefect_lora.lora_tasks.registry.report import remedy_markdown

    r = _remedied()
    files = write_report(r, "# summary\n", {}, tmp_path, {"self_retention_perplexity_ratio": 1.2, "min_task_gain": 0.3})
    assert "remedy_frontier.png" in [f.name for f in files]
    assert (tmp_path / "remedy_frontier.png").read_bytes()[:4] == b"\x89PNG"
    md = remedy_markdown(r)
    assert "## Remedy: scale (3 trial(s) from 1 training(s), 42 s; chosen on 60 search rows, confirmed on 60 others)" in md
    assert "| scale=0.65 **chosen** | 0.7 [0.62, 0.78] | 1.1 [1.07, 1.14] | yes |" in md
    assert "| scale=1 | 0.75 [0.67, 0.83] | 1.21 [1.18, 1.25] | no |" in md
    assert "registered with scale=0.65" in md
    from prefect_lora.lora_tasks.registry.report import remedy_rows

    rows = remedy_rows(r)
    assert [row["trial"] for row in rows] == ["scale=1", "scale=0.65", "scale=0.35"]
    assert rows[1] == {"trial": "scale=0.65", "task_gain": "0.7 [0.62, 0.78]",
                       "self_retention_perplexity_ratio": "1.1 [1.07, 1.14]", "admissible": True, "chosen": True,
                       "seconds": 0.0, "mlflow_run": ""}
    assert not rows[0]["admissible"] and not rows[0]["chosen"]
    assert ("Against the adapter as trained (search part): gain 0.7 vs 0.75, self_retention_perplexity_ratio 1.1 vs "
            "1.21; cost 0 extra training(s) and 0 s of trials.") in md


def test_the_metrics_table_shows_every_forgetting_figure_the_reasons_may_name():
    from prefect_lora.lora_tasks.registry.report import metrics_table

    flat = {"base_exact_match": 0.1, "adapted_exact_match": 0.8, "champion_exact_match": 0.7,
            "adapted_exact_match_ci_low": 0.7, "adapted_exact_match_ci_high": 0.9, "task_gain": 0.7,
            "self_retention_perplexity_ratio": 1.05, "self_retention_perplexity_ratio_ci_low": 1.01,
            "self_retention_perplexity_ratio_ci_high": 1.09, "champion_self_retention_perplexity_ratio": 1.1,
            "reference_kl": 0.1, "benchmark_arc_accuracy_drop": 0.02}
    columns, rows = metrics_table(flat)
    by_name = {r[0]: r for r in rows}
    assert columns == ["metric", "base", "champion", "adapted"]
    assert by_name["self_retention_perplexity_ratio"] == ["self_retention_perplexity_ratio", "", "1.1", "1.05 [1.01, 1.09]"]
    assert {"reference_kl", "benchmark_arc_accuracy_drop"} <= set(by_name)
    assert [r[0] for r in rows][-3:] == ["benchmark_arc_accuracy_drop", "reference_kl", "self_retention_perplexity_ratio"]


@pytest.mark.parametrize("before, after, says", [
    (None, "1", "champion set to version 1 (the first)"), ("1", "2", "champion moved from version 1 to 2"),
    ("1", "1", "champion stays version 1"), (None, None, "no champion yet"),
])
def test_the_audit_line_reads_as_a_sentence(before, after, says):
    from prefect_lora.lora_tasks.registry.report import mlflow_markdown

    text = mlflow_markdown("r1", "http://mlflow/#/runs/r1", "1", "http://mlflow/#/models/m/versions/1",
                           "promote" if before != after else "keep", before, after)
    assert says in text and "None" not in text


def test_a_classifier_report_names_its_baseline_beside_the_adapted_model():
    from prefect_lora.lora_tasks.gate.promotion import Decision
    from prefect_lora.lora_tasks.measurement.evaluation import EvalReport
    from prefect_lora.lora_tasks.registry.report import baseline_note, metrics_table, version_description

    report = EvalReport(task="sequence_classification", primary_metric="accuracy", higher_is_better=True,
                        base={"accuracy": 0.81, "macro_f1": 0.80}, adapted={"accuracy": 0.86, "macro_f1": 0.86},
                        intervals={"task_gain": [0.05, 0.02, 0.08]},
                        baseline={"kind": "probe", "majority_accuracy": 0.51, "majority_macro_f1": 0.34,
                                  "probe_accuracy": 0.81, "probe_macro_f1": 0.80, "train_rows": 12000})
    flat = report.flat_metrics()
    _, rows = metrics_table(flat)
    cells = {r[0]: r[1] for r in rows}
    assert cells["majority class of the train split: accuracy"] == "0.51"
    assert cells["linear probe on the frozen base (the base): accuracy"] == "0.81" == cells["accuracy"]
    assert "linear probe on the frozen base" in baseline_note(flat) and "untrained head" in baseline_note(flat)
    first = version_description(report, Decision(True, ["task_gain: ok"], [])).splitlines()[0]
    assert first.startswith("Promoted to champion: accuracy 0.81 (linear probe on the frozen base) → 0.86"), first
    causal = {"base_eval_loss": 2.0, "adapted_eval_loss": 1.5}
    assert baseline_note(causal) == "" and not any("probe" in r[0] for r in metrics_table(causal)[1])
