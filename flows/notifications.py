"""Operational signals: a JSON POST to a webhook when a retraining run fails or promotes.

Prefect state hooks call these after the flow ends (in the flow's process). The flow records what
it knows (model, MLflow run and its link, the version it promoted) with `remember`; a task hook
records the step that failed. Posting is best effort: a webhook that is down, slow or answers an
error is logged as a warning and never changes the flow's state."""

from __future__ import annotations

import json
import logging
import os
import urllib.request

from prefect_lora.lora_tasks.secrets import redact_url, scrubbed

WEBHOOK_ENV = "PREFECT_LORA_WEBHOOK_URL"
_RUNS: dict[str, dict] = {}
"""Per flow run id: what the flow knows that its hooks need."""

log = logging.getLogger("prefect_lora.notifications")


def _logger():
    try:
        from prefect import get_run_logger

        return get_run_logger()
    except Exception:  # noqa: BLE001  (no run context: a hook after the run ended)
        return log


def remember(flow_run_id, **facts) -> None:
    if flow_run_id:
        _RUNS.setdefault(str(flow_run_id), {}).update(facts)


def note_failed_task(task, task_run, state) -> None:
    """Task `on_failure` hook: the step that failed (after its retries), for the flow's failure message."""
    remember(task_run.flow_run_id, failed_step=task.name, error=str(state.message or "")[:1000])


def post_json(url: str, payload: dict, timeout_s: float = 5.0) -> bool:
    """POST `payload` as JSON; True when the webhook answered 2xx. Never raises."""
    body = json.dumps(payload, default=str).encode()
    try:  # building the request parses the URL: a malformed one fails here
        req = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json", "User-Agent": "prefect-lora"})
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            ok = 200 <= resp.status < 300
        if not ok:
            _logger().warning("webhook %s answered %s", redact_url(url), resp.status)
        return ok
    except Exception as exc:  # noqa: BLE001  (a notification never fails the flow)
        _logger().warning("could not notify webhook %s: %s", redact_url(url), scrubbed(str(exc), url))
        return False


def _settings(flow_run) -> tuple[dict, dict]:
    """(facts the flow recorded, notification settings) for this flow run; reads the config from
    the run's parameters when the flow failed before it recorded anything."""
    facts = dict(_RUNS.get(str(flow_run.id), {}))
    settings = facts.get("notifications")
    if settings is None:
        try:
            from prefect_lora.flows.blocks import read_config

            params = flow_run.parameters or {}
            cfg = read_config(params["config_path"], params.get("overrides"))
            settings = cfg.notifications.model_dump()
            facts.setdefault("model_name", cfg.model_name)
        except Exception:  # noqa: BLE001  (a broken config is itself the failure being reported)
            settings = {}
    settings = {"on_failure": True, "on_promotion": True, "timeout_s": 5.0, **settings}
    settings["webhook_url"] = (settings.get("webhook_url") or os.environ.get(WEBHOOK_ENV)
                               or _secret_block(settings.get("webhook_secret_block")))
    return facts, settings


def _secret_block(name: str | None) -> str | None:
    """The webhook URL kept in a Prefect Secret block; None (and a warning) when it cannot be read."""
    if not name:
        return None
    try:
        from prefect.blocks.system import Secret

        return Secret.load(name).get()
    except Exception as exc:  # noqa: BLE001  (a notification never fails the flow)
        _logger().warning("could not read the webhook URL from the Prefect Secret block %r: %s", name, exc)
        return None


def _prefect_link(flow_run) -> str | None:
    try:
        from prefect.settings import PREFECT_UI_URL

        ui = PREFECT_UI_URL.value()
        return f"{ui.rstrip('/')}/runs/flow-run/{flow_run.id}" if ui else None
    except Exception:  # noqa: BLE001
        return None


def failure_payload(facts: dict, flow_run, state) -> dict:
    step = facts.get("failed_step") or "flow"
    model = facts.get("model_name") or "unknown model"
    return {
        "event": "failure", "model": model, "failed_step": step,
        "text": f"prefect-lora: {model} retraining failed at step {step}: {facts.get('error') or state.message}",
        "error": facts.get("error") or state.message, "state": state.name,
        "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "prefect_url": _prefect_link(flow_run),
        "mlflow_run_id": facts.get("mlflow_run_id"), "mlflow_run_url": facts.get("mlflow_run_url"),
        "run_dir": facts.get("run_dir"),
    }


def promotion_payload(facts: dict, flow_run) -> dict:
    model, version = facts.get("model_name"), facts.get("version")
    return {
        "event": "promotion", "model": model, "version": version, "champion_before": facts.get("champion_before"),
        "text": f"prefect-lora: {model} version {version} promoted to champion",
        "flow_run_id": str(flow_run.id), "flow_run_name": flow_run.name, "prefect_url": _prefect_link(flow_run),
        "mlflow_run_id": facts.get("mlflow_run_id"), "mlflow_run_url": facts.get("mlflow_run_url"),
    }


def on_failure(flow, flow_run, state) -> None:
    """Flow `on_failure` / `on_crashed` hook."""
    facts, settings = _settings(flow_run)
    if settings["webhook_url"] and settings["on_failure"]:
        post_json(settings["webhook_url"], failure_payload(facts, flow_run, state), settings["timeout_s"])
    _RUNS.pop(str(flow_run.id), None)


def on_completion(flow, flow_run, state) -> None:
    """Flow `on_completion` hook: notify only when this run moved `champion`."""
    facts, settings = _settings(flow_run)
    if facts.get("promoted") and settings["webhook_url"] and settings["on_promotion"]:
        post_json(settings["webhook_url"], promotion_payload(facts, flow_run), settings["timeout_s"])
    _RUNS.pop(str(flow_run.id), None)
