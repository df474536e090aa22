"""prefect.yaml's deployments point at a real flow with parameters it accepts and configs that load."""

import importlib
import inspect
from pathlib import Path

import yaml
from prefect.client.schemas.schedules import CronSchedule

from lora_tasks.config import load_config

REPO = Path(__file__).resolve().parents[2]


def test_deployments_are_wired_to_the_flow():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert spec["deployments"], "at least one deployment"
    for dep in spec["deployments"]:
        path, func = dep["entrypoint"].split(":")
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        flow = getattr(module, func)
        params = inspect.signature(flow.fn).parameters
        assert set(dep["parameters"]) <= set(params), dep["name"]
        load_config(REPO / dep["parameters"]["config_path"])
        for schedule in dep["schedules"]:
            CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone"))  # raises when invalid
        assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}  # queued, never dropped
        assert dep["work_pool"]["name"]


def test_one_deployment_per_registered_model_so_the_limit_is_per_model():
    spec = yaml.safe_load((REPO / "prefect.yaml").read_text())
    models = [load_config(REPO / d["parameters"]["config_path"]).model_name for d in spec["deployments"]]
    assert len(models) == len(set(models)), models
    for dep in spec["deployments"]:
        assert dep["parameters"].get("force") is False  # scheduled runs skip when nothing changed
