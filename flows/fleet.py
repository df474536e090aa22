"""One flow run keeps a fleet fresh: every member's retraining in turn, as a subflow of its own.

A member whose data and config are unchanged since its champion is skipped by its own run; a
member that fails (bad data, a broken config, a crash) is reported and the next one runs. The
fleet's summary artifact is a table of members with their decision, gain and reason.
"""

from __future__ import annotations

import hashlib
import re
import time
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact

from flows.retrain import label_flow_run, retrain
from lora_tasks.fleet import MemberOutcome, load_fleet, summary_markdown


@flow(name="lora-fleet", log_prints=True)
def retrain_fleet(fleet_path: str, overrides: list[str] | None = None, force: bool = False) -> list[MemberOutcome]:
    """Retrain every member of the fleet FLEET_PATH in turn (each a `lora-retrain` subflow run
    named after it); `overrides` apply to every member."""
    fleet = load_fleet(fleet_path, overrides)
    stem = re.sub(r"[^a-z0-9]+", "-", Path(fleet.path).stem.lower()).strip("-")[:40] or "fleet"
    label_flow_run(f"fleet-{stem}", ["fleet"])
    log = get_run_logger()
    outcomes = []
    for i, member in enumerate(fleet.members, 1):
        log.info("member %d/%d: %s", i, len(fleet.members), member.name)
        started = time.perf_counter()
        try:
            result = retrain.with_options(flow_run_name=member.name)(fleet.config, member.overrides, force)
            outcomes.append(MemberOutcome.of(member.name, result, time.perf_counter() - started))
        except Exception as exc:  # noqa: BLE001  (one member's failure never stops the others)
            outcomes.append(MemberOutcome.failure(member.name, exc, time.perf_counter() - started))
        o = outcomes[-1]
        log.info("member %s: %s%s", o.name, o.decision, f" ({o.reason})" if o.reason else "")
    summary = summary_markdown(fleet, outcomes, _run_links(outcomes))
    where = hashlib.sha256(str(Path(fleet.path).resolve()).encode()).hexdigest()[:8]  # one key per fleet file
    key = f"fleet-{stem}-{where}"
    create_markdown_artifact(key=key, markdown=summary, description=f"fleet of {len(outcomes)} members")
    return outcomes


def _run_links(outcomes: list[MemberOutcome]) -> dict[str, str]:
    """Each member's MLflow run page, where the store answers (a link is never worth a failure)."""
    from lora_tasks import tracking

    links = {}
    for o in outcomes:
        if o.run_id and o.tracking_uri:
            try:
                links[o.name] = tracking.run_page(o.tracking_uri, o.run_id)
            except Exception as exc:  # noqa: BLE001
                get_run_logger().warning("no MLflow link for member %s (%s)", o.name, exc)
    return links
