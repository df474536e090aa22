"""What an operator reads of the registry, the records `prefect-lora status` and `history` print:
each model's champion and challenger, its versions, its alias moves and kept decisions.

A local SQLite store is read straight from its tables, read-only, without importing MLflow: its
import alone costs ~3 s of CPU, most of what `status` took. A tracking server, or a store this
reader does not know (another schema, MLflow workspaces on, a version registered before its
evaluation was recorded on it, audit files in a remote artifact store), is read through MLflow.
Both give the same records (a test holds them equal)."""

from __future__ import annotations

import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Self
from urllib.parse import unquote, urlparse
from urllib.request import url2pathname

from ..errors import UnknownModel
from ..versions import CHALLENGER, CHAMPION

AUDIT_RUN_TAG = "prefect_lora.audit_run"
"""The registered model's tag naming its audit run, whose artifacts hold one JSON file per alias move."""
AUDIT_DIR = "alias_moves"
LEGACY_AUDIT_TAG_PREFIX = "prefect_lora.alias_audit."
"""Where records were kept before the audit run (one model tag each); still read."""
KEY_METRICS = ("task_gain", "reference_perplexity_ratio", "reference_kl", "self_retention_perplexity_ratio",
               "self_retention_kl", "champion_delta")
"""What `status` shows of a version after its primary metric (`adapted_<primary>`), in this order."""
DELETED = "Deleted_Internal"
"""The stage MLflow's SQL store gives a deleted version (kept as a row, never listed)."""


def version_status(alias: str, version: str, run_id: str | None, created_ms: int | None, tags: dict[str, str],
                   metrics: dict[str, float]) -> dict:
    """What an operator needs about the version behind `alias`: key metrics, lineage, age, decision."""
    primary = tags.get("eval.primary_metric")
    return {"alias": alias, "version": str(version), "run_id": run_id, "created_ms": created_ms,
            "age_s": time.time() - (created_ms or 0) / 1000, "primary_metric": primary,
            "metrics": {k: metrics[k] for k in (f"adapted_{primary}", *KEY_METRICS) if k in metrics},
            "decision": tags.get("promotion.decision"),
            "lineage": {k.removeprefix("lineage."): v for k, v in tags.items() if k.startswith("lineage.")},
            "last_skip": json.loads(tags["schedule.last_skip"]) if tags.get("schedule.last_skip") else None}


def recorded_metrics(tags: dict[str, str]) -> dict[str, float] | None:
    """The headline figures recorded on a version (`registry.record_evaluation`: its primary metric,
    gain, forgetting, lead over the champion), None for a version registered before they were."""
    return json.loads(tags["eval.summary"]) if tags.get("eval.summary") else None


def model_names(tracking_uri: str) -> list[str]:
    """Every registered model in the store, sorted."""
    if (names := _read_locally(tracking_uri, _LocalStore.model_names)) is None:
        from .tracking import client

        names = [m.name for m in client(tracking_uri).search_registered_models(max_results=1000)]
    return sorted(names)


def model_status(tracking_uri: str, name: str) -> dict:
    """Champion and challenger of `name` (None when unset) and its version count."""
    if (found := _read_locally(tracking_uri, lambda store: store.model_status(name))) is not None:
        return found
    from mlflow.exceptions import MlflowException

    from .registry import list_versions, require_model
    from .tracking import client, run_metrics

    c = client(tracking_uri)
    require_model(c, name)
    found = {"name": name, "versions": len(list_versions(tracking_uri, name))}
    for alias in (CHAMPION, CHALLENGER):
        try:
            mv = c.get_model_version_by_alias(name, alias)
        except MlflowException:
            found[alias] = None
            continue
        tags = dict(mv.tags)
        metrics = recorded_metrics(tags) or (run_metrics(tracking_uri, mv.run_id) if mv.run_id else {})
        found[alias] = version_status(alias, mv.version, mv.run_id, mv.creation_timestamp, tags, metrics)
    return found


