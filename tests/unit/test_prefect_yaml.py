"""prefect.yaml's deployments point at a real flow with parameters it accepts, configs and fleets
that load, schedules and triggers Prefect accepts."""

import importlib
import inspect
from pathlib import Path

import pytest
import yaml
from prefect.client.schemas.schedules import CronSchedule, IntervalSchedule
from prefect.events.schemas.deployment_triggers import DeploymentEventTrigger
from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.fleet import load_fleet

REPO = Path(__file__).resolve().parents[2]
SPEC = yaml.safe_load((REPO / "prefect.yaml").read_text())


def _models(dep: dict) -> list[str]:
    """The registered models a deployment's runs may move the champion of."""
    params = dep["parameters"]
    if "config_path" in params:
        return [load_config(REPO / params["config_path"]).model_name]
    if "fleet_path" in params:
        return [m.name for m in load_fleet(REPO / params["fleet_path"]).members]
    return [params["model_name"]]


@pytest.mark.parametrize("dep", SPEC["deployments"], ids=lambda d: d["name"])
def test_deployments_are_wired_to_their_flow(dep, monkeypatch):
    monkeypatch.chdir(REPO)  # a fleet's paths are relative to the working directory, the worker's checkout
    path, func = dep["entrypoint"].split(":")
    module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
    params = inspect.signature(getattr(module, func).fn).parameters
    assert set(dep["parameters"]) <= set(params)
    assert _models(dep)
    for schedule in dep.get("schedules", []):  # raises when invalid
        CronSchedule(cron=schedule["cron"], timezone=schedule.get("timezone")) if "cron" in schedule \
            else IntervalSchedule(interval=schedule["interval"])
    for trigger in dep.get("triggers", []):
        t = DeploymentEventTrigger(**trigger)
        assert set(t.parameters) <= set(params)
    assert dep.get("schedules") or dep.get("triggers"), "every deployment runs on its own"
    assert dep["concurrency_limit"] == {"limit": 1, "collision_strategy": "ENQUEUE"}  # queued, never dropped
    assert dep["work_pool"]["name"]
    if "force" in dep["parameters"]:
        assert dep["parameters"]["force"] is False  # scheduled runs skip when nothing changed


def test_one_scheduled_retraining_per_registered_model(monkeypatch):
    """A model in two scheduled deployments would be retrained twice a night; a fleet's
    event-triggered deployment retrains a member only when its data changed."""
    monkeypatch.chdir(REPO)
    models = [m for d in SPEC["deployments"] if "retrain" in d["entrypoint"] and d.get("schedules") for m in _models(d)]
    assert len(models) == len(set(models)), models


def test_the_data_changed_trigger_matches_the_watchers_event_and_names_the_member():
    from prefect_lora.flows.fleet import DATA_CHANGED

    (dep,) = [d for d in SPEC["deployments"] if d.get("triggers") and d["triggers"][0]["expect"] == [DATA_CHANGED]]
    (trigger,) = dep["triggers"]
    assert trigger["match"]["prefect-lora.fleet"] == dep["parameters"]["fleet_path"]
    assert trigger["parameters"]["members"] == ["{{ event.resource['prefect-lora.member'] }}"]


def test_the_trigger_renders_the_events_member_into_the_flows_parameters():
    """As Prefect's RunDeployment action renders a trigger's parameters from the event."""
    import copy
    import datetime
    import uuid

    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate
    from prefect_lora.flows.fleet import DATA_CHANGED

    (dep,) = [d for d in SPEC["deployments"] if d.get("triggers") and d["triggers"][0]["expect"] == [DATA_CHANGED]]
    params = copy.deepcopy(dep["triggers"][0]["parameters"])
    RunDeployment._upgrade_v1_templates(params)
    event = ReceivedEvent(occurred=datetime.datetime.now(datetime.timezone.utc), event=DATA_CHANGED, id=uuid.uuid4(),
                          resource={"prefect.resource.id": "prefect-lora.member.sums-short",
                                    "prefect-lora.member": "sums-short", "prefect-lora.fleet": "configs/fleets/tiny.yaml"})
    rendered = hydrate(params, HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": event}))
    assert rendered == {"fleet_path": "configs/fleets/tiny.yaml", "members": ["sums-short"]}


def test_a_served_rollouts_rollback_request_runs_the_rollback_flow_for_that_version_only():
    """As Prefect renders the trigger from the event the gateway emits (`rollout_control`): the
    version the rollout watched, the one before it, and the reason with its figures."""
    from prefect.server.events.actions import RunDeployment
    from prefect.server.events.schemas.events import ReceivedEvent
    from prefect.utilities.schema_tools.hydration import HydrationContext, hydrate
    from prefect_lora.deploy.live_export import event
    from prefect_lora.deploy.rollout_control import EVENT_PREFIX

    (dep,) = [d for d in SPEC["deployments"] if d["entrypoint"].endswith("rollback:rollback")]
    (trigger,) = dep["triggers"]
    assert trigger["expect"] == [EVENT_PREFIX + "rollback-requested"]
    reason = "rollback: output-check failures 1.00 [0.57, 1.00] vs 0.02 on the previous version 3, 5 requests vs 95"
    sent = event(EVENT_PREFIX + "rollback-requested", "demo-orders", "4", {"previous_version": "3", "reason": reason})
    assert sent["resource"]["prefect.resource.id"].startswith(trigger["match"]["prefect.resource.id"].rstrip("*"))
    received = ReceivedEvent(**sent)  # (the event carries its id and time)
    params = trigger["parameters"]
    RunDeployment._upgrade_v1_templates(params)
    context = HydrationContext(raise_on_error=True, render_jinja=True, jinja_context={"event": received})
    rendered = hydrate(params, context)
    assert rendered == {"model_name": "demo-orders", "from_version": "4", "to_version": "3", "reason": reason}
