"""The real flow end to end: Prefect (test harness), a local Ray with 2 workers, SQLite MLflow."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from services import prefect_harness

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def harness():
    with prefect_harness():
        yield
    import ray

    ray.shutdown()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("flow")


def write_config(workdir: Path, name: str, **sections) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    raw["scaling"]["storage_path"] = str(workdir / "runs")
    raw["tracking"] = {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "artifact_location": str(workdir / "mlartifacts")}
    for key, value in sections.items():
        raw[key] = {**raw.get(key, {}), **value} if isinstance(value, dict) else value
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def flow_run_of(result):
    """The Prefect flow run that made `result` (its MLflow run's `prefect.flow_run_id`)."""
    from uuid import UUID

    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client

    tags = MlflowClient(result.tracking_uri).get_run(result.run_id).data.tags
    with get_client(sync_client=True) as client:
        return client.read_flow_run(UUID(tags["prefect.flow_run_id"]))


def flow_run_logs(flow_run_id) -> list[str]:
    """Every line the flow run logged, in order, once the log handler has sent what it holds."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=30)
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])),
                                sort=LogSort.TIMESTAMP_ASC)
    return [log.message for log in logs]


FLOAT = re.compile(r"(?<![\w.])-?(\d+\.\d+)(?![\w.])")
"""A decimal figure standing alone (not a version, an address or part of a name)."""


def significant_digits(number: str) -> int:
    return len(number.replace(".", "").lstrip("0"))


@pytest.fixture(scope="module")
def first_run(harness, workdir):
    from prefect_lora.flows.retrain import retrain

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL", "1")  # several samples even in a short run
        return retrain(str(write_config(workdir, "tiny")))


def test_first_run_registers_and_promotes_version_1(first_run, workdir):
    from mlflow import MlflowClient

    assert first_run.promoted is True, first_run.reasons
    assert first_run.version == "1"
    client = MlflowClient(first_run.tracking_uri)
    champion = client.get_model_version_by_alias("tiny-sums", "champion")
    assert str(champion.version) == "1"
    assert str(client.get_model_version_by_alias("tiny-sums", "challenger").version) == "1"
    tags = champion.tags
    for key in ("lineage.base_model", "lineage.base_model_hash", "lineage.data_fingerprint",
                "lineage.config_hash", "lineage.code_version"):
        assert tags.get(key), key
    assert len(tags["lineage.data_fingerprint"]) == 64
    assert tags["promotion.decision"] == "promoted"

    run = client.get_run(first_run.run_id)
    assert run.info.status == "FINISHED"
    m = run.data.metrics
    assert m["adapted_eval_loss"] < first_run.metrics["base_eval_loss"] and m["task_gain"] > 0
    assert m["reference_perplexity_ratio"] > 0 and m["reference_kl"] >= 0
    assert m["system/system_memory_usage_megabytes"] > 0 and 0 <= m["system/cpu_utilization_percentage"] <= 100
    assert len(client.get_metric_history(first_run.run_id, "system/cpu_utilization_percentage")) >= 2
    assert run.data.params["training.max_steps"] == "60"
    history = client.get_metric_history(first_run.run_id, "train/loss")
    assert [h.step for h in history] == list(range(1, 61))  # per-step loss from the worker
    assert history[-1].value < history[0].value
    artifacts = {a.path for a in client.list_artifacts(first_run.run_id, "reports")}
    assert {"reports/validation_report.json", "reports/validation_report.md", "reports/eval_report.json"} <= artifacts


def test_ray_leaves_the_driver_logging_alone(first_run):
    """Ray's logging config is for its workers: on the driver it gave the root logger a handler and
    the level ERROR, and every error Prefect logged came out twice (once in Ray's format)."""
    import logging

    import ray

    assert ray.is_initialized()
    root = logging.getLogger()
    assert root.level < logging.ERROR
    assert not [h for h in root.handlers if any(type(f).__name__ == "CoreContextFilter" for f in h.filters)]


def test_first_run_reads_well_in_mlflow(first_run):
    """Named for what it is, the curve and a handful of headline figures as metrics (the rest one
    table), params once, each split's own dataset digest, the base by its id, a short version
    with few tags, the audit trail in one run."""
    from mlflow import MlflowClient
    from prefect_lora.lora_tasks.registry import aliases, registry, tracking

    client = MlflowClient(first_run.tracking_uri)
    run = client.get_run(first_run.run_id)
    assert run.info.run_name == "tiny-sums v1 promoted" and run.data.tags["promotion.decision"] == "promoted"
    headline = {"task_gain", "task_gain_ci_low", "task_gain_ci_high", "adapted_eval_loss", "reference_kl",
                "reference_perplexity_ratio"}
    assert {k for k in run.data.metrics if not k.startswith("system/")} == {"train/loss", "train/lr", *headline}
    assert run.data.metrics["task_gain_ci_low"] < run.data.metrics["task_gain"] < run.data.metrics["task_gain_ci_high"]
    table = json.loads(Path(client.download_artifacts(first_run.run_id, tracking.METRICS_TABLE)).read_text())
    rows = {r[0]: r for r in table["data"]}
    assert rows["task_gain"][2] < rows["task_gain"][1] < rows["task_gain"][3]  # value inside its interval
    assert rows["base_eval_loss"][1] == pytest.approx(first_run.metrics["base_eval_loss"])
    assert rows["eval_seconds"][1] > 0
    figures = tracking.run_figures(first_run.tracking_uri, first_run.run_id)  # metrics and table, flat names
    assert figures["train_step"] == 60 and figures["base_eval_loss_ci_low"] < figures["base_eval_loss"]
    comparison = json.loads(Path(client.download_artifacts(first_run.run_id, "reports/comparison.json")).read_text())
    assert comparison["columns"] == ["metric", "base", "adapted"]
    assert {r[0] for r in comparison["data"]} >= {"eval_loss", "task_gain", "reference_kl"}
    params = run.data.params
    assert "training.seed" in params and "seed" not in params and "max_seq_length" not in params
    datasets = {d.dataset.name: d for d in run.inputs.dataset_inputs}
    assert set(datasets) == {"tiny-sums-train", "tiny-sums-eval"}
    train, eval_ = datasets["tiny-sums-train"], datasets["tiny-sums-eval"]
    assert train.dataset.digest != eval_.dataset.digest, "each split carries the digest of its own rows"
    assert run.data.tags["lineage.data_fingerprint"][:32] not in (train.dataset.digest, eval_.dataset.digest)
    assert json.loads(train.dataset.profile) == {"num_rows": int(rows["train_rows"][1])}
    assert [c["name"] for c in json.loads(train.dataset.schema)["mlflow_colspec"]] == ["prompt", "completion"]
    assert {t.value for t in train.tags} == {"training"}
    assert run.data.tags["lineage.base_model"] == "builtin:tiny-llama", "the base by its name, not a cache path"

    version = client.get_model_version("tiny-sums", "1")
    assert len(version.tags) <= 15, sorted(version.tags)
    assert version.description.startswith("Promoted to champion: eval_loss ") and "\n\n- " in version.description
    assert registry.get_version(first_run.tracking_uri, "tiny-sums", "1").metrics["task_gain_ci_low"] > 0

    model = client.get_registered_model("tiny-sums")
    assert not [k for k in model.tags if k.startswith("prefect_lora.alias_audit.")]
    moves = aliases.alias_history(first_run.tracking_uri, "tiny-sums")
    assert [(r["alias"], r["action"], r["to_version"]) for r in moves][:2] == [
        ("champion", "auto-promote", "1"), ("challenger", "admit", "1")]
    audit = client.get_run(model.tags[aliases.AUDIT_RUN_TAG])
    assert audit.info.experiment_id == client.get_experiment_by_name(aliases.AUDIT_EXPERIMENT).experiment_id, \
        "the audit run stays out of the model's experiment, whose latest run is the pipeline's"
    files = [a.path for a in client.list_artifacts(audit.info.run_id, aliases.AUDIT_DIR)]
    assert len(files) == len(moves) and "-champion-auto-promote-v1-" in files[0]


def test_the_logged_model_says_what_it_is_on_which_data_and_how_it_scored(first_run):
    """Named and described (base, task, decision), its final figures its metrics on the datasets
    they were measured on, no system metric from the start of the run, linked to its version."""
    from mlflow import MlflowClient

    client = MlflowClient(first_run.tracking_uri)
    version = client.get_model_version("tiny-sums", "1")
    logged = client.get_logged_model(version.model_id or version.source.removeprefix("models:/"))  # SQLite: no model_id
    assert logged.name == "tiny-sums-adapter" and logged.source_run_id == first_run.run_id
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "tiny-sums", "version": "1"}]
    about = logged.tags["mlflow.note.content"]
    assert about.startswith("LoRA adapter of `tiny-sums` (causal_lm) on the base model builtin:tiny-llama "
                            "(content sha256 ")
    assert "Version 1: Promoted to champion" in about
    on = {m.key: m.dataset_name for m in logged.metrics}
    assert on == {"train/loss": "tiny-sums-train", "task_gain": "tiny-sums-eval", "task_gain_ci_low": "tiny-sums-eval",
                  "task_gain_ci_high": "tiny-sums-eval", "adapted_eval_loss": "tiny-sums-eval",
                  "reference_kl": None, "reference_perplexity_ratio": None}
    loss = client.get_metric_history(first_run.run_id, "train/loss")
    assert [h.step for h in loss] == list(range(1, 61)), "the model's final loss is the curve's own last point"
    assert next(m for m in logged.metrics if m.key == "train/loss").value == loss[-1].value
    run = client.get_run(first_run.run_id)
    assert [(o.model_id, o.step) for o in run.outputs.model_outputs] == [(logged.model_id, 60)]
    assert len(client.search_runs([run.info.experiment_id])) == 1, "logging the model started no run of its own"


