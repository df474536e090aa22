"""The Markdown report and its two plots, from a synthetic evaluation."""

from __future__ import annotations

from lora_tasks.evaluation import EvalReport
from lora_tasks.report import write_report


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


def test_report_has_markdown_and_both_plots(tmp_path):
    history = {"train_loss": [(1, 2.0), (2, 1.7), (3, 1.5)], "learning_rate": [(1, 1e-3), (2, 8e-4), (3, 5e-4)]}
    files = write_report(report(True), "# summary\n", history, tmp_path, {"reference_perplexity_ratio": 1.2, "min_task_gain": 0.05})
    names = sorted(f.name for f in files)
    assert names == ["evaluation_report.md", "gain_vs_forgetting.png", "loss_curve.png"]
    for f in files:
        assert f.stat().st_size > 0
    assert (tmp_path / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (tmp_path / "evaluation_report.md").read_text()
    assert "![loss_curve](loss_curve.png)" in md and "| prompt | target | base | champion | adapted |" in md
    assert "a \\| b" in md  # table cells are escaped


def test_without_history_or_forgetting_only_what_exists_is_drawn(tmp_path):
    r = report(False)
    r.forgetting = {}
    files = write_report(r, "# summary\n", {}, tmp_path, {})
    assert [f.name for f in files] == ["evaluation_report.md"]