def versions_overview(tracking_uri: str, name: str) -> list[dict]:
    """Every version of `name`, oldest first: number, creation time (ms), aliases, gate decision,
    its staged rollout where one served it (`rolled-back at 0.25`), run."""
    if (rows := _read_locally(tracking_uri, lambda store: store.versions_overview(name))) is not None:
        return rows
    from .registry import require_model
    from .tracking import client

    c = client(tracking_uri)
    aliases = _by_version(require_model(c, name).aliases)
    return [_version_row(v.version, v.creation_timestamp, aliases, v.tags, v.run_id)
            for v in sorted(c.search_model_versions(f"name = '{name}'"), key=lambda v: int(v.version))]


def alias_history(tracking_uri: str, name: str, alias: str | None = None) -> list[dict]:
    """Every audit record of `name` (alias moves and kept decisions), oldest first."""
    records = _read_locally(tracking_uri, lambda store: store.audit_records(name))
    if records is None:
        records = _audit_records_from_mlflow(tracking_uri, name)
    records.sort(key=lambda r: r.get("at", ""))
    return [r for r in records if alias is None or r.get("alias") == alias]


def _read_locally(tracking_uri: str, read):
    """`read(store)` of the local SQLite store at `tracking_uri`; None where there is none, or it
    cannot answer as MLflow would (then MLflow is asked)."""
    if (store := _LocalStore.open(tracking_uri)) is None:
        return None
    with store:
        return read(store)


def _audit_records_from_mlflow(tracking_uri: str, name: str) -> list[dict]:
    import tempfile

    from .registry import require_model
    from .tracking import client

    c = client(tracking_uri)
    model = require_model(c, name)
    records = _legacy_records(model.tags)
    if model.tags.get(AUDIT_RUN_TAG) and c.list_artifacts(model.tags[AUDIT_RUN_TAG], AUDIT_DIR):
        with tempfile.TemporaryDirectory() as tmp:
            folder = Path(c.download_artifacts(model.tags[AUDIT_RUN_TAG], AUDIT_DIR, tmp))
            records += [json.loads(p.read_text()) for p in folder.glob("*.json")]
    return records


def _legacy_records(model_tags: dict[str, str]) -> list[dict]:
    return [json.loads(v) for k, v in model_tags.items() if k.startswith(LEGACY_AUDIT_TAG_PREFIX)]


def _by_version(aliases: dict[str, str]) -> dict[str, list[str]]:
    """{alias: version} turned into {version: [aliases, sorted]}."""
    out: dict[str, list[str]] = {}
    for alias, version in sorted(aliases.items()):
        out.setdefault(str(version), []).append(alias)
    return out


def _version_row(version, created_ms: int | None, aliases: dict[str, list[str]], tags: dict[str, str],
                 run_id: str | None) -> dict:
    rollout = " at ".join(filter(None, (tags.get("rollout.state"), tags.get("rollout.step"))))  # a served rollout's end
    return {"version": str(version), "created_ms": created_ms, "aliases": aliases.get(str(version), []),
            "decision": tags.get("promotion.decision", ""), "rollout": rollout or None, "run_id": run_id}


