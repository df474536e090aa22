"""Webhook notifications: the payloads name the model, the failed step or the promoted version
and the MLflow run; posting reaches a real local HTTP receiver and never raises."""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from types import SimpleNamespace

import pytest
from prefect_lora.flows import notifications


@pytest.fixture
def receiver():
    got: list[dict] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            got.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
            code = 500 if got[-1].get("fail") else 200
            self.send_response(code)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}/hook", got
    finally:
        server.shutdown()
        server.server_close()


def test_post_reaches_the_receiver(receiver):
    url, got = receiver
    assert notifications.post_json(url, {"event": "x"}) is True
    assert got == [{"event": "x"}]
    assert notifications.post_json(url, {"fail": True}) is False  # an error answer is reported, not raised


def test_a_webhook_that_is_down_never_raises():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # nothing listens there once closed
    assert notifications.post_json(f"http://127.0.0.1:{port}/", {"a": 1}, timeout_s=1) is False
    assert notifications.post_json("http://unresolvable.invalid/", {"a": 1}, timeout_s=1) is False


def _run(params=None):
    return SimpleNamespace(id="11111111-2222-3333-4444-555555555555", name="clever-fox", parameters=params or {})


def test_failure_hook_posts_model_step_and_mlflow_link(receiver, monkeypatch):
    url, got = receiver
    monkeypatch.delenv(notifications.WEBHOOK_ENV, raising=False)
    run = _run()
    notifications.remember(run.id, model_name="tiny-sums", mlflow_run_id="abc", mlflow_run_url="http://m/#/runs/abc",
                           notifications={"webhook_url": url})
    task_run = SimpleNamespace(flow_run_id=run.id)
    notifications.note_failed_task(SimpleNamespace(name="register-adapter"), task_run,
                                   SimpleNamespace(message="ConnectionError: refused"))
    notifications.on_failure(None, run, SimpleNamespace(name="Failed", message="Flow run encountered an exception"))
    (p,) = got
    assert p["event"] == "failure" and p["model"] == "tiny-sums" and p["failed_step"] == "register-adapter"
    assert p["mlflow_run_url"] == "http://m/#/runs/abc" and "refused" in p["error"]
    assert "tiny-sums" in p["text"] and "register-adapter" in p["text"]
    assert run.id not in notifications._RUNS  # forgotten once sent


def test_completion_hook_posts_only_promotions_and_uses_the_env_url(receiver, monkeypatch):
    url, got = receiver
    monkeypatch.setenv(notifications.WEBHOOK_ENV, url)
    run = _run()
    notifications.remember(run.id, model_name="m", promoted=False, version="2", notifications={})
    notifications.on_completion(None, run, SimpleNamespace(name="Completed", message=None))
    assert got == []
    notifications.remember(run.id, model_name="m", promoted=True, version="3", champion_before="2",
                           mlflow_run_url="http://m/r", notifications={})
    notifications.on_completion(None, run, SimpleNamespace(name="Completed", message=None))
    (p,) = got
    assert (p["event"], p["model"], p["version"], p["champion_before"], p["mlflow_run_url"]) == (
        "promotion", "m", "3", "2", "http://m/r")


def test_failure_before_the_flow_recorded_anything_reads_the_config(receiver, monkeypatch, tmp_path):
    url, got = receiver
    monkeypatch.setenv(notifications.WEBHOOK_ENV, url)
    run = _run({"config_path": str(tmp_path / "missing.yaml")})  # the config itself is broken
    notifications.on_failure(None, run, SimpleNamespace(name="Failed", message="ConfigError: no such file"))
    (p,) = got
    assert p["failed_step"] == "flow" and "no such file" in p["error"] and p["model"] == "unknown model"


def test_disabled_failure_notifications_send_nothing(receiver, monkeypatch):
    url, got = receiver
    run = _run()
    notifications.remember(run.id, model_name="m", notifications={"webhook_url": url, "on_failure": False})
    notifications.on_failure(None, run, SimpleNamespace(name="Failed", message="x"))
    assert got == []


def test_a_failed_post_logs_where_it_went_not_the_token(caplog):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/services/T0/B0/sekrit-token"
    with caplog.at_level("WARNING", logger="prefect_lora.notifications"):
        assert notifications.post_json(url, {"a": 1}, timeout_s=1) is False
    assert "sekrit-token" not in caplog.text and f"http://127.0.0.1:{port}/…(redacted)" in caplog.text


@pytest.mark.parametrize("url", ["http://127.0.0.1:99999/h/sekrit-token", "http://[::1/h/sekrit-token",
                                 "http://[zz]/sekrit-token", "http://127.0.0.1:sekrit-token/h",
                                 "hooks.example.com/sekrit-token"])
def test_the_failure_hook_survives_a_webhook_url_it_cannot_parse(url, monkeypatch, caplog):
    """The env var's URL is not checked by the config: the hook logs it redacted and goes on."""
    monkeypatch.setenv(notifications.WEBHOOK_ENV, url)
    run = _run()
    notifications.remember(run.id, model_name="m", notifications={})
    with caplog.at_level("WARNING", logger="prefect_lora.notifications"):
        notifications.on_failure(None, run, SimpleNamespace(name="Failed", message="x"))
    assert "could not notify webhook (redacted)" in caplog.text and "sekrit-token" not in caplog.text
    assert run.id not in notifications._RUNS
