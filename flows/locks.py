"""The lock an alias move holds (`prefect_lora.lora_tasks.registry.aliases`): with a Prefect server configured
(`PREFECT_API_URL`), a Prefect global concurrency limit of one slot per registered model,
`prefect-lora-alias-<model>`, which every flow and CLI call on every machine talking to that
server shares; on Prefect's ephemeral API, none (the registry's local file lock)."""

from __future__ import annotations

import contextlib
import re

LOCK_TIMEOUT_S = 120.0


def shared_alias_lock():
    """`lock(model_name)` for `prefect_lora.lora_tasks.registry.aliases`, or None where no Prefect server is configured."""
    from prefect.settings import get_current_settings

    return _prefect_slot if get_current_settings().api.url else None


def limit_name(model_name: str) -> str:
    return "prefect-lora-alias-" + re.sub(r"[^A-Za-z0-9_.-]", "_", model_name)


@contextlib.contextmanager
def _prefect_slot(model_name: str):
    from prefect.client.orchestration import get_client
    from prefect.concurrency.sync import concurrency
    from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

    name = limit_name(model_name)
    with get_client(sync_client=True) as client:
        try:
            client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

            with contextlib.suppress(ObjectAlreadyExists):  # a racing mover created it first
                client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))
    with concurrency(name, occupy=1, timeout_seconds=LOCK_TIMEOUT_S, strict=True):
        yield
