"""Alias moves: compare-and-set under a lock, an audit record per move, promotion and rollback of
the champion. No decisions: the gate's decision comes in, the MLflow writes that act on it go out."""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mlflow import MlflowClient

from ..errors import RegistryError
from ..versions import canonical_version
from .overview import AUDIT_DIR, AUDIT_RUN_TAG, LEGACY_AUDIT_TAG_PREFIX, alias_history  # noqa: F401
from .registry import CHALLENGER, CHAMPION, VersionInfo, get_alias, get_version, require_model
from .tracking import EXPERIMENT_KIND, client, now_iso

# ---------------------------------------------------------------------------------------------
# Alias moves: compare-and-set under a lock, each one with an audit record.
#
# MLflow has no compare-and-set on aliases, so a move is: take a lock, re-read the alias, compare
# it with what the caller decided against, write, re-read to check the write. The lock is the
# caller's (`lock`: a function of the model name returning a context manager): the flows and the
# CLI hand in a Prefect global concurrency slot named after the model when a Prefect server is
# configured, which serialises movers on every machine that talks to it. Without one it is an
# exclusive `flock` on a file next to the SQLite database (or `file:` store), or, for a tracking
# server, in this user's cache: that serialises every mover on this machine only. The re-read
# after the write still reports a concurrent overwrite (`AliasConflict`) instead of hiding it.
# ---------------------------------------------------------------------------------------------

AliasLock = Callable[[str], contextlib.AbstractContextManager]
"""`lock(model_name)`: a context manager held while an alias of that model moves."""


class ChampionChanged(RegistryError):
    """The alias no longer points where the caller's decision assumed: decide again against `current`."""

    def __init__(self, name: str, alias: str, expected: str | None, current: VersionInfo | None):
        self.name, self.alias, self.expected, self.current = name, alias, expected, current
        now = current.version if current else None
        super().__init__(
            f"{alias!r} of {name!r} moved from version {expected} to {now} since the decision was made; "
            "decide again against the new champion"
        )


class AliasConflict(RegistryError):
    """A re-read after the write found another writer's value: the lock was bypassed."""


@dataclass(frozen=True)
class AliasRecord:
    """One audit record: an alias move (or a decision that kept the alias where it was)."""

    name: str
    alias: str
    action: str
    """`auto-promote`, `promote`, `rollback`, or `kept` (a gate decision that did not move it)."""
    from_version: str | None
    to_version: str | None
    reason: str
    actor: str
    """Who: `user@host`, plus the Prefect flow run when one acted."""
    at: str
    """When, UTC ISO-8601."""
    details: dict

    def to_dict(self) -> dict:
        from dataclasses import asdict

        return asdict(self)


def default_actor(flow_run_id: str | None = None) -> str:
    """`user@host`, and the Prefect flow run id when given."""
    import getpass
    import socket

    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001  (no passwd entry in some containers)
        user = str(os.getuid()) if hasattr(os, "getuid") else "unknown"
    who = f"{user}@{socket.gethostname()}"
    return f"{who} (prefect flow run {flow_run_id})" if flow_run_id else who


def _lock_file(tracking_uri: str, name: str) -> Path:
    safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
    if tracking_uri.startswith("sqlite:///"):
        db = Path(tracking_uri.removeprefix("sqlite:///"))
        return db.with_name(f"{db.name}.{safe}.alias.lock")
    if tracking_uri.startswith("file:") or "://" not in tracking_uri:
        root = Path(tracking_uri.removeprefix("file://").removeprefix("file:"))
        return root / f".{safe}.alias.lock"
    import hashlib

    from ..modeling import cache_dir

    return cache_dir() / "locks" / f"{hashlib.sha256(tracking_uri.encode()).hexdigest()[:16]}.{safe}.alias.lock"


