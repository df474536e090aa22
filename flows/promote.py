"""Manual promotion: point `champion` at a registered version, with a reason, audited; optionally
tell a running server to swap now. Only wiring: the work is in `prefect_lora.lora_tasks.registry.aliases`."""

from __future__ import annotations

from prefect import flow, get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect_lora.flows import settings  # noqa: F401  (quiet, non-interactive defaults before prefect loads)
from prefect_lora.flows.locks import shared_alias_lock
from prefect_lora.lora_tasks.config import TrackingConfig
from prefect_lora.lora_tasks.registry import aliases

DEFAULT_TRACKING_URI = TrackingConfig().tracking_uri


@task(name="move-champion", cache_policy=NO_CACHE)
def move_champion(tracking_uri: str, model_name: str, version: str, reason: str, actor: str) -> dict:
    return aliases.promote_version(tracking_uri, model_name, version, reason, actor=actor, lock=shared_alias_lock()).to_dict()


@task(name="notify-server", cache_policy=NO_CACHE, retries=2, retry_delay_seconds=2)
def notify_server(url: str) -> dict:
    from prefect_lora.deploy.serve_core import notify_server as notify

    result = notify(url)
    get_run_logger().info("server now serves %s", result.get("aliases"))
    return result


@flow(name="lora-promote", log_prints=True)
def promote(model_name: str, version: str, reason: str, tracking_uri: str = DEFAULT_TRACKING_URI,
            notify_url: str | None = None) -> dict:
    """Make VERSION of MODEL_NAME the champion (manual, with a reason) and notify a running server."""
    actor = aliases.default_actor(str(flow_run.id or "") or None)
    record = move_champion(tracking_uri, model_name, str(version), reason, actor)
    if notify_url:
        notify_server(notify_url)
    return record
