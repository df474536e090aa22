"""`prefect-lora serve` stopped as systemd and Kubernetes stop a service: SIGTERM stops Serve and
Ray and exits 143, as `prefect-lora run` does, and leaves no process of its Ray instance behind."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import pytest
from prefect_lora.deploy.testing import free_port

pytestmark = pytest.mark.slow

NAME = "serve-signal"


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := predicate():
            return result
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")


def processes_marked(marker: str) -> dict[int, str]:
    """Every process that inherited `marker` from the server's environment (Ray's daemons and
    workers run in sessions of their own, so not its process group): pid -> command line."""
    found = {}
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker.encode() in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                found[int(environ.parent.name)] = (environ.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode()
        except (OSError, ValueError):  # gone already, or not ours to read
            pass
    return found


def answers_health(port: int) -> bool:
    import httpx

    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200
    except httpx.HTTPError:
        return False


@pytest.fixture
def served_model(tmp_path, tiny_model_dir) -> str:
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    uri = f"sqlite:///{tmp_path}/mlflow.db"
    (version,) = register_random_adapters(uri, NAME, tiny_model_dir, [7], tmp_path)
    aliases.promote_version(uri, NAME, version, reason="served, then stopped by SIGTERM")
    return uri


def test_sigterm_stops_serve_and_ray_and_exits_143_leaving_no_process(tmp_path, served_model):
    port = free_port()
    marker = f"PREFECT_LORA_SERVE_SIGNAL_TEST={uuid.uuid4().hex}"
    ray_tmp = tempfile.mkdtemp(prefix="plsig-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    key, value = marker.split("=")
    env = {**os.environ, key: value, "RAY_TMPDIR": ray_tmp, "PREFECT_HOME": str(tmp_path / "prefect")}
    env.pop("RAY_ADDRESS", None)  # a Ray instance of its own, as on a fresh host
    cli = [str(Path(sys.executable).with_name("prefect-lora")), "serve", NAME, "--tracking-uri", served_model,
           "--port", str(port)]
    log = tmp_path / "serve.log"
    with open(log, "w") as out:  # the server keeps its own copy of the file
        server = subprocess.Popen(cli, env=env, cwd=tmp_path, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: answers_health(port) or server.poll() is not None, 300, "the server to answer /health")
        assert server.poll() is None, log.read_text()[-3000:]
        helpers = processes_marked(marker)
        assert any("raylet" in cmd for cmd in helpers.values()) and any("gcs_server" in cmd for cmd in helpers.values())

        server.send_signal(signal.SIGTERM)
        assert server.wait(timeout=120) == 128 + signal.SIGTERM, log.read_text()[-3000:]
        assert "stopped by SIGTERM: Serve and Ray are shut down" in log.read_text()
        assert "Traceback" not in log.read_text(), log.read_text()[-3000:]
        with contextlib.suppress(AssertionError):  # a worker may outlive its raylet for a moment
            wait_for(lambda: not processes_marked(marker), 30, "the server's Ray processes to end")
        assert processes_marked(marker) == {}, "processes of the stopped server's Ray instance are left running"
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(server.pid, signal.SIGKILL)
        server.wait()
        for pid in processes_marked(marker):  # a failed stop: leave nothing running for the next test
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
