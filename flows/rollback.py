"""Rollback: point `champion` back at the previous champion (from the audit history) or at a
named version; audited; optionally tell a running server to swap now. Only wiring.

`from_version` rolls back only while that version is champion: an automation acting on a served
rollout's `prefect-lora.rollout.rollback-requested` event (prefect.yaml) moves back the version
the rollout watched, never a newer promotion."""

from __future__ import annotations

from prefect import flow, task
from prefect.cache_policies import NO_CACHE
from prefect.runtime import flow_run
from prefect_lora.flows import settings  # noqa: F401  (quiet, non-interactive defaults before prefect loads)
from prefect_lora.flows.locks import shared_alias_lock
from prefect_lora.flows.promote import DEFAULT_TRACKING_URI, notify_server
from prefect_lora.lora_tasks.registry import aliases


@task(name="rollback-champion", cache_policy=NO_CACHE)
def rollback_champion(tracking_uri: str, model_name: str, to_version: str | None, reason: str | None, actor: str,
                      from_version: str | None = None) -> dict:
    return aliases.rollback_champion(tracking_uri, model_name, to_version, reason, actor=actor,
                                     lock=shared_alias_lock(), from_version=from_version).to_dict()


@flow(name="lora-rollback", log_prints=True)
def rollback(model_name: str, to_version: str | None = None, reason: str | None = None,
             tracking_uri: str = DEFAULT_TRACKING_URI, notify_url: str | None = None,
             from_version: str | None = None) -> dict:
    """Move MODEL_NAME's champion back (to the previous champion by default; only while it is
    `from_version`, when given) and notify a running server."""
    actor = aliases.default_actor(str(flow_run.id or "") or None)
    record = rollback_champion(tracking_uri, model_name, to_version, reason, actor, from_version)
    if notify_url:
        notify_server(notify_url)
    return record
