"""One flow run keeps a fleet fresh: every member's retraining as a subflow of its own, in turn
or `concurrency` at a time (on a Ray cluster).

A member whose data and config are unchanged since its champion, or its latest version the gate
decided (promoted or not), is skipped by its own run, and reported `skipped` with that version; a
member that fails (bad data, a broken config, a crash) is reported and the next one runs. With
many members some pass their own gate by chance, so the evaluated members' gates are decided
together (Benjamini–Hochberg at the fleet's `fdr`) before any of them promotes. The fleet's
summary artifact is a table of members with their decision, gain, forgetting and reason.
"""

from __future__ import annotations

import contextvars
import hashlib
import json
import queue
import re
import threading
import time
from dataclasses import replace
from pathlib import Path

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings
from prefect.states import Completed
from prefect_lora.flows.retrain import label_flow_run, register_run, retrain
from prefect_lora.flows.settings import note_interrupted
from prefect_lora.lora_tasks.fleet import (
    Fleet,
    MemberOutcome,
    changed_members,
    data_state,
    fleet_gate,
    gate_line,
    load_fleet,
    member_counts,
    only_members,
    summary_markdown,
)
from prefect_lora.lora_tasks.gate.promotion import FleetGate
from prefect_lora.lora_tasks.modeling import shared_bases
from prefect_lora.lora_tasks.registry.lifecycle import RunResult


@flow(name="lora-fleet", log_prints=True)
def retrain_fleet(fleet_path: str, overrides: list[str] | None = None, force: bool = False,
                  members: list[str] | None = None) -> list[MemberOutcome]:
    """Retrain every member of the fleet FLEET_PATH (each a `lora-retrain` subflow run
    named after it), or only `members` (a data-changed event names one); with `fdr`, each run
    holds after its evaluation and the members' gates are then decided together, each member
    completed by a `lora-register` subflow run named `<member>-gate`. `overrides` apply to
    every member. The run's name and state message end with the members counted by decision."""
    fleet = only_members(load_fleet(fleet_path, overrides), members)
    label_flow_run(f"fleet-{_stem(fleet.path)}" + (f"-{'-'.join(members)}"[:60] if members else ""), ["fleet"])
    # The fleet's own run sends the heartbeats: a member's would cost ~0.5 s to stop, twice per member.
    # The members train and evaluate here on one base: read once, copied per load.
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}), shared_bases():
        outcomes, gate = _run_members(fleet, force)
    ordered = [outcomes[m.name] for m in fleet.members]
    summary = summary_markdown(fleet, ordered, _run_links(ordered), gate)
    create_markdown_artifact(key=f"fleet-{_fleet_key(fleet.path)}", markdown=summary,
                             description=f"fleet of {len(ordered)} members")
    label_flow_run(outcome=member_counts(ordered))  # the runs list shows names, not state messages
    return Completed(message=f"fleet {Path(fleet.path).name}: {member_counts(ordered)}", data=ordered)


