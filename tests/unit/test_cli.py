"""The CLI's `validate` command and its error handling; `run` is covered by the integration tests."""

import json
import os
import re
from pathlib import Path

import pytest
import typer
import yaml
from prefect_lora.flows.cli import _exit_on_errors, app
from prefect_lora.lora_tasks.errors import LoraTaskError, ValidationFailed
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def _config(tmp_path, **data):
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["data"].update(data)
    raw["scaling"]["storage_path"] = str(tmp_path / "runs")
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_validate_passes_on_the_tiny_config(tmp_path):
    result = runner.invoke(app, ["validate", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "340 train and 60 eval rows valid" in result.output
    assert (tmp_path / "runs" / "tiny-sums" / "validate" / "validation_report.json").exists()


def test_warm_keeps_the_base_scores_a_first_run_reads_and_a_second_warm_computes_nothing(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_LORA_CACHE", str(tmp_path / "cache"))
    result = runner.invoke(app, ["warm", str(_config(tmp_path))])
    assert result.exit_code == 0, result.output
    assert "60 eval rows scored, task scores and forgetting states kept" in result.output
    kept = {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()}
    assert [p.parent.name for p in kept].count("scores") == 1 and [p.suffix for p in kept].count(".pt") == 1
    again = runner.invoke(app, ["warm", str(_config(tmp_path))])
    assert again.exit_code == 0, again.output
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "cache").rglob("*") if p.is_file()} == kept


def test_config_errors_are_one_message_without_traceback(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model_name: x\ntask: causal_lm\ntraining: {max_steps: 0}\nsurprise: 1\n")
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1
    for needle in ("base_model: required key is missing", "data: required key is missing",
                   "training.max_steps", "surprise: unknown key"):
        assert needle in result.output, result.output
    assert "Traceback" not in result.output


def test_set_overrides_reach_the_config(tmp_path):
    result = runner.invoke(app, ["validate", str(_config(tmp_path)), "--set", "data.eval_fraction=0.5"])
    assert result.exit_code == 0, result.output
    assert "200 train and 200 eval rows valid" in result.output


def test_bad_data_exits_3_with_rows_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [
        {"prompt": "ok prompt", "completion": " 1"}, {"prompt": None, "completion": " 2"},
        {"prompt": "another", "completion": "   "}, {"prompt": "third one", "completion": " 3"},
    ]))
    result = runner.invoke(app, ["validate", str(_config(tmp_path, train_path=str(bad), eval_fraction=0.25))])
    assert result.exit_code == 3, result.output
    assert "null_value" in result.output and "blank_text" in result.output
    assert "Traceback" not in result.output


def test_missing_data_file_is_a_clear_error(tmp_path):
    result = runner.invoke(app, ["validate", str(_config(tmp_path, train_path=str(tmp_path / "nope.jsonl")))])
    assert result.exit_code == 1
    assert "nope.jsonl" in result.output and "Traceback" not in result.output


def test_summary_names_a_version_or_says_a_full_run_is_a_baseline(capsys):
    from dataclasses import replace

    from prefect_lora.flows.cli import _print_summary
    from prefect_lora.lora_tasks.registry.lifecycle import RunResult

    result = RunResult(model_name="m", version="3", promoted=True, reasons=["eval_loss improved"], run_id="r",
                       run_dir="d", tracking_uri="sqlite:///x.db",
                       metrics={"base_eval_loss": 2.0, "adapted_eval_loss": 1.5, "task_gain": 0.5})
    _print_summary(result)
    out = capsys.readouterr().out
    assert "m version 3" in out and "promoted to champion" in out and "1.5" in out
    _print_summary(replace(result, version=None, promoted=False, method="full"))
    out = " ".join(capsys.readouterr().out.split())  # the title wraps at the table's width
    assert "full fine-tuning baseline (not registered)" in out and "version None" not in out
    assert "baseline, logged only" in out and "not promoted" not in out


def test_summary_of_a_skipped_run_gives_its_reason_only(capsys):
    from prefect_lora.flows.cli import _print_summary
    from prefect_lora.lora_tasks.registry.lifecycle import RunResult

    _print_summary(RunResult("m", "1", False, ["skipped: no new data: same data"], "r", "d", "sqlite:///x.db",
                             skipped=True))
    out = " ".join(capsys.readouterr().out.split())
    assert "skipped: no new data: same data (nothing trained)" in out and "decision" not in out


@pytest.mark.parametrize("error, also, code", [
    (ValidationFailed("3 invalid rows"), (), 3),
    (LoraTaskError("no such model"), (), 1),
    (ValueError("bad serve config"), (ValueError,), 1),
])
def test_user_errors_end_a_command_with_one_line_and_their_exit_code(error, also, code, capsys):
    @_exit_on_errors(*also)
    def command():
        raise error

    with pytest.raises(typer.Exit) as exit_:
        command()
    assert exit_.value.exit_code == code
    assert f"error: {error}" in capsys.readouterr().err


