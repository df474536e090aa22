"""A real two-node Ray cluster on loopback (`ray start --head` + `ray start --address`), each node
with one CPU: the flow joins it through RAY_ADDRESS, ships its code with the job's runtime_env,
and its two training workers land on different nodes."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from prefect_lora.deploy.testing import free_port
from prefect_lora.lora_tasks.registry.tracking import run_figures

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def two_node_cluster():
    ray = str(Path(sys.executable).with_name("ray"))
    temp = tempfile.mkdtemp(prefix="plray2n-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    port = free_port()
    # Ray's token authentication, as a real cluster should run: every node and the driver share it.
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(16)}
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", f"--port={port}", f"--temp-dir={temp}", "--include-dashboard=false", *common],
                       check=True, env=env, capture_output=True, timeout=120)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{port}", *common],
                       check=True, env=env, capture_output=True, timeout=120)
        yield f"127.0.0.1:{port}", env
    finally:
        # Stop only this cluster's processes (they all carry its temp dir), not other Ray instances.
        subprocess.run(["pkill", "-9", "-f", temp], check=False)


def test_flow_runs_on_an_existing_two_node_cluster(tmp_path, two_node_cluster):
    from mlflow import MlflowClient

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    raw["training"]["max_steps"] = 20
    raw["scaling"].update({"num_workers": 2, "cpus_per_worker": 1, "storage_path": str(tmp_path / "runs")})
    raw["tracking"] = {"tracking_uri": f"sqlite:///{tmp_path}/mlflow.db", "artifact_location": str(tmp_path / "art")}
    cfg = tmp_path / "tiny.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    address, cluster_env = two_node_cluster
    env = {**cluster_env, "RAY_ADDRESS": address, "PREFECT_HOME": str(tmp_path / "prefect")}
    # Run from outside the checkout: the workers get lora_tasks from the job's runtime_env.
    done = subprocess.run([str(Path(sys.executable).with_name("prefect-lora")), "run", str(cfg)],
                          env=env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri, registry_uri=uri)  # explicit: other tests leave a global registry URI behind
    run = c.search_runs([c.get_experiment_by_name("tiny-sums").experiment_id])[0]
    nodes = run.data.tags["train.worker_nodes"].split(",")
    steps = run_figures(uri, run.info.run_id)["train_step"]
    print(f"\nworkers on nodes {nodes}; steps {steps:.0f}")
    assert len(nodes) == 2 and len(set(nodes)) == 2, "the two workers must run on different nodes"
    assert steps == 20
    assert c.get_model_version("tiny-sums", "1").status == "READY"
