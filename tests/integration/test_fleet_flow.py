"""A fleet in one flow run: every member its own registered model and gate; a broken member and a
refused one stop none of the others; the second run skips the unchanged ones, the refused one too."""

from __future__ import annotations

import asyncio
import json
import os
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

    ray.shutdown()  # the concurrent members' local Ray


def _shared_config(tmp_path: Path, **scaling) -> Path:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    raw["training"]["max_steps"] = 20
    raw["scaling"].update({"num_workers": 1, "storage_path": str(tmp_path / "runs"), **scaling})
    raw["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "art")}
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(raw))
    return tmp_path / "shared.yaml"


def test_a_fleet_runs_every_member_and_one_failure_stops_none(harness, tmp_path):
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect_lora.flows.fleet import retrain_fleet

    _shared_config(tmp_path)
    rows = [json.loads(line) for line in (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text().splitlines()]
    rows[3]["completion"] = "   "
    (tmp_path / "broken.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"config": str(tmp_path / "shared.yaml"), "members": [
        {"name": "sums-good"},
        {"name": "sums-broken", "set": {"data.train_path": str(tmp_path / "broken.jsonl")}},
        {"name": "sums-refused", "set": {"promotion.min_task_gain": 100}}]}))

    first = retrain_fleet(str(fleet))
    assert [(o.name, o.decision) for o in first] == [
        ("sums-good", "promoted"), ("sums-broken", "failed"), ("sums-refused", "not promoted")]
    assert "blank" in first[1].reason and first[2].reason.startswith("task_gain")
    # the evaluated members' gates were decided together, then each completed by its `-gate` run
    assert first[0].p_value < 0.025 < first[2].p_value and first[1].p_value is None
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    assert str(client.get_model_version_by_alias("sums-good", "champion").version) == "1"
    assert "champion" not in client.get_registered_model("sums-refused").aliases
    assert {m.name for m in client.search_registered_models()} == {"sums-good", "sums-refused"}

    second = retrain_fleet(str(fleet))
    assert [o.decision for o in second] == ["skipped", "failed", "skipped"]
    assert second[0].version == "1" and second[2].version == "1"
    assert "version 1, which the gate did not promote" in second[2].reason, second[2].reason
    assert [str(v.version) for v in client.search_model_versions("name = 'sums-refused'")] == ["1"], \
        "a refused member with unchanged data and config registers no duplicate version"

    async def latest_artifacts_and_runs():
        async with get_client() as c:
            return await c.read_latest_artifacts(), await c.read_flow_runs()

    artifacts, runs = asyncio.run(latest_artifacts_and_runs())
    names = sorted(r.name.split(" — ")[0] for r in runs)  # a finished run's outcome follows its name
    assert names.count("sums-good-gate") == 1 and names.count("sums-refused-gate") == 1, names
    assert "sums-broken-gate" not in names, "a member that failed has no gate to complete"
    fleets = sorted((r.name, r.state.message) for r in runs if r.name.startswith("fleet-"))
    assert fleets == [(f"fleet-fleet — {counts}", f"fleet fleet.yaml: {counts}") for counts in
                      ("3 members (1 failed, 1 not promoted, 1 promoted)", "3 members (1 failed, 2 skipped)")], fleets
    gates = {r.name.split(" — ")[0]: r.state.message for r in runs if r.name.split(" — ")[0].endswith("-gate")}
    assert gates["sums-good-gate"].startswith("sums-good v1 promoted: eval_loss -"), gates
    assert gates["sums-refused-gate"].startswith("sums-refused v1 not promoted (failed: task_gain"), gates
    held = [r for r in runs if (r.state.message or "").startswith("sums-good held for the fleet's gate (p-value ")]
    assert len(held) == 1 and held[0].name.endswith(" — " + held[0].state.message.removeprefix("sums-good ")), held
    summaries = [a for a in artifacts if (a.key or "").startswith("fleet-")]
    assert summaries and "[sums-good](http://127.0.0.1:5000/#/experiments/" in summaries[0].data
    assert "| skipped | 1 |" in summaries[0].data
    assert "3 members (1 failed, 2 skipped)" in summaries[0].data
    assert "No member reached its gate in this run" in summaries[0].data
    assert "**sums-refused** (skipped): skipped: no new data" in summaries[0].data