@contextlib.contextmanager
def _file_lock(path: Path, name: str, timeout_s: float):
    import fcntl

    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise RegistryError(
                        f"another process holds the alias lock of {name!r} ({path}) for over {timeout_s:.0f}s; "
                        "if no promotion is running, delete that file"
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the flock


def alias_lock(tracking_uri: str, name: str, timeout_s: float = 120.0):
    """The local lock on moving aliases of `name`: a file lock (see the section comment)."""
    return _file_lock(_lock_file(tracking_uri, name), name, timeout_s)


def _hold(lock: AliasLock | None, tracking_uri: str, name: str, timeout_s: float = 120.0):
    return lock(name) if lock is not None else alias_lock(tracking_uri, name, timeout_s)


# The audit trail lives in one MLflow run per registered model (`<name>`, in the experiment
# `prefect-lora-alias-audit`, beside the model's own experiments; the model's tag
# `prefect_lora.audit_run` names it): one JSON file per record under `alias_moves/`, named by
# time, alias, action and version, so the run's artifact list reads as the timeline. A file per
# record is never rewritten: two writers cannot lose each other's records, whatever the lock did.
AUDIT_EXPERIMENT = "prefect-lora-alias-audit"


def _audit_experiment(c: MlflowClient, near_experiment: str) -> str:
    """The audit experiment's id; created with its artifacts under those of `near_experiment`
    (a location this store already writes to), when absent."""
    from mlflow.exceptions import MlflowException

    exp = c.get_experiment_by_name(AUDIT_EXPERIMENT)
    if exp is not None:
        return exp.experiment_id
    location = c.get_experiment(near_experiment).artifact_location.rstrip("/") + "/alias-audit"
    try:
        return c.create_experiment(AUDIT_EXPERIMENT, artifact_location=location, tags=dict([EXPERIMENT_KIND]))
    except MlflowException:  # another mover created it first
        return c.get_experiment_by_name(AUDIT_EXPERIMENT).experiment_id


def _audit_run(c: MlflowClient, name: str, version: str | None) -> str:
    """The id of `name`'s audit run, created (finished) when absent, near the experiment of
    `version`'s run (of the model's newest version with a run when None; MLflow's Default
    experiment, whose artifacts sit in the working directory, only when no version has one)."""
    run_id = c.get_registered_model(name).tags.get(AUDIT_RUN_TAG)
    if run_id:
        return run_id
    versions = [c.get_model_version(name, version)] if version else \
        sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: -int(v.version))
    mv = next((v for v in versions if v.run_id), None)
    near = c.get_run(mv.run_id).info.experiment_id if mv else "0"
    run = c.create_run(_audit_experiment(c, near), run_name=name, tags={
        "prefect_lora.audit_for": name,
        "mlflow.note.content": f"Every alias move of registered model `{name}`, one JSON file per move under `{AUDIT_DIR}/`."})
    c.set_terminated(run.info.run_id)
    c.set_registered_model_tag(name, AUDIT_RUN_TAG, run.info.run_id)
    return run.info.run_id


def _write_audit(c: MlflowClient, record: AliasRecord) -> None:
    import tempfile
    import uuid

    # A refusal with no champion yet moves no version: the candidate's run locates the audit run.
    run_id = _audit_run(c, record.name, record.to_version or record.from_version or record.details.get("candidate"))
    stamp = record.at.replace("-", "").replace(":", "").replace("+0000", "Z")
    file = f"{stamp}-{record.alias}-{record.action}-v{record.to_version}-{uuid.uuid4().hex[:6]}.json"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / file).write_text(json.dumps(record.to_dict(), sort_keys=True, indent=1))
        c.log_artifact(run_id, str(Path(tmp) / file), AUDIT_DIR)


MOVES = ("auto-promote", "promote", "rollback")
"""The actions that move `champion` to another version (the others record a decision)."""


def last_move(tracking_uri: str, name: str, alias: str = CHAMPION) -> dict | None:
    """The latest audit record that moved `alias` (`MOVES`), or None; reads one record, not
    the whole history (the records' file names hold their time, alias and action)."""
    import tempfile

    c = client(tracking_uri)
    model = require_model(c, name)
    if any(k.startswith(LEGACY_AUDIT_TAG_PREFIX) for k in model.tags):
        return next((r for r in reversed(alias_history(tracking_uri, name, alias)) if r.get("action") in MOVES), None)
    run_id = model.tags.get(AUDIT_RUN_TAG)
    names = [Path(f.path).name for f in c.list_artifacts(run_id, AUDIT_DIR)] if run_id else []
    moves = [n for n in names if any(f"-{alias}-{action}-v" in n for action in MOVES)]
    if not moves:
        return None
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(c.download_artifacts(run_id, f"{AUDIT_DIR}/{max(moves)}", tmp)).read_text())


