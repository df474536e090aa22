"""`status` and `history` on a real SQLite MLflow store: the records read straight from its tables
equal those read through MLflow, the commands import no MLflow there, COLUMNS sets the width of
piped output, and `--json` prints a JSON error object when a command fails."""

import json
import os
import subprocess
import sys

import pytest
from prefect_lora.flows.cli import app
from prefect_lora.lora_tasks.errors import UnknownModel
from prefect_lora.lora_tasks.registry import overview
from typer.testing import CliRunner

REASON = ("task_gain: eval_loss improved by 0.4891 [0.4447, 0.5303] over base (required: more than 0.05)\n"
          "reference_perplexity_ratio: 0.9684 [0.9582, 0.9803] within the limit 1.2")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> str:
    """Model `m`: versions 1-3 evaluated (champion 2, challenger 3, two audited moves), version 4
    deleted; model `legacy`: a champion registered before evaluations were recorded on versions."""
    from mlflow import MlflowClient
    from prefect_lora.lora_tasks.registry import aliases, registry, tracking

    tmp = tmp_path_factory.mktemp("store")
    uri = f"sqlite:///{tmp}/mlflow.db"
    c = MlflowClient(uri, registry_uri=uri)
    exp = tracking.ensure_experiment(c, "m", str(tmp / "artifacts"))
    for name, count in (("m", 4), ("legacy", 1)):
        c.create_registered_model(name)
        for i in range(1, count + 1):
            run = c.create_run(exp).info.run_id
            metrics = {"adapted_eval_loss": 5 - i / 10, "base_eval_loss": 5.4, "task_gain": 0.4 + i / 10,
                       "task_gain_ci_low": 0.3, "task_gain_ci_high": 0.6, "reference_kl": 0.02 * i, "train_loss": 3.0}
            tracking.log_metrics(uri, run, metrics)
            v = c.create_model_version(name, str(tmp / "src"), run_id=run).version
            tags = {"lineage.base_model": "builtin:tiny-llama", "lineage.data_fingerprint": f"{i}" * 64,
                    "lineage.config_hash": "c" * 64, "promotion.decision": "promoted" if i < 3 else "rejected"}
            for key, value in tags.items():
                c.set_model_version_tag(name, v, key, value)
            if name == "m":
                registry.record_evaluation(uri, name, v, metrics, "eval_loss")
            else:
                c.set_model_version_tag(name, v, "eval.primary_metric", "eval_loss")
    c.delete_model_version("m", "4")
    aliases.compare_and_set_alias(uri, "m", "1", expected=None, reason=REASON, action="auto-promote", actor="ci@host")
    aliases.compare_and_set_alias(uri, "m", "2", expected="1", reason="wins the A/B test", action="promote",
                                  actor="alice@host")
    aliases.move_alias(uri, "m", "3", alias="challenger", action="admit", reason="admitted by the gate", actor="ci@host")
    c.set_registered_model_alias("legacy", "champion", "1")
    return uri


@pytest.fixture
def through_mlflow(monkeypatch):
    """Every read goes through MLflow, as for a tracking server."""
    monkeypatch.setattr(overview._LocalStore, "open", classmethod(lambda cls, uri: None))


def _reads(uri: str) -> dict:
    status = overview.model_status(uri, "m")
    for alias in ("champion", "challenger"):
        status[alias].pop("age_s")  # the clock moved between the two reads
    return {"names": overview.model_names(uri), "status": status, "versions": overview.versions_overview(uri, "m"),
            "history": overview.alias_history(uri, "m"), "champion moves": overview.alias_history(uri, "m", "champion")}