def test_the_runs_list_has_a_view_of_decisions_and_headline_figures(first_run):
    from mlflow import MlflowClient
    from prefect_lora.lora_tasks.registry import tracking

    client = MlflowClient(first_run.tracking_uri)
    exp = client.get_run(first_run.run_id).info.experiment_id
    view = json.loads(client.get_experiment(exp).tags[f"mlflow.sharedViewState.{tracking.RUNS_VIEW}"])
    columns = json.loads(view["state"])["selectedColumns"]
    assert columns[:3] == ["tags.`promotion.decision`", "metrics.`task_gain`", "metrics.`task_gain_ci_low`"]
    assert {"metrics.`adapted_eval_loss`", "metrics.`reference_kl`"} <= set(columns)
    assert tracking.runs_page(first_run.tracking_uri, first_run.run_id).endswith(
        f"/#/experiments/{exp}/runs?viewStateShareKey={tracking.RUNS_VIEW}&workflowType=machine_learning")


def test_champion_loads_and_predicts_through_pyfunc(first_run):
    import mlflow

    mlflow.set_tracking_uri(first_run.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/tiny-sums@champion")
    out = model.predict({"prompt": ["What is 12 plus 30? Answer:", "Add 40 and 2. Answer:"]}, params={"max_new_tokens": 4})
    assert list(out.columns) == ["completion"] and len(out) == 2
    assert all(isinstance(x, str) for x in out["completion"])


def test_run_folder_keeps_every_result(first_run):
    run_dir = Path(first_run.run_dir)
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "validation_report.json").exists()
    assert json.loads((run_dir / "eval_report.json").read_text())["task_gain"] > 0
    assert list((run_dir / "train").glob("checkpoint_*/adapter/adapter_config.json"))


