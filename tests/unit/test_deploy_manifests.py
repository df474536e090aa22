"""The cluster manifests parse, match the Ray in use, and carry what the flow relies on."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"


def test_raycluster_manifest_matches_the_installed_ray_and_uses_token_auth():
    import ray

    doc = yaml.safe_load((DEPLOY / "k8s" / "raycluster.yaml").read_text())
    assert doc["kind"] == "RayCluster" and doc["apiVersion"] == "ray.io/v1"
    assert doc["spec"]["rayVersion"] == ray.__version__
    assert f"ray:{ray.__version__}" in (DEPLOY / "Dockerfile").read_text()
    pods = [doc["spec"]["headGroupSpec"]] + doc["spec"]["workerGroupSpecs"]
    for group in pods:
        env = {e["name"]: e for e in group["template"]["spec"]["containers"][0]["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token" and "secretKeyRef" in env["RAY_AUTH_TOKEN"]["valueFrom"]
    assert any("nvidia.com/gpu" in g["template"]["spec"]["containers"][0]["resources"]["limits"]
               for g in doc["spec"]["workerGroupSpecs"])


def test_work_pool_template_points_job_pods_at_the_ray_head():
    t = json.loads((DEPLOY / "k8s" / "prefect-work-pool.json").read_text())
    props = t["variables"]["properties"]
    assert props["env"]["default"]["RAY_ADDRESS"].startswith("prefect-lora-ray-head-svc.")
    assert props["image"]["default"].startswith("ghcr.io/")
    assert t["job_configuration"]["job_manifest"]["kind"] == "Job"