def note(tracking_uri: str, name: str, version: str, *, action: str, reason: str, actor: str | None = None,
         details: dict | None = None, alias: str = CHAMPION) -> AliasRecord:
    """An audit record of a decision about `version` that moves no alias (a staged rollout's
    start, steps and end), so the history reads as one timeline."""
    version = canonical_version(version)
    record = AliasRecord(name, alias, action, version, version, reason, actor or default_actor(), now_iso(),
                         dict(details or {}))
    _write_audit(client(tracking_uri), record)
    return record


def compare_and_set_alias(
    tracking_uri: str, name: str, to_version: str, *, expected: str | None, reason: str, action: str,
    alias: str = CHAMPION, actor: str | None = None, details: dict | None = None, lock_timeout_s: float = 120.0,
    lock: AliasLock | None = None,
) -> AliasRecord:
    """Point `alias` at `to_version` only if it still points at `expected` (None: unset).

    Raises `ChampionChanged` (with the current version) when it moved, `AliasConflict` when a
    re-read after the write shows another writer. Writes an audit record on success."""
    c = client(tracking_uri)
    require_model(c, name)
    to_version = get_version(tracking_uri, name, to_version).version  # exists (or a clear error), canonical
    expected = canonical_version(expected) if expected is not None else None
    with _hold(lock, tracking_uri, name, lock_timeout_s):
        current = get_alias(tracking_uri, name, alias)
        now = current.version if current else None
        if now != expected:
            raise ChampionChanged(name, alias, expected, current)
        c.set_registered_model_alias(name, alias, to_version)
        # The record goes first: the alias never stands moved without one, whatever the re-read finds.
        record = AliasRecord(name, alias, action, now, to_version, reason, actor or default_actor(), now_iso(),
                             dict(details or {}))
        _write_audit(c, record)
        after = get_alias(tracking_uri, name, alias)
        if after is None or after.version != to_version:
            raise AliasConflict(
                f"{alias!r} of {name!r} reads {after.version if after else None} right after it was set to "
                f"{to_version} (audited): another writer moved it without the lock"
            )
    return record


def settle_decision(
    tracking_uri: str, name: str, version: str, decision, champion: VersionInfo | None, redecide,
    *, actor: str | None = None, run_id: str | None = None, max_rounds: int = 5, lock: AliasLock | None = None,
):
    """Act on a gate decision with compare-and-set; re-decide while the champion keeps moving.

    `decision` has `promote` and `reasons`; `redecide(current_champion)` returns a new decision
    for the same candidate against the champion found at write time. Returns the final
    `(decision, champion_it_was_made_against, AliasRecord)`. Every round is tagged and audited."""
    c = client(tracking_uri)
    details = {"run_id": run_id} if run_id else {}
    for round_ in range(max_rounds):
        expected = champion.version if champion else None
        reasons = "\n".join(decision.reasons)[:5000]
        c.set_model_version_tag(name, version, "promotion.decision", "promoted" if decision.promote else "rejected")
        c.set_model_version_tag(name, version, "promotion.reasons", reasons)
        c.set_model_version_tag(name, version, "promotion.champion_compared", str(expected))
        try:
            if decision.promote:
                record = compare_and_set_alias(
                    tracking_uri, name, version, expected=expected, reason=reasons, action="auto-promote",
                    actor=actor, details={**details, "round": round_}, lock=lock,
                )
            else:  # a refusal also must hold against the champion of now: re-check it under the lock
                with _hold(lock, tracking_uri, name):
                    current = get_alias(tracking_uri, name, CHAMPION)
                    if (current.version if current else None) != expected:
                        raise ChampionChanged(name, CHAMPION, expected, current)
                    record = AliasRecord(name, CHAMPION, "kept", expected, expected,
                                         f"version {version} refused: {reasons}", actor or default_actor(), now_iso(),
                                         {**details, "candidate": version, "round": round_})
                    _write_audit(c, record)
            return decision, champion, record
        except ChampionChanged as exc:
            if exc.current is not None and exc.current.version == str(version):  # a retry after our own move
                return decision, exc.current, AliasRecord(name, CHAMPION, "already-champion", str(version), str(version),
                                                          "this version is already the champion", actor or default_actor(),
                                                          now_iso(), details)
            champion = exc.current
            decision = redecide(champion)
    raise RegistryError(f"the champion of {name!r} kept moving during {max_rounds} attempts to settle version {version}")