def _stem(path: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", Path(path).stem.lower()).strip("-")[:40] or "fleet"


def _fleet_key(path: str) -> str:
    """One key per fleet file (its summary artifact, the watcher's state): `<stem>-<hash of its path>`."""
    return f"{_stem(path)}-{hashlib.sha256(str(Path(path).resolve()).encode()).hexdigest()[:8]}"


DATA_CHANGED = "prefect-lora.member.data-changed"
"""The event the watcher emits for a member whose data changed; a deployment trigger on it runs
`lora-fleet` for that member alone (prefect.yaml, `tiny-fleet-on-new-data`)."""


@flow(name="lora-fleet-watch", log_prints=True)
def watch_fleet(fleet_path: str, overrides: list[str] | None = None) -> list[str]:
    """Look at every member's data files (size and modification time) and emit `DATA_CHANGED`
    for each member whose data changed since the previous look; the first look only records.
    Returns the members it emitted for. Run it on an interval (prefect.yaml), or emit the same
    event from whatever writes the data."""
    from prefect.events import emit_event
    from prefect_lora.flows.blocks import read_config

    fleet = load_fleet(fleet_path, overrides)
    log, states, files = get_run_logger(), {}, {}
    for m in fleet.members:
        try:
            cfg = read_config(fleet.config, m.overrides)
        except Exception as exc:  # noqa: BLE001  (a broken member is its own run's error to report)
            log.warning("member %s: config does not load (%s); not watched", m.name, exc)
            continue
        files[m.name] = [p for p in (cfg.data.train_path, cfg.data.eval_path) if p]
        states[m.name] = data_state(files[m.name])
    state_file = Path(read_config(fleet.config).scaling.storage_path) / "watch" / f"{_fleet_key(fleet.path)}.json"
    previous = json.loads(state_file.read_text()) if state_file.is_file() else None
    changed = changed_members(states, previous)
    for name in changed:
        emit_event(event=DATA_CHANGED, payload={"files": files[name]}, resource={
            "prefect.resource.id": f"prefect-lora.member.{name}", "prefect.resource.name": name,
            "prefect-lora.member": name, "prefect-lora.fleet": fleet.path})
        log.info("member %s: data changed (%s): event %s emitted", name, ", ".join(files[name]), DATA_CHANGED)
    state_file.parent.mkdir(parents=True, exist_ok=True)
    state_file.write_text(json.dumps(states, indent=2))  # after the events: a crash before here looks again
    if previous is None:
        log.info("first look at %d members' data: recorded, nothing emitted", len(states))
    return changed


def _run_members(fleet: Fleet, force: bool) -> tuple[dict[str, MemberOutcome], FleetGate | None]:
    """Each member's run, `fleet.concurrency` at a time (held after its evaluation when the
    gates are decided together), then the gate for all of them and each held member's completion."""
    log, hold = get_run_logger(), fleet.fdr is not None

    def first_phase(i: int, member) -> tuple[RunResult | None, MemberOutcome]:
        log.info("member %d/%d: %s", i, len(fleet.members), member.name)
        run = retrain.with_options(flow_run_name=member.name)
        return _run_member(member.name, lambda: run(fleet.config, member.overrides, force, hold=hold))

    if fleet.concurrency > 1 and len(fleet.members) > 1:
        firsts = _at_once([lambda i=i, m=m: first_phase(i, m) for i, m in enumerate(fleet.members, 1)], fleet.concurrency)
    else:
        firsts = [first_phase(i, m) for i, m in enumerate(fleet.members, 1)]
    outcomes = {m.name: outcome for m, (_, outcome) in zip(fleet.members, firsts)}
    held = {m.name: result for m, (result, _) in zip(fleet.members, firsts) if result is not None and result.held}
    gate = fleet_gate(fleet.fdr, [r.gate_p_value for r in held.values() if r.gate_p_value is not None]) if held else None
    if gate:
        log.info("%s", gate_line(fleet, gate))
    for name, result in held.items():  # every member evaluated: gate and complete each
        run = register_run.with_options(flow_run_name=f"{name}-gate")
        _, outcome = _run_member(name, lambda r=result, run=run: run(r.run_dir, fleet_gate=gate))
        outcomes[name] = replace(outcome, seconds=outcome.seconds + outcomes[name].seconds)
    return outcomes, gate


def _at_once(calls: list, concurrency: int) -> list:
    """Each call's result in order, `concurrency` of them running at once, each in a copy of this
    flow run's context (a member's subflow has the fleet's run as its parent). A stop (Ctrl-C,
    SIGTERM) in the waiting thread starts no further call and retries nothing, and its threads
    are daemons, so the process exits without waiting for the members still running. With a
    ThreadPoolExecutor, whose threads are joined at exit, those members trained on after a
    Ctrl-C (a retry on a fresh Ray instance) and logged, failing, into a Prefect server already
    stopped: the test process was still there 150 s after."""
    todo: queue.SimpleQueue = queue.SimpleQueue()
    for i, call in enumerate(calls):
        todo.put((i, contextvars.copy_context(), call))
    results, raised, stopped = [None] * len(calls), {}, threading.Event()

    def work() -> None:
        while not stopped.is_set():
            try:
                i, context, call = todo.get_nowait()
            except queue.Empty:
                return
            try:
                results[i] = context.run(call)
            except BaseException as exc:  # noqa: BLE001  (raised in the waiting thread below)
                raised[i] = exc

    threads = [threading.Thread(target=work, name=f"member-{n}", daemon=True) for n in range(min(concurrency, len(calls)))]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    except BaseException as exc:
        stopped.set()
        if not isinstance(exc, Exception):  # KeyboardInterrupt, or SystemExit from a command's SIGTERM handler
            note_interrupted()
        raise
    if raised:
        raise raised[min(raised)]
    return results


def _run_member(name: str, call) -> tuple[RunResult | None, MemberOutcome]:
    """Run one member's subflow: its result (None when it failed) and its outcome, logged."""
    started = time.perf_counter()
    try:
        result = call()
        outcome = MemberOutcome.of(name, result, time.perf_counter() - started)
    except Exception as exc:  # noqa: BLE001  (one member's failure never stops the others)
        result, outcome = None, MemberOutcome.failure(name, exc, time.perf_counter() - started)
    get_run_logger().info("member %s: %s%s", name, outcome.decision, f" ({outcome.reason})" if outcome.reason else "")
    return result, outcome


def _run_links(outcomes: list[MemberOutcome]) -> dict[str, str]:
    """Each member's MLflow run page, where the store answers (a link is never worth a failure)."""
    from prefect_lora.lora_tasks.registry import tracking

    links = {}
    for o in outcomes:
        if o.run_id and o.tracking_uri:
            try:
                links[o.name] = tracking.run_page(o.tracking_uri, o.run_id)
            except Exception as exc:  # noqa: BLE001
                get_run_logger().warning("no MLflow link for member %s (%s)", o.name, exc)
    return links
