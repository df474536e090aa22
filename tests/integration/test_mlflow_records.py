"""What the pipeline records in MLflow is neither lost nor put astray, on real stores: a run whose
first param writes the store refused ends, once retried, with every param of its config (a
SQLite file, and the MLflow server on PostgreSQL that production-shaped tests use); the audit
record of a first run's refusal lands under the configured artifact location, not in a
`mlruns/` folder of whatever directory the run was started from.

The store refuses writes for real: a trigger in its database aborts each insert into `params`
(past a count), as a full disk or a read-only replica would; dropping it is the store coming back."""

from __future__ import annotations

import logging
import os
import sqlite3
import sys
from pathlib import Path

import pytest
from prefect_lora.deploy.testing import free_port
from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.registry import tracking
from prefect_lora.lora_tasks.secrets import redacted_config
from services import Service, postgres_database

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _cfg(uri: str, artifacts: Path, *overrides: str):
    return load_config(REPO / "configs" / "tiny.yaml", [f"tracking.tracking_uri={uri}",
                                                        f"tracking.artifact_location={artifacts}", *overrides])


def _expected_params(cfg) -> dict[str, str]:
    return {k: v[:6000] for k, v in tracking.flatten(redacted_config(cfg.model_dump(mode="json"))).items()}


def _tags(cfg) -> dict[str, str]:
    return {"lora.run_key": "k-params", "lineage.config_hash": cfg.config_hash()}


def _sqlite_fault(db: Path):
    def refuse(after: int) -> None:
        with sqlite3.connect(db) as con:
            con.execute("CREATE TRIGGER refuse_params BEFORE INSERT ON params WHEN (SELECT count(*) FROM params "
                        f"WHERE run_uuid = NEW.run_uuid) >= {after} BEGIN SELECT RAISE(ABORT, 'store refuses writes'); END")

    def restore() -> None:
        with sqlite3.connect(db) as con:
            con.execute("DROP TRIGGER refuse_params")

    return refuse, restore


def _retried_start(cfg, refuse, restore, after: int) -> str:
    """`start_run` as the flow's task runs it: an attempt while the store refuses param writes
    (past `after` of them), then, the store back, the retry. Returns the retry's run id."""
    tracking.ensure_experiment(tracking.client(cfg.tracking.tracking_uri), cfg.experiment_name,
                               cfg.tracking.artifact_location)  # the store's tables exist
    refuse(after)
    try:
        with pytest.raises(Exception, match="store refuses writes|500|INTERNAL_ERROR|Max retries"):
            tracking.start_run(cfg, "r", _tags(cfg))
    finally:
        restore()
    c = tracking.client(cfg.tracking.tracking_uri)
    (first,) = c.search_runs([c.get_experiment_by_name(cfg.experiment_name).experiment_id])
    assert len(first.data.params) == after, "the first attempt's fault happened where the test put it"
    run_id = tracking.start_run(cfg, "r", _tags(cfg))
    assert run_id == first.info.run_id, "the retry continues the run of the attempt that failed"
    return run_id


@pytest.mark.parametrize("after", [0, 100], ids=["no-param-written", "first-batch-written"])
def test_a_run_whose_param_writes_failed_gets_every_param_on_its_retry(tmp_path, after):
    db = tmp_path / "mlflow.db"
    cfg = _cfg(f"sqlite:///{db}", tmp_path / "artifacts")
    expected = _expected_params(cfg)
    assert len(expected) > after, "the config has more params than the fault lets through"
    run_id = _retried_start(cfg, *_sqlite_fault(db), after=after)
    params = tracking.client(cfg.tracking.tracking_uri).get_run(run_id).data.params
    assert params == expected, f"missing: {sorted(set(expected) - set(params))}"


def test_a_param_the_run_holds_with_another_value_is_kept_and_reported(tmp_path, caplog):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    earlier, now = (_cfg(uri, tmp_path / "artifacts", f"lora.r={r}") for r in (4, 8))
    run_id = tracking.start_run(earlier, "r", _tags(now))  # an attempt that logged lora.r 4, then died
    with caplog.at_level(logging.WARNING, logger="prefect_lora.lora_tasks.registry.tracking"):
        assert tracking.start_run(now, "r", _tags(now)) == run_id  # no crash on the immutable param
    run = tracking.client(uri).get_run(run_id)
    assert run.data.params["lora.r"] == "4"
    assert '"lora.r": {"logged": "4", "now": "8"}' in run.data.tags[tracking.PARAMS_DIFFERING_TAG]
    assert "lora.r" in caplog.text and tracking.PARAMS_DIFFERING_TAG in caplog.text
    assert set(_differing(run.data.params, _expected_params(now))) == {"lora.r"}  # every other param logged