def test_the_store_read_straight_gives_what_mlflow_gives(store, monkeypatch):
    direct = _reads(store)
    with monkeypatch.context() as m:
        m.setattr(overview._LocalStore, "open", classmethod(lambda cls, uri: None))
        assert _reads(store) == direct
    assert direct["names"] == ["legacy", "m"]
    assert direct["status"]["versions"] == 3  # the deleted one is not counted
    champion, challenger = direct["status"]["champion"], direct["status"]["challenger"]
    assert (champion["version"], challenger["version"], challenger["decision"]) == ("2", "3", "rejected")
    assert champion["metrics"] == {"adapted_eval_loss": 4.8, "task_gain": 0.6, "reference_kl": 0.04}
    assert champion["lineage"]["data_fingerprint"] == "2" * 64
    assert [(v["version"], v["aliases"]) for v in direct["versions"]] == [
        ("1", []), ("2", ["champion"]), ("3", ["challenger"])]
    assert [(r["action"], r["from_version"], r["to_version"], r["actor"]) for r in direct["history"]] == [
        ("auto-promote", None, "1", "ci@host"), ("promote", "1", "2", "alice@host"), ("admit", None, "3", "ci@host")]
    assert [r["action"] for r in direct["champion moves"]] == ["auto-promote", "promote"]


def test_a_version_without_its_evaluation_recorded_is_read_through_mlflow(store):
    with overview._LocalStore.open(store) as local:
        assert local.model_status("legacy") is None
    champion = overview.model_status(store, "legacy")["champion"]
    assert champion["metrics"] == {"adapted_eval_loss": 4.9, "task_gain": 0.5, "reference_kl": 0.02}  # the run's


@pytest.mark.parametrize("read", [overview.model_status, overview.versions_overview, overview.alias_history])
@pytest.mark.parametrize("mlflow", [False, True])
def test_an_unknown_model_is_one_error_naming_the_models_there(store, read, mlflow, monkeypatch):
    if mlflow:
        monkeypatch.setattr(overview._LocalStore, "open", classmethod(lambda cls, uri: None))
    with pytest.raises(UnknownModel) as err:
        read(store, "nope")
    assert str(err.value) == ("no registered model named 'nope' in this tracking store; registered models: "
                              "['legacy', 'm']. Check the name or --tracking-uri")


@pytest.mark.parametrize("command", [["status", "m"], ["history", "m"]])
def test_status_and_history_of_a_local_store_import_no_mlflow(store, command):
    """MLflow's import alone costs ~3 s of CPU: a local store's tables are read without it (`legacy`,
    whose champion's evaluation is on its run alone, is read through MLflow)."""
    code = ("import sys\nfrom prefect_lora.flows import cli\n"
            f"sys.argv = ['prefect-lora', *{command!r}, '--tracking-uri', {store!r}]\n"
            "try:\n    cli.main()\nexcept SystemExit as exc:\n    assert not exc.code, exc.code\n"
            "print('mlflow imported' if 'mlflow' in sys.modules else 'no mlflow')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False,
                         env={**os.environ, "COLUMNS": "100"})
    assert out.returncode == 0 and out.stdout.rstrip().endswith("no mlflow"), out.stdout + out.stderr
    assert "wins the A/B test" in out.stdout or "4.8" in out.stdout


@pytest.mark.parametrize("width", [100, 60])
def test_piped_output_takes_the_width_columns_gives(store, width):
    result = CliRunner(env={"COLUMNS": str(width)}).invoke(app, ["history", "m", "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    lines = result.stdout.splitlines()
    assert max(map(len, lines)) <= width and (width < 100 or max(map(len, lines)) > 80), result.stdout
    assert "reference_perplexity_ratio:" in result.stdout.split()


def test_status_json_is_the_records(store):
    result = CliRunner().invoke(app, ["status", "m", "--json", "--tracking-uri", store])
    assert result.exit_code == 0, result.output
    models = json.loads(result.stdout)["models"]
    assert [(m["name"], m["champion"]["version"], m["challenger"]["version"]) for m in models] == [("m", "2", "3")]


@pytest.mark.parametrize("command, kind, message", [
    (["status", "nope"], "UnknownModel", "no registered model named 'nope'"),
    (["history", "nope"], "UnknownModel", "no registered model named 'nope'"),
])
def test_a_json_command_that_fails_prints_a_json_error(store, command, kind, message):
    result = CliRunner().invoke(app, [*command, "--json", "--tracking-uri", store])
    assert result.exit_code == 1
    error = json.loads(result.stdout)
    assert error["kind"] == kind and error["error"].startswith(message), result.stdout
    assert message in result.stderr  # and the usual line for a person
