"""Operator commands without a server: clear errors for `register` on a folder that is not a run,
`status` on an empty store, and a tracking server that does not answer; every command's help."""

import itertools
import json
import os
from unittest import mock

import pytest
from prefect_lora.flows.cli import app
from typer.testing import CliRunner

runner = CliRunner()


def test_register_names_what_a_run_folder_needs(tmp_path):
    result = runner.invoke(app, ["register", str(tmp_path)])
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert "registration.json does not exist" in out and "storage_path/MODEL/run-KEY" in out
    assert "Traceback" not in result.output


def _empty_store(tmp_path) -> str:
    from mlflow import MlflowClient

    uri = f"sqlite:///{tmp_path}/m.db"
    MlflowClient(uri, registry_uri=uri).search_registered_models()  # creates the store's tables
    return uri


def test_status_of_an_empty_store_says_so(tmp_path):
    uri = _empty_store(tmp_path)
    result = runner.invoke(app, ["status", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "no registered models" in result.output
    as_json = runner.invoke(app, ["status", "--json", "--tracking-uri", uri])
    assert json.loads(as_json.output) == {"tracking_uri": uri, "models": []}


@pytest.mark.parametrize("command", [["status"], ["history", "demo-orders"]])
def test_read_only_commands_never_create_a_store(tmp_path, monkeypatch, command):
    """Run from another folder: a clear error naming where it looked, and nothing created there;
    MLFLOW_TRACKING_URI is where it looks first when no --tracking-uri is given."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    result = runner.invoke(app, command)
    assert result.exit_code == 1
    out = " ".join(result.output.split())
    assert f"no MLflow store at {tmp_path}/.prefect-lora/mlflow.db (the default store of this folder)" in out
    assert not (tmp_path / ".prefect-lora").exists()
    as_json = runner.invoke(app, [*command, "--json"])  # a script piping it to jq reads the error
    assert as_json.exit_code == 1 and json.loads(as_json.stdout) == {
        "error": f"no MLflow store at {tmp_path}/.prefect-lora/mlflow.db (the default store of this folder): run from "
                 "the project folder, or pass --tracking-uri or set MLFLOW_TRACKING_URI", "kind": "RegistryError"}
    monkeypatch.setenv("MLFLOW_TRACKING_URI", _empty_store(tmp_path))
    assert runner.invoke(app, ["status"]).exit_code == 0


@pytest.fixture
def mlflow_state_kept(monkeypatch):
    """A command points MLflow's process-wide URIs (and their variables in os.environ) at the
    server it reads, and sets MLflow's retry count: all put back after the test."""
    from mlflow.tracking._model_registry import utils as registry_utils
    from mlflow.tracking._tracking_service import utils as tracking_utils

    monkeypatch.setattr(tracking_utils, "_tracking_uri", tracking_utils._tracking_uri)
    monkeypatch.setattr(registry_utils, "_registry_uri", registry_utils._registry_uri)
    with mock.patch.dict(os.environ):
        yield


@pytest.mark.parametrize("command", [["status"], ["history", "demo-orders"]])
def test_a_tracking_server_that_does_not_answer_is_one_clear_error_in_seconds(mlflow_state_kept, command):
    """Nothing listens on the port: one line naming the server (without its password) and the fix,
    after two HTTP retries (MLflow's default seven wait ~4 minutes); a retry count the user set stands."""
    from prefect_lora.deploy.testing import free_port

    os.environ.pop("MLFLOW_HTTP_REQUEST_MAX_RETRIES", None)
    server = f"http://127.0.0.1:{free_port()}"
    result = runner.invoke(app, [*command, "--tracking-uri", server.replace("//", "//ops:s3cret@")])
    assert result.exit_code == 1, result.output
    out = " ".join(result.output.split())
    assert f"the MLflow tracking server at {server} did not answer (connection refused, after 2 retries" in out
    assert "--tracking-uri" in out and "Traceback" not in out and "s3cret" not in out
    os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
    result = runner.invoke(app, [*command, "--tracking-uri", server])
    assert result.exit_code == 1 and "after 0 retries" in result.output
    result = runner.invoke(app, [*command, "--tracking-uri", server, "--json"])
    assert result.exit_code == 1 and json.loads(result.stdout)["kind"] == "RegistryError", result.stdout
    assert json.loads(result.stdout)["error"].startswith(f"the MLflow tracking server at {server} did not answer")


def test_only_errors_that_never_reached_the_server_read_as_unreachable():
    from mlflow.exceptions import MlflowException
    from prefect_lora.lora_tasks.registry.tracking import unreachable_server

    timeout = MlflowException("API request to https://mlflow.example.com/api/2.0/mlflow/runs/get failed with exception "
                              "HTTPSConnectionPool(host='mlflow.example.com', port=443): Read timed out. (read timeout=120)")
    assert "at https://mlflow.example.com did not answer (no answer in time" in unreachable_server(timeout)
    assert unreachable_server(MlflowException("RESOURCE_DOES_NOT_EXIST: Run 'abc' not found")) is None
    assert unreachable_server(ConnectionRefusedError("API request to http://x/api/ refused: Connection refused")) is None


def test_version_is_printed():
    from prefect_lora.lora_tasks import __version__

    result = runner.invoke(app, ["--version"])
    assert result.exit_code == 0 and result.output.strip() == f"prefect-lora {__version__}"


def test_status_of_an_unknown_model_is_one_clear_error(tmp_path):
    result = runner.invoke(app, ["status", "nope", "--tracking-uri", _empty_store(tmp_path)])
    assert result.exit_code == 1
    assert "no registered model named 'nope'" in result.output and "Traceback" not in result.output


def test_run_pages_open_in_mlflows_model_training_view(tmp_path):
    """The printed run page opens MLflow's model-training view, locally with this environment's
    `mlflow ui`; the experiment is marked as model development."""
    import sys
    from pathlib import Path

    from mlflow import MlflowClient
    from prefect_lora.lora_tasks.registry import tracking

    uri = f"sqlite:///{tmp_path}/m.db"
    c = MlflowClient(uri)
    exp = tracking.ensure_experiment(c, "m", str(tmp_path / "art"))
    assert c.get_experiment(exp).tags["mlflow.experimentKind"] == "custom_model_development"
    run = c.create_run(exp).info.run_id
    local = tracking.run_url(uri, run)
    assert local == (f"{Path(sys.executable).with_name('mlflow')} ui --backend-store-uri {uri}, then "
                     f"http://127.0.0.1:5000/#/experiments/{exp}/runs/{run}?workflowType=machine_learning")
    assert tracking.version_page(uri, "a model", "3") == "http://127.0.0.1:5000/#/models/a%20model/versions/3"
    assert tracking.version_page("https://mlflow.example/", "m", "3") == "https://mlflow.example/#/models/m/versions/3"


def test_serve_fleet_follows_members_without_a_champion_yet(tmp_path, monkeypatch, tiny_model_dir):
    """`serve --fleet`: the first member with a champion is the default (it fixes the base); a
    member not promoted yet is served too, said so, and picked up once promoted (the gateway's
    poll); a fleet with no champion at all is refused before Ray starts."""
    from pathlib import Path

    import yaml
    from prefect_lora.deploy import serve as deploy_serve
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    uri = f"sqlite:///{tmp_path}/m.db"
    (version,) = register_random_adapters(uri, "m-ready", tiny_model_dir, [1], tmp_path)
    fleet = tmp_path / "fleet.yaml"
    shared = str(Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml")
    fleet.write_text(yaml.safe_dump({"config": shared, "members": [{"name": "m-later"}, {"name": "m-ready"}]}))
    served = []
    monkeypatch.setattr(deploy_serve, "run_forever", lambda cfg, **kw: served.append(cfg))

    refused = runner.invoke(app, ["serve", "--fleet", str(fleet), "--tracking-uri", uri])
    assert refused.exit_code != 0 and "with a promoted member" in " ".join(refused.output.split()) and not served

    aliases.promote_version(uri, "m-ready", version, reason="first champion")
    result = runner.invoke(app, ["serve", "--fleet", str(fleet), "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "no champion yet: m-later (served once promoted" in " ".join(result.output.split())
    assert (served[0].model_name, served[0].members) == ("m-ready", ["m-later"])


@pytest.mark.parametrize("command", [["promote", "m", "1" * 5000, "--reason", "r"], ["rollback", "m", "--to", "1" * 5000]])
def test_a_version_of_thousands_of_digits_is_one_error_not_a_conversion_traceback(tmp_path, tiny_model_dir, command):
    """Found by hand: `promote NAME <5000 digits>` ended in int()'s conversion-limit ValueError."""
    from prefect_lora.deploy.testing import register_random_adapters

    uri = f"sqlite:///{tmp_path}/m.db"
    register_random_adapters(uri, "m", tiny_model_dir, [1], tmp_path)
    result = runner.invoke(app, [*command, "--tracking-uri", uri])
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "Traceback" not in result.output and "5,000 digits is not a version number" in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def _commands(group, path=()):
    for name, command in group.commands.items():
        yield (*path, name)
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))


def _odd_breaks(text: str, width: int) -> list[str]:
    """Lines of a help screen broken before they had to be: the next line goes on with the same text
    (it starts where this line's last column starts) and its first word would have fit (Rich fills each
    line, so such a break comes from a line break in the help text itself). Typer's `[required]` and
    `[default: ...]` tags are laid out apart and skipped."""
    lines, odd = [line.replace("│", " ") for line in text.splitlines()], []
    for line, after in itertools.pairwise(lines):
        start = len(after) - len(after.lstrip())
        goes_on = after.strip() and start < len(line) and line[start - 1 : start + 1].startswith(" ") and \
            line[start] != " " and "  " not in line[start:].rstrip()  # this line's last column
        word = after.split()[0] if after.strip() else ""
        if goes_on and not word.startswith("[") and len(line.rstrip()) + 1 + len(word) <= width - 2:
            odd.append(f"{line.strip()} / {after.strip()}")
    return odd


@pytest.mark.parametrize("width", [80, 100])
def test_every_help_screen_reads_cleanly(width):
    """Each command's help fits the width and wraps its text between words where the line is full."""
    import typer

    screens = [()] + list(_commands(typer.main.get_command(app)))
    assert ("warm",) in screens and ("demo", "prepare") in screens
    for path in screens:
        result = CliRunner(env={"COLUMNS": str(width)}).invoke(app, [*path, "--help"])
        assert result.exit_code == 0, (path, result.output)
        assert max(map(len, result.output.splitlines())) <= width, (path, result.output)
        assert _odd_breaks(result.output, width) == [], (path, result.output)