def test_members_run_at_once_each_its_own_ray_train_job(harness, tmp_path):
    """`concurrency: 2` with the Ray launcher: both members' subflows run at the same time, each
    trains in its own Ray Train worker, and each is gated and registered as it would be alone."""
    from mlflow import MlflowClient
    from prefect.client.orchestration import get_client
    from prefect_lora.flows.fleet import retrain_fleet

    shared = _shared_config(tmp_path, launcher="ray")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"config": str(shared), "concurrency": 2, "members": [
        {"name": "sums-a"}, {"name": "sums-b", "set": {"training.seed": 7}}]}))

    outcomes = retrain_fleet(str(fleet))
    assert [(o.name, o.decision) for o in outcomes] == [("sums-a", "promoted"), ("sums-b", "promoted")], outcomes
    client = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db")
    nodes = [client.get_run(o.run_id).data.tags.get("train.worker_nodes") for o in outcomes]
    assert all(n and n != "local" for n in nodes), f"trained on Ray Train, not in the flow's process: {nodes}"

    async def member_runs():
        async with get_client() as c:
            return [r for r in await c.read_flow_runs()  # each retrain run renames itself `<member>-<run key>`
                    if r.name.startswith(("sums-a-", "sums-b-")) and "-gate" not in r.name]

    a, b = sorted(asyncio.run(member_runs()), key=lambda r: r.name)
    assert a.start_time < b.end_time and b.start_time < a.end_time, "the two members' runs overlap in time"
    assert a.parent_task_run_id and b.parent_task_run_id, "each member is a subflow of the fleet's run"


# A member's thread starts the local Ray and ends; the instance must outlive it (Linux sends Ray's
# processes their parent-death SIGKILL when the *thread* that started them ends).
_THREAD_STARTS_RAY = """
import os, threading, psutil, ray
from prefect_lora.lora_tasks.training.distributed import ensure_ray

member = threading.Thread(target=ensure_ray, args=(None, 1))
member.start()
tid = member.native_id
member.join()
while os.path.exists(f"/proc/self/task/{tid}"):  # the thread has ended for the kernel too
    pass
print("task:", ray.get(ray.remote(lambda: 6 * 7).remote(), timeout=120), flush=True)
alive = {p.name() for p in psutil.Process().children() if p.status() != psutil.STATUS_ZOMBIE}
print("alive:", " ".join(sorted(n for n in alive if n in ("gcs_server", "raylet"))), flush=True)
ray.shutdown()
"""


def test_a_local_ray_started_by_a_members_thread_outlives_that_thread(tmp_path):
    env = {**os.environ, "PREFECT_LORA_RAY_TMP": os.environ["PREFECT_LORA_RAY_TMP"] + "-thread"}
    done = subprocess.run([sys.executable, "-c", _THREAD_STARTS_RAY], env=env, cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert "task: 42" in done.stdout and "alive: gcs_server raylet" in done.stdout, done.stdout


def test_the_watcher_emits_for_the_member_whose_data_changed(harness, tmp_path):
    from prefect_lora.flows.fleet import watch_fleet

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["scaling"]["storage_path"] = str(tmp_path / "runs")
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    (tmp_path / "shared.yaml").write_text(yaml.safe_dump(raw))
    text = (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text()
    for name in ("en", "de"):
        (tmp_path / f"{name}.jsonl").write_text(text)
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"config": str(tmp_path / "shared.yaml"), "members": [
        {"name": f"sums-{n}", "set": {"data.train_path": str(tmp_path / f"{n}.jsonl")}} for n in ("en", "de")]}))

    assert watch_fleet(str(fleet)) == [], "the first look records"
    assert watch_fleet(str(fleet)) == []
    (tmp_path / "de.jsonl").write_text(text + json.dumps({"prompt": "1+1=", "completion": "2"}) + "\n")
    from prefect_lora.flows.cli import app
    from typer.testing import CliRunner

    looked = CliRunner().invoke(app, ["watch", str(fleet)])  # what a schedule runs: `prefect-lora watch FLEET`
    assert looked.exit_code == 0 and looked.output.strip().endswith("data changed: sums-de"), looked.output
    assert watch_fleet(str(fleet)) == [], "each change is told once"
    state = json.loads(next((tmp_path / "runs" / "watch").glob("fleet-*.json")).read_text())
    assert set(state) == {"sums-en", "sums-de"}
