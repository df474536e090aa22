"""Scheduled retraining in operation, all real and on loopback: `prefect server start`, a process
work pool, `prefect deploy --all` of this repository's prefect.yaml, `prefect worker start`,
`prefect deployment run`; `mlflow server` as the tracking server, both servers on PostgreSQL,
MLflow's artifacts in an S3-compatible store (moto's server); an http.server webhook.

One trigger registers and promotes version 1; a second one with unchanged data is skipped; a run
with bad data fails and posts to the webhook naming its step; a run whose tracking server is
stopped after evaluation fails with everything kept, and `prefect-lora register RUN_DIR`
completes it once the server is back. Every process the test starts is stopped, even on failure."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from prefect_lora.deploy.testing import free_port
from services import Receiver, Service, healthy, postgres_database, s3_bucket, wait_for

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
DEPLOYMENT = "lora-retrain/tiny-sums-nightly"


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    """Production-shaped: MLflow and Prefect servers on PostgreSQL (a database each, made for this
    run), artifacts in an S3-compatible object store (moto's server), a process worker."""
    work = tmp_path_factory.mktemp("sched")
    with postgres_database("mlflow") as mlflow_db, postgres_database("prefect") as prefect_db, \
            s3_bucket(work, "mlflow-artifacts") as s3, pytest.MonkeyPatch.context() as mp:
        for k, v in s3.items():  # this process reads artifacts too (downloads, the audit trail)
            mp.setenv(k, v)
        yield from _stack(work, mlflow_db, prefect_db, s3)


def _stack(work: Path, mlflow_db: str, prefect_db: str, s3: dict[str, str]):
    logs = work / "logs"
    logs.mkdir()
    pport, mport = free_port(), free_port()
    api, mlflow_url = f"http://127.0.0.1:{pport}/api", f"http://127.0.0.1:{mport}"
    hook = Receiver()
    env = {**os.environ,
           "PREFECT_HOME": str(work / "prefect-home"), "PREFECT_API_URL": api,
           "PREFECT_SERVER_API_HOST": "127.0.0.1", "PREFECT_SERVER_API_PORT": str(pport),
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",  # the UI on: the browser check opens it
           "PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_PREFETCH_SECONDS": "5",
           "PREFECT_LORA_PROJECT_DIR": str(REPO), "PREFECT_LORA_WEBHOOK_URL": hook.url,
           "PREFECT_LORA_MLFLOW_RETRY_DELAYS": "1,2,4",  # backoff, short enough for a test
           "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
           "PREFECT_LORA_RAY_TMP": os.environ["PREFECT_LORA_RAY_TMP"] + "-sched",
           "PREFECT_API_DATABASE_CONNECTION_URL": prefect_db.replace("+psycopg2", "+asyncpg", 1), **s3}
    env.pop("PREFECT_PROFILE", None)
    mlflow = Service("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", mlflow_db,
                                "--host", "127.0.0.1", "--port", str(mport), "--workers", "1"], env, logs, cwd=work)
    server = Service("prefect-server", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1",
                                        "--port", str(pport)], env, logs)
    worker = Service("worker", [str(BIN / "prefect"), "worker", "start", "--pool", "lora-process", "--type", "process"],
                     env, logs)
    services = [mlflow, server, worker]
    try:
        mlflow.start()
        server.start()
        server.wait_healthy(f"{api}/health")
        mlflow.wait_healthy(f"{mlflow_url}/health")
        for cmd in (["work-pool", "create", "lora-process", "--type", "process"], ["--no-prompt", "deploy", "--all"]):
            proc = subprocess.run(check=False, args=[str(BIN / "prefect"), *cmd], env=env, cwd=REPO, capture_output=True, text=True,
                                  timeout=180)
            assert proc.returncode == 0, proc.stdout + proc.stderr
        worker.start()
        cfg = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
        cfg["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
        cfg["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
        cfg["scaling"].update(num_workers=1, storage_path=str(work / "runs"))
        cfg["training"].update(max_steps=16, warmup_steps=2)
        cfg["tracking"] = {"tracking_uri": mlflow_url, "artifact_location": "s3://mlflow-artifacts/tiny-sums"}
        cfg["retention"] = {"keep_checkpoints": 1}
        config = work / "tiny.yaml"
        config.write_text(yaml.safe_dump(cfg))
        yield {"work": work, "env": env, "api": api, "ui": f"http://127.0.0.1:{pport}", "mlflow": mlflow, "mlflow_url": mlflow_url, "hook": hook,
               "config": config, "worker": worker, "server": server}
    finally:
        for service in reversed(services):
            service.stop()
        hook.close()


def trigger(stack, **params) -> str:
    args = [str(BIN / "prefect"), "deployment", "run", DEPLOYMENT, "--param", f"config_path={stack['config']}"]
    for k, v in params.items():
        args += ["--param", f"{k}={json.dumps(v)}"]
    proc = subprocess.run(args, check=False, env=stack["env"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return re.search(r"UUID: ([0-9a-f-]{36})", proc.stdout).group(1)


def finished(stack, run_id: str, timeout: float = 300) -> dict:
    def state():
        run = httpx.get(f"{stack['api']}/flow_runs/{run_id}", timeout=10).json()
        return run if run["state"]["type"] in ("COMPLETED", "FAILED", "CRASHED", "CANCELLED") else None

    return wait_for(state, timeout, f"flow run {run_id}\nworker log:\n{stack['worker'].tail()}", every=1)


def task_runs(stack, run_id: str) -> list[dict]:
    body = {"flow_runs": {"id": {"any_": [run_id]}}}
    return httpx.post(f"{stack['api']}/task_runs/filter", json=body, timeout=10).json()


def mlflow_client(stack):
    from mlflow import MlflowClient

    return MlflowClient(stack["mlflow_url"], registry_uri=stack["mlflow_url"])


@pytest.fixture(scope="module")
def first(stack):
    run_id = trigger(stack)
    return finished(stack, run_id)


def test_deployed_run_registers_and_promotes_and_notifies(stack, first):
    assert first["state"]["type"] == "COMPLETED", stack["worker"].tail()
    c = mlflow_client(stack)
    champion = c.get_model_version_by_alias("tiny-sums", "champion")
    assert champion.version == "1" and c.get_run(champion.run_id).data.tags["prefect.flow_run_id"] == first["id"]
    assert first["deployment_id"]
    promo = stack["hook"].one("promotion", first["id"], stack["worker"])
    assert len(stack["hook"].events("promotion")) == 1
    assert promo["model"] == "tiny-sums" and promo["version"] == "1"
    assert promo["mlflow_run_url"].startswith(stack["mlflow_url"]) and champion.run_id in promo["mlflow_run_url"]
    print("promotion payload:", json.dumps(promo))
    print(f"first run {first['total_run_time']:.1f}s")


def test_prefect_ui_shows_the_outcome_on_the_runs_list_and_the_progress_in_the_logs(stack, first, tmp_path):
    """The Prefect UI itself, in headless Chromium: the run's decision and gain on the runs list,
    its training and evaluation progress in its logs (what the terminal shows)."""
    pytest.importorskip("playwright", reason="the browser check drives Chromium with Playwright (pip install playwright)")
    from prefect_lora.deploy.ui_check import check_prefect_ui, find_chromium

    if not find_chromium():
        pytest.skip("no Chromium on PATH (apt-get install chromium): the browser check cannot run")
    found = check_prefect_ui(stack["ui"], first["id"], tmp_path)
    print("\n" + "\n".join(f"ok {p}" for p in found.passed))
    assert not found.failed, found.failed
    assert first["name"].startswith("tiny-sums-") and " — v1 promoted: " in first["name"], first["name"]
    assert first["state"]["message"].startswith("tiny-sums v1 promoted: "), first["state"]["message"]


def test_second_trigger_with_unchanged_data_is_skipped(stack, first):
    run = finished(stack, trigger(stack))
    assert run["state"]["type"] == "COMPLETED"
    assert run["state"]["message"] == "tiny-sums skipped: no new data (champion version 1 has the same data and config)"
    names = sorted(t["name"].rsplit("-", 1)[0] for t in task_runs(stack, run["id"]))
    assert "train-adapter" not in names and "record-skip" in names, names
    c = mlflow_client(stack)
    assert [v.version for v in c.search_model_versions("name = 'tiny-sums'")] == ["1"]
    skipped = c.search_runs([c.get_experiment_by_name("tiny-sums").experiment_id],
                            "tags.`promotion.decision` = 'skipped'")
    assert len(skipped) == 1 and "champion version 1" in skipped[0].data.tags["promotion.reasons"]
    assert stack["hook"].events("promotion") and len(stack["hook"].events("promotion")) == 1  # no new promotion
    print(f"skipped run {run['total_run_time']:.1f}s")


def test_failing_run_posts_its_step_to_the_webhook(stack, first):
    bad = stack["work"] / "bad.jsonl"
    bad.write_text("".join(json.dumps(r) + "\n" for r in [{"prompt": None, "completion": " 1"}] +
                           [{"prompt": f"What is {i} plus 1?", "completion": f" {i + 1}"} for i in range(30)]))
    run = finished(stack, trigger(stack, overrides=[f"data.train_path={bad}"]))
    assert run["state"]["type"] == "FAILED"
    fail = stack["hook"].one("failure", run["id"], stack["worker"])
    assert fail["model"] == "tiny-sums" and fail["failed_step"] == "validate-data"
    assert "null_value" in fail["error"] or "contract" in fail["error"], fail
    print("failure payload:", json.dumps(fail))


def test_tracking_server_outage_loses_nothing(stack, first):
    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.data.prepare import run_dir_for

    overrides = ["training.max_steps=17"]  # new training: not skipped, its own run folder
    run_dir = run_dir_for(load_config(stack["config"], overrides))
    run_id = trigger(stack, overrides=overrides)
    wait_for(lambda: (run_dir / "registration.json").exists(), 300, f"evaluation\n{stack['worker'].tail()}", every=0.05)
    stack["mlflow"].stop()  # down from registration on
    try:
        run = finished(stack, run_id)
        assert run["state"]["type"] == "FAILED", stack["worker"].tail()
        pending = json.loads((run_dir / "registration.json").read_text())
        assert pending["status"] in ("pending", "registered")  # "registered" only if the stop came late
        assert (run_dir / "adapter" / "adapter_model.safetensors").exists() and (run_dir / "eval_report.json").exists()
        fail = stack["hook"].one("failure", run_id, stack["worker"])
        assert fail["failed_step"] in ("log-to-mlflow", "register-adapter", "publish-reports", "apply-decision"), fail
        assert pending["run_id"] in fail["mlflow_run_url"]
        attempts = {t["name"].rsplit("-", 1)[0]: t["run_count"] for t in task_runs(stack, run_id)}
        assert attempts[fail["failed_step"]] == 4, attempts  # 1 + 3 retries with backoff 1, 2, 4 s
        print("outage failure payload:", json.dumps(fail), "attempts:", attempts)
    finally:  # back up even when an assertion fails: the tests after this one need it
        stack["mlflow"].start()
        wait_for(lambda: healthy(f"{stack['mlflow_url']}/health"), 120, "mlflow server restart")
    started = time.monotonic()
    proc = subprocess.run(check=False, args=[str(BIN / "prefect-lora"), "register", str(run_dir)], env=stack["env"], cwd=stack["work"],
                          capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out
    assert "version 2" in out and "Traceback" not in out
    print(f"register RUN_DIR took {time.monotonic() - started:.1f}s")
    c = mlflow_client(stack)
    v2 = c.get_model_version("tiny-sums", "2")
    assert v2.run_id == pending["run_id"] and v2.tags["lineage.data_fingerprint"] == pending["tags"]["lineage.data_fingerprint"]
    from prefect_lora.lora_tasks.registry.tracking import run_figures

    metrics = run_figures(stack["mlflow_url"], v2.run_id)
    assert metrics["adapted_eval_loss"] == pytest.approx(pending["report"]["adapted"]["eval_loss"])
    assert v2.tags["promotion.decision"] in ("promoted", "rejected")
    assert c.get_run(v2.run_id).info.status == "FINISHED"
    assert json.loads((run_dir / "registration.json").read_text())["status"] == "done"
    again = subprocess.run([str(BIN / "prefect-lora"), "register", str(run_dir)], check=False, env=stack["env"],
                           cwd=stack["work"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "nothing to do" in again.stdout + again.stderr, again.stdout + again.stderr
    assert [v.version for v in c.search_model_versions("name = 'tiny-sums'")].count("3") == 0  # not registered twice
    # the first run's checkpoints went (keep_checkpoints: 1), its adapter stayed
    first_dir = Path(c.get_run(c.get_model_version("tiny-sums", "1").run_id).data.tags["run_dir"])
    assert not (first_dir / "train").exists() and (first_dir / "adapter" / "adapter_model.safetensors").exists()
    assert (run_dir / "train").exists()


def test_status_and_history_for_operators(stack, first):
    def cli(*args):
        proc = subprocess.run([str(BIN / "prefect-lora"), *args, "--tracking-uri", stack["mlflow_url"]], check=False,
                              env=stack["env"], cwd=stack["work"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        return proc.stdout

    out = cli("status")
    c = mlflow_client(stack)
    champion = c.get_model_version_by_alias("tiny-sums", "champion")
    challenger = c.get_model_version_by_alias("tiny-sums", "challenger")
    one_row = champion.version == challenger.version  # both aliases on one version: one row noting both
    assert re.search(rf"^  champion,?\s+(challenger\s+)?{champion.version}\s", out, re.MULTILINE), out
    assert bool(re.search(rf"^  challenger\s+{challenger.version}\s", out, re.MULTILINE)) != one_row, out
    assert f"version {champion.version}: data {champion.tags['lineage.data_fingerprint'][:12]}" in out, out
    assert "loss" in out.split() and "gain" in out.split(), out
    history = cli("history", "tiny-sums")
    assert "auto-promote" in history, history
    listing = history.split("alias moves")[0]
    assert [line.split()[0] for line in listing.splitlines() if line[:1].isdigit()] == ["1", "2"], history