def _differing(held: dict, wanted: dict) -> dict:
    return {k: (held.get(k), v) for k, v in wanted.items() if held.get(k) != v}


@pytest.fixture(scope="module")
def mlflow_server_on_postgres(tmp_path_factory):
    work = tmp_path_factory.mktemp("params-server")
    with postgres_database("params_mlflow") as db:
        port = free_port()
        server = Service("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", db, "--host", "127.0.0.1",
                                    "--port", str(port), "--workers", "1"], dict(os.environ), work, cwd=work).start()
        try:
            server.wait_healthy(f"http://127.0.0.1:{port}/health")
            yield f"http://127.0.0.1:{port}", db.replace("postgresql+psycopg2://", "postgresql://", 1), work
        finally:
            server.stop()


def _postgres_fault(dsn: str):
    import psycopg2

    def execute(sql: str) -> None:
        con = psycopg2.connect(dsn)
        try:
            with con, con.cursor() as cur:
                cur.execute(sql)
        finally:
            con.close()

    def refuse(after: int) -> None:
        execute(f"""CREATE FUNCTION refuse_params() RETURNS trigger LANGUAGE plpgsql VOLATILE AS $$ BEGIN
                    IF (SELECT count(*) FROM params WHERE run_uuid = NEW.run_uuid) >= {after} THEN
                    RAISE EXCEPTION 'store refuses writes'; END IF; RETURN NEW; END $$;
                    CREATE TRIGGER refuse_params BEFORE INSERT ON params FOR EACH ROW EXECUTE FUNCTION refuse_params();""")

    def restore() -> None:
        execute("DROP TRIGGER refuse_params ON params; DROP FUNCTION refuse_params();")

    return refuse, restore


def test_a_run_whose_param_writes_the_tracking_server_refused_gets_every_param_on_its_retry(
        mlflow_server_on_postgres, monkeypatch):
    uri, dsn, work = mlflow_server_on_postgres
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the flow's task retries, not each request
    cfg = _cfg(uri, work / "artifacts")
    expected = _expected_params(cfg)
    run_id = _retried_start(cfg, *_postgres_fault(dsn), after=100)
    assert tracking.client(uri).get_run(run_id).data.params == expected


def test_a_first_refusal_is_audited_under_the_configured_artifact_location(tmp_path, monkeypatch):
    from prefect_lora.lora_tasks.gate.promotion import Decision
    from prefect_lora.lora_tasks.registry import aliases, registry

    store, elsewhere = tmp_path / "store", tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # where `prefect-lora run` was started: none of its business
    uri, artifacts, name = f"sqlite:///{store}/mlflow.db", store / "artifacts", "refused-first"
    c = tracking.client(uri)
    run = c.create_run(tracking.ensure_experiment(c, name, str(artifacts)))
    c.set_terminated(run.info.run_id)
    version = registry.register_version(uri, name, f"{run.info.artifact_uri}/adapter", run.info.run_id, {"x": "1"})
    refused = Decision(promote=False, reasons=["task gain 0.01 below min_task_gain 0.05"], failed_checks=["task_gain"])
    final, against, record = aliases.settle_decision(uri, name, version, refused, None, lambda champion: refused,
                                                     actor="test")

    assert (final.promote, against, record.action) == (False, None, "kept")
    assert not (elsewhere / "mlruns").exists(), sorted(str(p) for p in (elsewhere / "mlruns").rglob("*"))
    written = sorted(artifacts.rglob(f"{aliases.AUDIT_DIR}/*.json"))
    assert len(written) == 1, sorted(str(p) for p in tmp_path.rglob("*.json"))
    (history,) = aliases.alias_history(uri, name)
    assert (history["action"], history["details"]["candidate"], history["reason"]) == (
        "kept", version, f"version {version} refused: task gain 0.01 below min_task_gain 0.05")