def move_alias(tracking_uri: str, name: str, version: str, *, alias: str, action: str, reason: str,
               actor: str | None = None, details: dict | None = None, lock: AliasLock | None = None) -> AliasRecord:
    """Point `alias` at `version` whoever holds it now (compare-and-set, read again while it
    keeps moving); audited with `action` and `reason`."""
    version = get_version(tracking_uri, name, version).version
    for _ in range(5):
        current = get_alias(tracking_uri, name, alias)
        try:
            return compare_and_set_alias(tracking_uri, name, version, expected=current.version if current else None,
                                         reason=reason, action=action, alias=alias, actor=actor, details=details,
                                         lock=lock)
        except ChampionChanged:
            continue  # someone moved it between our read and the lock; read again
    raise RegistryError(f"{alias!r} of {name!r} kept moving; try again")


def promote_version(tracking_uri: str, name: str, version: str, reason: str, actor: str | None = None,
                    lock: AliasLock | None = None) -> AliasRecord:
    """Manual promotion: make `version` the champion, whoever holds it now; audited with `reason`."""
    if not reason or not reason.strip():
        raise RegistryError("a manual promotion needs a reason: --reason 'why this version'")
    return move_alias(tracking_uri, name, version, alias=CHAMPION, action="promote", reason=reason, actor=actor,
                      lock=lock)


def set_challenger(tracking_uri: str, name: str, version: str, reason: str, run_id: str | None = None,
                   actor: str | None = None, lock: AliasLock | None = None) -> AliasRecord | None:
    """Make a version the gate admitted the `challenger` (audited like every move); None when it
    already is (a retried task)."""
    current = get_alias(tracking_uri, name, CHALLENGER)
    if current is not None and current.version == canonical_version(version):
        return None
    return move_alias(tracking_uri, name, version, alias=CHALLENGER, action="admit", reason=reason, actor=actor,
                      details={"run_id": run_id} if run_id else None, lock=lock)


def previous_champion(tracking_uri: str, name: str) -> str | None:
    """The version that was champion before the current one, from the audit history."""
    current = get_alias(tracking_uri, name, CHAMPION)
    if current is None:
        return None
    for rec in reversed(alias_history(tracking_uri, name, CHAMPION)):
        if rec.get("to_version") == current.version and rec.get("from_version") not in (None, current.version):
            return rec["from_version"]
    return None


def rollback_champion(
    tracking_uri: str, name: str, to_version: str | None = None, reason: str | None = None, actor: str | None = None,
    lock: AliasLock | None = None, *, from_version: str | None = None, details: dict | None = None,
) -> AliasRecord:
    """Point `champion` back at `to_version`, or at the previous champion by default; audited.
    With `from_version`, only while the champion is still that version (else `ChampionChanged`):
    a staged rollout rolls back the version it watched, never a newer promotion."""
    current = get_alias(tracking_uri, name, CHAMPION)
    if from_version is not None:
        current = get_version(tracking_uri, name, from_version)
    if to_version is None:
        require_model(client(tracking_uri), name)
        to_version = previous_champion(tracking_uri, name)
        if to_version is None:
            raise RegistryError(
                f"{name!r} has no previous champion in its alias history"
                f" (champion is {current.version if current else 'unset'}); name one: rollback {name} --to VERSION"
            )
    reason = reason or f"rollback from version {current.version if current else None}"
    return compare_and_set_alias(tracking_uri, name, str(to_version), expected=current.version if current else None,
                                 reason=reason, action="rollback", actor=actor, details=details, lock=lock)


def protected_versions(tracking_uri: str, name: str) -> set[str]:
    """Versions retention never deletes: the champion, the previous champion, the challenger."""
    found = [get_alias(tracking_uri, name, a) for a in (CHAMPION, CHALLENGER)]
    return {v.version for v in found if v is not None} | {v for v in [previous_champion(tracking_uri, name)] if v}