def test_summary_artifact_published(first_run):
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["retrain-tiny-sums"])))

    artifacts = asyncio.run(read())
    assert artifacts and "version 1" in artifacts[0].data and "promoted" in artifacts[0].data


def test_second_run_that_cannot_pass_keeps_champion(first_run, workdir):
    from mlflow import MlflowClient
    from prefect_lora.flows.retrain import retrain

    result = retrain(str(write_config(workdir, "tiny")), ["promotion.min_task_gain=100"])
    assert result.promoted is False and result.version == "2"
    client = MlflowClient(result.tracking_uri)
    assert str(client.get_model_version_by_alias("tiny-sums", "champion").version) == "1"
    assert str(client.get_model_version_by_alias("tiny-sums", "challenger").version) == "1", \
        "a version refused for its gain never takes canary traffic"
    v2 = client.get_model_version("tiny-sums", "2")
    assert v2.tags["promotion.decision"] == "rejected"
    assert client.get_run(result.run_id).info.run_name == "tiny-sums v2 refused"
    assert "not above the required 100" in v2.tags["promotion.reasons"]
    assert flow_run_of(result).state.message.startswith("tiny-sums v2 not promoted (failed: task_gain): eval_loss -0.")


def test_an_unchanged_rerun_of_a_refused_config_is_skipped_and_registers_nothing(first_run, workdir):
    """The config refused above (version 2, its champion version 1 of another config) again on the
    same data: skipped on the latest decided version, not evaluated and registered once more as it
    was on every scheduled run."""
    from mlflow import MlflowClient
    from prefect_lora.flows.retrain import retrain
    from prefect_lora.lora_tasks.registry import registry

    uri = first_run.tracking_uri
    before = registry.list_versions(uri, "tiny-sums")
    assert before[-1] == "2", before  # the refused version of test_second_run_that_cannot_pass_keeps_champion
    result = retrain(str(write_config(workdir, "tiny")), ["promotion.min_task_gain=100"])
    assert result.skipped and result.promoted is False, result.reasons
    assert result.version == "2" and result.champion_before == "1"
    assert "equal those of version 2, which the gate did not promote; new data, a changed config or force" \
        in result.reasons[0]
    assert registry.list_versions(uri, "tiny-sums") == before, "no duplicate version registered"
    client = MlflowClient(uri)
    skip = client.get_run(result.run_id)
    tags = skip.data.tags
    assert tags["promotion.decision"] == "skipped" and tags["promotion.repeats"] == "2"
    assert skip.info.run_name == "tiny-sums skipped: nothing new since v2"
    assert json.loads(client.get_model_version("tiny-sums", "2").tags["schedule.last_skip"])["run_id"] == result.run_id
    assert "champion version 1 stays" in result.summary
    assert str(client.get_model_version_by_alias("tiny-sums", "champion").version) == "1"