@pytest.mark.parametrize("text", ["model_name 'a[/]b' is not allowed", "[bold]x[/bold] and [brackets]"])
def test_an_error_is_printed_verbatim_whatever_brackets_it_quotes(text, capsys):
    """An error quotes what the user wrote: its brackets are text, not console markup."""
    @_exit_on_errors()
    def command():
        raise LoraTaskError(text)

    with pytest.raises(typer.Exit):
        command()
    assert f"error: {text}" in " ".join(capsys.readouterr().err.split())


def test_other_errors_keep_their_traceback():
    @_exit_on_errors()
    def command():
        raise KeyError("a bug")

    with pytest.raises(KeyError):
        command()


@pytest.mark.parametrize("reference, says", [
    ({"path": "no/such/corpus.txt"}, r"reference corpus \S*/no/such/corpus.txt does not exist"),
    ({"path": None, "benchmarks": ["no/such/bench.jsonl"]}, r"benchmark file \S*/no/such/bench.jsonl does not exist"),
])
def test_validate_reads_every_file_forgetting_will_read(tmp_path, reference, says):
    """A missing reference corpus or benchmark fails `validate` (and the run, before training)."""
    path = _config(tmp_path)
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"]["reference"].update(reference)
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 1, result.output
    assert re.search(says, " ".join(result.output.split())) and "Traceback" not in result.output


@pytest.mark.parametrize("command", ["run", "status", "history", "promote", "rollback", "serve", "validate", "fleet", "watch"])
def test_help_says_what_to_type_and_flags_take_nothing(command):
    out = runner.invoke(app, [command, "--help"], env={"COLUMNS": "160"}).output
    assert "<bool>" not in out and "list[" not in out, out
    assert re.search(r"--help\s{2,}Show this message", out), out  # a flag: no type between name and help


def test_validate_prints_each_checks_power_and_refuses_a_limit_no_adapter_can_show(tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_LORA_CACHE", str(tmp_path / "cache"))
    path = _config(tmp_path)
    ok = " ".join(runner.invoke(app, ["validate", str(path)]).output.split())
    assert "power at 95% confidence" in ok and "task_gain: 60 eval rows: detects a true gain" in ok
    raw = yaml.safe_load(path.read_text())
    raw["evaluation"]["reference"]["benchmarks"] = [str(REPO / "configs" / "data" / "mc_general.jsonl")]
    path.write_text(yaml.safe_dump(raw))
    result = runner.invoke(app, ["validate", str(path)])
    out = " ".join(result.output.split())
    assert result.exit_code == 1 and "Traceback" not in out, out
    assert "benchmark_mc_general_accuracy_drop: 40 benchmark questions: a harmless adapter passes the limit 0.05 13% of the time" in out
    assert "about 471 benchmark questions would show the limit" in out
    warned = runner.invoke(app, ["validate", str(path), "--set", "promotion.underpowered=warn"])
    assert warned.exit_code == 0 and "warning: promotion: benchmark_mc_general_accuracy_drop" in " ".join(warned.output.split())


def test_a_webhook_url_given_with_set_reaches_the_flow_through_the_environment_not_its_parameters(monkeypatch):
    from prefect_lora.flows.cli import secrets_to_environment
    from prefect_lora.flows.notifications import WEBHOOK_ENV

    monkeypatch.setenv(WEBHOOK_ENV, "before")  # restored after the test
    kept = secrets_to_environment(["training.max_steps=3", "notifications.webhook_url=https://hooks.example/T0K3N"])
    assert kept == ["training.max_steps=3"]
    assert os.environ[WEBHOOK_ENV] == "https://hooks.example/T0K3N"


BILLION_LAUGHS = "lol0: &lol0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"lol{i}: &lol{i} [{', '.join([f'*lol{i - 1}'] * 9)}]\n" for i in range(1, 10))


def _one_error(result, *needles: str) -> None:
    """The command ended with exit 1 and one problem, naming `needles`, and no traceback."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.output
    problems = [line for line in result.output.splitlines() if line.startswith("  - ")]
    assert len(problems) == 1 and all(n in problems[0] for n in needles), result.output


@pytest.mark.parametrize("command", ["validate", "run"])
@pytest.mark.parametrize("override, needles", [
    ("training.seed=-1", ("training.seed", "greater than or equal to 0")),  # was numpy's ValueError mid-run
    ("model_name=" + "m" * 300, ("model_name", "at most 100 characters")),  # was OSError: file name too long
    ("training.batch_size=true", ("training.batch_size", "is a boolean")),  # was read as 1
    ("training.max_steps=" + "9" * 5000, ("training.max_steps", "out of range")),  # was int()'s conversion limit
    ("training.learning_rate=1e400", ("training.learning_rate", "finite")),
])
def test_values_a_run_cannot_use_end_validate_and_run_with_one_error_naming_the_key(tmp_path, command, override, needles):
    _one_error(runner.invoke(app, [command, str(_config(tmp_path)), "--set", override]), *needles)


def test_a_yaml_alias_bomb_is_refused_not_expanded(tmp_path):
    """Found by hand: 9 levels of 9 aliases took `validate` past 1.1 GB and 120 s, expanding
    387 million values. The expansion is bounded: refused by the key it reached."""
    path = _config(tmp_path)
    path.write_text(path.read_text() + BILLION_LAUGHS)
    _one_error(runner.invoke(app, ["validate", str(path)]), "lol", "expands to more than 100,000 values")