class _LocalStore:
    """A local SQLite MLflow store, opened read-only. Each read returns None where it cannot
    answer as MLflow would, and the caller asks MLflow."""

    def __init__(self, db: sqlite3.Connection):
        self.db = db
        columns = {row[1] for row in db.execute("PRAGMA table_info(registered_models)")}
        # MLflow's single-tenant SQL store keeps everything in its default workspace
        self.where = " AND workspace = 'default'" if "workspace" in columns else ""

    @classmethod
    def open(cls, tracking_uri: str) -> _LocalStore | None:
        """The store at a `sqlite:///PATH` URI that exists, unless MLflow's workspaces are on; else None."""
        path = tracking_uri.removeprefix("sqlite:///")
        workspaces = os.environ.get("MLFLOW_ENABLE_WORKSPACES", "").lower() in ("true", "1") or \
            os.environ.get("MLFLOW_WORKSPACE")
        if path == tracking_uri or "?" in path or not Path(path).is_file() or workspaces:
            return None
        try:
            return cls(sqlite3.connect(f"{Path(path).resolve().as_uri()}?mode=ro", uri=True, timeout=30))
        except sqlite3.Error:
            return None

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        self.db.close()

    def _rows(self, sql: str, *args) -> list[tuple] | None:
        """The rows of `sql` (`{where}` filled with the workspace filter); None when the store's
        schema is not the one this reads (MLflow answers instead)."""
        try:
            return self.db.execute(sql.format(where=self.where), args).fetchall()
        except sqlite3.Error:
            return None

    def model_names(self) -> list[str] | None:
        rows = self._rows("SELECT name FROM registered_models WHERE 1{where}")
        return None if rows is None else [r[0] for r in rows]

    def _require_model(self, name: str) -> bool | None:
        """True when `name` is registered; raises UnknownModel when not (None: this schema is unknown)."""
        rows = self._rows("SELECT name FROM registered_models WHERE name = ?{where}", name)
        if rows == []:
            known = self.model_names()
            raise UnknownModel(name, sorted(known or [])[:50])
        return None if rows is None else True

    def _versions(self, name: str) -> list[tuple] | None:
        """(version, created ms, run id) of each version of `name`, oldest first."""
        rows = self._rows("SELECT version, creation_time, run_id FROM model_versions "
                          f"WHERE name = ? AND current_stage != '{DELETED}'{{where}}", name)
        return None if rows is None else sorted(rows, key=lambda r: int(r[0]))

    def _tags(self, name: str) -> dict[str, dict[str, str]] | None:
        """{version: {tag: value}} of every version of `name`."""
        rows = self._rows("SELECT version, key, value FROM model_version_tags WHERE name = ?{where}", name)
        out: dict[str, dict[str, str]] = {}
        for version, key, value in rows or []:
            out.setdefault(str(version), {})[key] = value
        return None if rows is None else out

    def _aliases(self, name: str) -> dict[str, str] | None:
        rows = self._rows("SELECT alias, version FROM registered_model_aliases WHERE name = ?{where}", name)
        return None if rows is None else {alias: str(version) for alias, version in rows}

    def _model(self, name: str) -> tuple[list[tuple], dict[str, dict[str, str]], dict[str, str]] | None:
        """(versions, their tags, aliases) of `name`; raises UnknownModel when it is not registered."""
        if not self._require_model(name):
            return None
        parts = self._versions(name), self._tags(name), self._aliases(name)
        return None if None in parts else parts

    def model_status(self, name: str) -> dict | None:
        if (model := self._model(name)) is None:
            return None
        versions, tags, aliases = model
        found = {"name": name, "versions": len(versions)}
        by_number = {str(v[0]): v for v in versions}
        for alias in (CHAMPION, CHALLENGER):
            if alias not in aliases:
                found[alias] = None
                continue
            row, version_tags = by_number.get(aliases[alias]), tags.get(aliases[alias], {})
            if row is None or (metrics := recorded_metrics(version_tags)) is None:
                return None  # no evaluation recorded on the version: its run's metrics, through MLflow
            found[alias] = version_status(alias, row[0], row[2], row[1], version_tags, metrics)
        return found

    def versions_overview(self, name: str) -> list[dict] | None:
        if (model := self._model(name)) is None:
            return None
        versions, tags, aliases = model
        by_version = _by_version(aliases)
        return [_version_row(v, created, by_version, tags.get(str(v), {}), run_id) for v, created, run_id in versions]

    def audit_records(self, name: str) -> list[dict] | None:
        if not self._require_model(name):
            return None
        rows = self._rows("SELECT key, value FROM registered_model_tags WHERE name = ?{where}", name)
        if rows is None:
            return None
        model_tags = dict(rows)
        records = _legacy_records(model_tags)
        if not (run_id := model_tags.get(AUDIT_RUN_TAG)):
            return records
        found = self._rows("SELECT artifact_uri FROM runs WHERE run_uuid = ?", run_id)
        folder = _local_folder(found[0][0]) if found else None
        if folder is None:
            return None  # a remote artifact store: MLflow downloads the files
        return records + [json.loads(p.read_text()) for p in (folder / AUDIT_DIR).glob("*.json")]


def _local_folder(artifact_uri: str | None) -> Path | None:
    """The local folder of a `file:` (or plain path) artifact URI; None for any other scheme."""
    if not artifact_uri:
        return None
    parsed = urlparse(artifact_uri)
    if parsed.scheme == "file" and parsed.netloc in ("", "localhost"):
        return Path(url2pathname(unquote(parsed.path)))
    return Path(artifact_uri) if not parsed.scheme else None