def test_rerun_with_unchanged_data_and_config_is_skipped(first_run, workdir):
    """The skip returns a Completed state whose data is the run's result: the champion stays."""
    from prefect_lora.flows.retrain import retrain
    from prefect_lora.lora_tasks.registry.lifecycle import SKIPPED_MESSAGE, RunResult

    result = retrain(str(write_config(workdir, "tiny")))
    assert isinstance(result, RunResult) and result.skipped and result.promoted is False
    assert result.version == "1" == result.champion_before and result.run_id != first_run.run_id
    assert result.reasons[0].startswith(SKIPPED_MESSAGE) and "champion version 1" in result.summary
    assert "champion version 1;" in result.reasons[0], "the champion is named though a refused version is newer"
    assert flow_run_of(result).state.message == \
        "tiny-sums skipped: no new data (champion version 1 has the same data and config)"


def test_classification_flow_on_two_workers(harness, workdir):
    from prefect_lora.flows.retrain import retrain

    rows = [{"text": f"{w} review number {i}", "label": int(w == "great")} for i, w in
            enumerate(["great", "awful"] * 60)]
    data = workdir / "cls.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = write_config(
        workdir, "cls", model_name="tiny-cls", task="sequence_classification",
        data={"train_path": str(data), "text_column": "text", "label_column": "label", "labels": [0, 1],
              "prompt_column": None, "completion_column": None, "eval_fraction": 0.2},
        training={"max_steps": 30, "learning_rate": 5e-3, "batch_size": 8},
    )
    result = retrain(str(path))
    m = result.metrics
    assert m["adapted_accuracy"] >= 0.9, m
    # the base row is the better of the majority class and the linear probe, both logged beside it
    assert m["base_accuracy"] == max(m["baseline_majority_accuracy"], m["baseline_probe_accuracy"])
    assert m["reference_retrieval_pairs"] == 20 and 0 <= m["reference_retrieval_base"] <= 1
    assert result.version == "1"


def test_bad_data_fails_the_cli_run_naming_rows_and_checks(workdir):
    bad = workdir / "bad.jsonl"
    rows = [{"text": "fine text one", "label": 0}, {"text": None, "label": 1}, {"text": "   ", "label": 0},
            {"text": "unknown label row", "label": 7}, {"text": "repeated across splits", "label": 1},
            {"text": "fine text two", "label": 1}]
    bad.write_text("".join(json.dumps(r) + "\n" for r in rows))
    bad_eval = workdir / "bad_eval.jsonl"
    bad_eval.write_text(json.dumps({"text": "repeated across splits", "label": 1}) + "\n"
                        + json.dumps({"text": "an eval row", "label": 0}) + "\n")
    path = write_config(
        workdir, "bad", model_name="bad-data", task="sequence_classification",
        data={"train_path": str(bad), "eval_path": str(bad_eval), "labels": [0, 1],
              "prompt_column": None, "completion_column": None},
    )
    env = {**os.environ, "PREFECT_HOME": str(workdir / "prefect-home")}
    proc = subprocess.run([sys.executable, "-m", "prefect_lora.flows.cli", "run", str(path)], capture_output=True, text=True,
                          env=env, timeout=300, cwd=workdir)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 3, out  # the data broke its contract
    assert "Traceback" not in out
    # every offending row (split, 1-based row, column) and every check is named
    for split, row, column, check in [("train", 2, "text", "null_value"), ("train", 3, "text", "blank_text"),
                                      ("train", 4, "label", "label_not_in_set"),
                                      ("eval", 1, "text", "train_eval_overlap")]:
        assert re.search(rf"{split}\s+{row}\s+{column}\b", out), (split, row, out)
        assert check in out, (check, out)
    assert "4 of 8 rows are invalid" in out


