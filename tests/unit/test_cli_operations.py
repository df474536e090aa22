"""Operator commands without a server: clear errors for `register` on a folder that is not a run,
and `status` on an empty store."""

from typer.testing import CliRunner

from flows.cli import _age, app

runner = CliRunner()


def test_register_names_what_a_run_folder_needs(tmp_path):
    result = runner.invoke(app, ["register", str(tmp_path)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "registration.json does not exist" in out and "storage_path/MODEL/run-KEY" in out
    assert "Traceback" not in result.output


def test_status_of_an_empty_store_says_so(tmp_path):
    result = runner.invoke(app, ["status", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 0, result.output
    assert "no registered models" in result.output


def test_status_of_an_unknown_model_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["status", "nope", "--tracking-uri", f"sqlite:///{tmp_path}/m.db"])
    assert result.exit_code == 1
    assert "no registered model named 'nope'" in result.output and "Traceback" not in result.output


def test_ages_read_like_a_person_would_say_them():
    assert [_age(s) for s in (5, 90, 7200, 3 * 86400)] == ["5s", "1.5m", "2.0h", "3.0d"]
