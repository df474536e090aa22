"""Real services for the integration tests: long-running commands in their own process groups
(`mlflow server`, `prefect server start`, a worker), and a fresh PostgreSQL database per test
run for the production-shaped stores."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import httpx
import pytest
from prefect_lora.deploy.testing import free_port

REPO = Path(__file__).resolve().parents[2]
POSTGRES = os.environ.get("PREFECT_LORA_TEST_POSTGRES", "postgresql://root@127.0.0.1:5432/test")
"""The server the production-shaped tests make their databases on (trust auth on the project's machines)."""


@contextlib.contextmanager
def postgres_database(prefix: str):
    """A new, empty database on `POSTGRES`, dropped afterwards; yields its SQLAlchemy URL
    (`postgresql+psycopg2://.../<name>`, as MLflow takes it). Skips the test, saying why, where PostgreSQL is not reachable."""
    psycopg2 = pytest.importorskip("psycopg2", reason="PostgreSQL tests need psycopg2 (pip install psycopg2-binary)")
    try:
        admin = psycopg2.connect(POSTGRES, connect_timeout=5)
    except psycopg2.OperationalError as exc:
        pytest.skip(f"PostgreSQL is not reachable at {POSTGRES} ({str(exc).strip()}); "
                    "the production-shaped tests need it (set PREFECT_LORA_TEST_POSTGRES)")
    admin.autocommit = True
    name = f"pl_{prefix}_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield POSTGRES.rsplit("/", 1)[0].replace("postgresql://", "postgresql+psycopg2://", 1) + f"/{name}"
    finally:
        with admin.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


@contextlib.contextmanager
def s3_bucket(work: Path, bucket: str):
    """An S3-compatible server (moto's, from PyPI) with an empty `bucket`, on loopback; yields the
    environment that points boto3 (MLflow's S3 artifact store) at it. Skips where moto is absent."""
    pytest.importorskip("moto", reason="the S3 artifact store is moto's server (pip install 'moto[server]' boto3)")
    import boto3

    port = free_port()
    server = Service("s3", [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
                     dict(os.environ), work, cwd=work).start()
    env = {"MLFLOW_S3_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1"}
    try:
        server.wait_healthy(f"http://127.0.0.1:{port}/moto-api/")
        boto3.client("s3", endpoint_url=env["MLFLOW_S3_ENDPOINT_URL"], aws_access_key_id="test",
                     aws_secret_access_key="test", region_name="us-east-1").create_bucket(Bucket=bucket)
        yield env
    finally:
        server.stop()


def wait_for(predicate, timeout: float, what: str, every: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


class Service:
    """A long-running command in its own process group, logged to a file, stopped with its children."""

    def __init__(self, name: str, cmd: list[str], env: dict, log_dir: Path, cwd: Path = REPO):
        self.name, self.cmd, self.env, self.cwd = name, cmd, env, cwd
        self.log = log_dir / f"{name}.log"
        self.proc = None

    def start(self) -> Service:
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(self.cmd, env=self.env, cwd=self.cwd, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        return self

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # A short grace: a test's server holds nothing worth a clean stop, and a stopped test
        # session (Ctrl-C) waited here 20 s a server on a busy machine.
        for sig, wait in ((signal.SIGTERM, 3), (signal.SIGKILL, 10)):
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                break
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived their leader (the flow run under the worker)
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass

    def wait_healthy(self, url: str, timeout: float = 120) -> None:
        """Until `url` answers 200; a service that exits first fails at once, with its log."""
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.name} exited with code {self.proc.returncode}:\n{self.tail()}")
            return healthy(url)

        wait_for(up, timeout, f"{self.name}\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:] if self.log.exists() else ""


def healthy(url: str) -> bool:
    try:
        return httpx.get(url, timeout=2).status_code == 200
    except httpx.HTTPError:
        return False





@contextlib.contextmanager
def prefect_harness():
    """Prefect's test harness (a temporary server on a temporary SQLite file), with its server
    out of the terminal's process group. Ctrl-C reaches every process of the foreground group:
    it stopped the harness's server too, and the harness's teardown then waited on its log
    worker sending to a server that was gone (over 80 s). Out of the group, the server outlives
    the interrupt, takes the last logs, and the harness stops it as usual."""
    from prefect.testing.utilities import prefect_test_harness
    from prefect_lora.flows.settings import servers_out_of_the_terminal_group

    servers_out_of_the_terminal_group()
    with prefect_test_harness(server_startup_timeout=60):
        yield


class Receiver:
    """A local webhook: keeps every JSON body it is sent."""

    def __init__(self):
        got = self.payloads = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def events(self, event: str) -> list[dict]:
        return [p for p in self.payloads if p.get("event") == event]

    def one(self, event: str, flow_run_id: str, worker) -> dict:
        """The one `event` posted for this flow run. Prefect runs a flow's state hooks after the
        server has its final state, so the post may come a moment after the run reads finished."""
        def posted():
            return [p for p in self.events(event) if p["flow_run_id"] == flow_run_id]

        wait_for(posted, 60, f"the {event} webhook of flow run {flow_run_id}\nworker log:\n{worker.tail()}", every=0.1)
        (payload,) = posted()
        return payload

    def close(self):
        self.server.shutdown()
        self.server.server_close()
