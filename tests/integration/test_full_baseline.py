"""Full fine-tuning as a baseline: every weight trains, the whole model is saved in the run's
`adapter/` folder (safetensors), resume continues from it, evaluation compares it with a
separately loaded base, and the flow logs the run without registering or promoting anything."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
ROWS = [json.loads(line) for line in (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text().splitlines()]


def tiny_cfg(workdir: Path | None = None, **training):
    from prefect_lora.lora_tasks.config import config_from_dict

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["evaluation"]["reference"] = {"path": str(REPO / "configs" / "data" / "reference_general.txt"), "max_tokens": 1024,
                                      "benchmarks": [str(REPO / "configs" / "data" / "mc_general.jsonl")]}
    raw["evaluation"]["bootstrap_samples"] = 200
    raw["promotion"]["underpowered"] = "warn"  # 40 questions cannot show a 0.05 drop (lora_tasks/measurement/power.py)
    raw["training"].update({"method": "full", "max_steps": 8, "learning_rate": 1e-3, **training})
    raw["scaling"]["num_workers"] = 1
    if workdir is not None:
        raw["scaling"]["storage_path"] = str(workdir / "runs")
        raw["tracking"] = {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "artifact_location": str(workdir / "mlartifacts")}
    return raw, config_from_dict(raw)


def train(cfg, out: Path, resume_from: str | None = None, keep_checkpoint: Path | None = None) -> dict:
    from prefect_lora.lora_tasks.training.loop import ADAPTER_DIR, WorkerContext, train_worker

    def keep(metrics, checkpoint_dir):
        if checkpoint_dir:
            shutil.copytree(Path(checkpoint_dir) / ADAPTER_DIR, out, dirs_exist_ok=True)
            if keep_checkpoint is not None:
                shutil.copytree(checkpoint_dir, keep_checkpoint, dirs_exist_ok=True)

    return train_worker(cfg, ROWS[:200], WorkerContext(report=keep, resume_from=resume_from))


def test_full_fine_tuning_saves_the_whole_model_resumes_and_is_compared_with_its_base(tmp_path):
    from prefect_lora.lora_tasks.measurement.evaluation import evaluate_adapter
    from safetensors.torch import load_file

    _, cfg = tiny_cfg()
    first = train(cfg, tmp_path / "full", keep_checkpoint=tmp_path / "ckpt")
    files = {p.name for p in (tmp_path / "full").iterdir()}
    assert {"config.json", "model.safetensors"} <= files and "adapter_config.json" not in files
    weights = load_file(str(tmp_path / "full" / "model.safetensors"))
    assert any("embed_tokens" in k for k in weights) and any("layers.1.mlp" in k for k in weights)

    # Resume: 4 more steps from the step-8 checkpoint (the whole model and the optimizer state).
    _, longer = tiny_cfg(max_steps=12)
    resumed = train(longer, tmp_path / "full12", resume_from=str(tmp_path / "ckpt"))
    assert first["step"] == 8 and resumed["start_step"] == 8 and resumed["step"] == 12

    report = evaluate_adapter(cfg, str(tmp_path / "full"), ROWS[300:340])
    assert report.method == "full" and report.task_gain > 0
    assert report.forgetting["reference_kl"] > 0 and "benchmark_mc_general_accuracy_drop" in report.forgetting
    low, high = report.intervals["reference_kl"][1:]
    assert 0 < low <= report.forgetting["reference_kl"] <= high


@pytest.fixture(scope="module")
def harness():
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=60):
        yield
    import ray

    ray.shutdown()


def test_the_flow_logs_a_full_run_as_a_baseline_and_registers_nothing(harness, tmp_path):
    from mlflow import MlflowClient
    from prefect_lora.flows.retrain import retrain

    raw, _ = tiny_cfg(tmp_path)
    path = tmp_path / "full.yaml"
    path.write_text(yaml.safe_dump(raw))
    result = retrain(str(path))
    assert result.version is None and result.promoted is False and result.method == "full"
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    run = client.get_run(result.run_id)
    assert run.data.tags["training.method"] == "full" and run.data.tags["promotion.decision"] == "baseline"
    assert run.info.status == "FINISHED"
    assert "adapted_eval_loss" in run.data.metrics and "reference_kl" in run.data.metrics
    assert run.info.run_name == f"{raw['model_name']} full fine-tuning baseline"
    intervals = {r[0]: r for r in json.loads(Path(client.download_artifacts(result.run_id, "reports/metrics.json")).read_text())["data"]}
    assert intervals["reference_kl"][3] >= intervals["reference_kl"][1]  # its upper bound
    reports = {a.path for a in client.list_artifacts(result.run_id, "reports")}
    assert "reports/evaluation_report.md" in reports and "reports/gain_vs_forgetting.png" in reports
    assert client.search_model_versions(f"name='{raw['model_name']}'") == []
    from uuid import UUID

    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as prefect:  # the Prefect runs list: the outcome after the run's name
        flow_run = prefect.read_flow_run(UUID(run.data.tags["prefect.flow_run_id"]))
    outcome = "full fine-tuning baseline (not registered): eval_loss -"
    assert flow_run.state.message.startswith(f"{raw['model_name']} {outcome}"), flow_run.state.message
    assert flow_run.name.endswith(" — " + flow_run.state.message.removeprefix(f"{raw['model_name']} "))
    assert "baseline" in flow_run.tags