def test_flow_run_is_named_and_tagged_for_its_model_and_decision(first_run):
    """The Prefect UI lists the run as `<model>-<run key>` from its first log line on, then, when it
    ends, with its outcome after the name (what the runs list shows), tagged with the model and the
    decision; its state's message is the outcome in one line; the MLflow run links back to it."""
    from mlflow import MlflowClient

    tags = MlflowClient(first_run.tracking_uri).get_run(first_run.run_id).data.tags
    run = flow_run_of(first_run)
    assert flow_run_logs(run.id)[0] == f"Beginning flow run 'tiny-sums-{tags['lora.run_key']}' for flow 'lora-retrain'"
    assert run.state.is_completed()
    message = run.state.message
    assert re.fullmatch(r"tiny-sums v1 promoted: eval_loss -0\.\d+ \[-0\.\d+, -0\.\d+\]; forgetting within limits "
                        r"\(reference_perplexity_ratio \d\.\d+, reference_kl 0\.\d+\)", message), message
    assert run.name == f"tiny-sums-{tags['lora.run_key']} — {run.state.message.removeprefix('tiny-sums ')}"
    assert {"tiny-sums", "promoted"} <= set(run.tags)
    assert tags["prefect.flow_run_url"].endswith(f"/runs/flow-run/{run.id}")  # the test harness serves a UI
    assert f"- flow run: [{run.id}]({tags['prefect.flow_run_url']})" in tags["mlflow.note.content"]


def test_flow_run_log_has_training_and_evaluation_progress_in_rounded_sentences(first_run):
    """What the terminal shows goes to the flow run's log: the Ray workers' training progress (every
    tenth of the 60 steps), each evaluation phase with its figures; no figure longer than 4
    significant digits."""
    lines = flow_run_logs(flow_run_of(first_run).id)
    steps = [re.match(r"training step (\d+)/60 \(\d+%\): loss (\d+\.?\d*), [\d,]+ tokens/s", line) for line in lines]
    steps = [(int(m.group(1)), float(m.group(2))) for m in steps if m]
    assert {1, 6, 12, 18, 24, 30, 36, 42, 48, 54, 60} <= {s for s, _ in steps}, lines  # rank 0's, via the driver
    assert steps[-1][1] < steps[0][1]
    assert "training 60 steps on 2 worker(s) in " in "\n".join(lines)
    for phase in (r"evaluating adapted, base at scale 1 on 60 eval rows: task scores, then forgetting",
                  r"adapted's task scores on 60 eval rows: eval_loss \d\.\d+ \(",
                  r"base's task scores on 60 eval rows: eval_loss \d\.\d+ \(",
                  r"forgetting on the reference corpus \(\d+ s\): adapted reference_kl 0\.\d+ \[",
                  r"evaluated on 60 eval rows: eval_loss \d\.\d+ → \d\.\d+ \(-0\.\d+ \["):
        assert any(re.match(phase, line) for line in lines), (phase, lines)
    long = [(n, line) for line in lines for n in FLOAT.findall(line) if significant_digits(n) > 4]
    assert not long, long


def test_mlflow_ui_shows_the_run_in_a_browser(first_run, tmp_path):
    """The MLflow UI itself, in headless Chromium: the champion's version page, the run's datasets,
    its chart sections and loss curve, the report's plots and the logged model's version link."""
    pytest.importorskip("playwright", reason="the browser check drives Chromium with Playwright (pip install playwright)")
    from prefect_lora.deploy.ui_check import check_mlflow_ui, find_chromium

    if not find_chromium():
        pytest.skip("no Chromium on PATH (apt-get install chromium): the browser check cannot run")
    found = check_mlflow_ui(first_run.tracking_uri, "tiny-sums", tmp_path)
    print("\n" + "\n".join(f"ok {p}" for p in found.passed))
    assert not found.failed, found.failed
    assert len(found.passed) >= 7 and all(s.stat().st_size > 10_000 for s in found.screenshots)
