"""Staged rollouts end to end: the tiny Llama's versions served from a SQLite MLflow, with a
Prefect server (the rollout's events, the alias lock) and a webhook, under 4 clients.

Versions 1 and 2 are random adapters whose plain-text answers pass their checks (none is empty);
version 3 is registered with a JSON answer contract its random weights never meet, so every
answer of it fails the output check. Version 2 rolls out through its steps, across a restart of
the gateway, and completes; version 3 is rolled back by the server itself, with its figures in
the alias history, and no request fails."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from prefect_lora.deploy.testing import Load, free_port
from services import Receiver, Service, wait_for

pytestmark = pytest.mark.slow

RAY_TMP = os.environ["PREFECT_LORA_RAY_TMP"] + "-rollout"  # set by conftest; one per checkout
BIN = Path(sys.executable).parent
NAME = "rollout-tiny"
PROMPTS = ["Order two mugs, please.", "Cancel my order", "Track it", "Return the lamp"]
ROLLOUT = {"steps": [0.25, 0.5, 1.0], "min_requests": 12, "hold_s": 15}
"""Small steps for 4 clients on the tiny model; the hold keeps the second step going while the
test stops the load and restarts the gateway."""


@pytest.fixture(scope="module")
def prefect_api(tmp_path_factory):
    """A Prefect server (SQLite) the gateway sends its events to and takes the alias lock from."""
    work, port = tmp_path_factory.mktemp("prefect"), free_port()
    env = {**os.environ, "PREFECT_HOME": str(work / "home"), "PREFECT_SERVER_API_PORT": str(port),
           "PREFECT_UI_ENABLED": "false", "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1"}
    env.pop("PREFECT_API_URL", None)
    server = Service("prefect", [str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port),
                                 "--no-ui"], env, work).start()
    try:
        server.wait_healthy(f"http://127.0.0.1:{port}/api/health")
        yield f"http://127.0.0.1:{port}/api"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def webhook():
    """A webhook that keeps what is posted to it."""
    receiver = Receiver()
    yield receiver.url, receiver.payloads
    receiver.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir, prefect_api, webhook):
    import httpx
    import ray
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    if ray.is_initialized():  # the server's processes must start from this module's environment (below)
        serving.stop()
    work = tmp_path_factory.mktemp("rollout")
    uri = f"sqlite:///{work}/mlflow.db"
    v1, v2 = register_random_adapters(uri, NAME, tiny_model_dir, [11, 22], work)
    (v3,) = register_random_adapters(uri, NAME, tiny_model_dir, [33], work, required_fields=["intent", "quantity"])
    aliases.promote_version(uri, NAME, v1, reason="first champion")
    cfg = ServeConfig(model_name=NAME, tracking_uri=uri, port=free_port(), poll_interval_s=2.0, max_tokens_cap=16,
                      max_prompt_tokens=64, signals_interval_s=None, app_name="test-rollout", rollout=ROLLOUT)
    env = {"PREFECT_API_URL": prefect_api, "PREFECT_LORA_WEBHOOK_URL": webhook[0]}
    os.environ.update(env)  # the gateway's (Ray's) environment: events and the alias lock go to this server
    try:
        serving.start(cfg, ray_temp_dir=RAY_TMP)
    finally:
        for key in env:
            os.environ.pop(key)
    url = f"http://127.0.0.1:{cfg.port}"
    with httpx.Client(base_url=url, timeout=60) as client:
        yield {"uri": uri, "v1": v1, "v2": v2, "v3": v3, "client": client, "url": url, "posts": webhook[1],
               "api": prefect_api}
    serving.stop(cfg)


def promote(server, version: str, reason: str) -> None:
    """`prefect-lora promote NAME VERSION --notify URL`, as its flow does it."""
    from prefect_lora.lora_tasks.registry import aliases

    aliases.promote_version(server["uri"], NAME, version, reason=reason)
    assert server["client"].post("/admin/refresh").json()["aliases"]["champion"] == version


def tags(server, version: str) -> dict:
    from mlflow import MlflowClient

    return MlflowClient(server["uri"]).get_model_version(NAME, version).tags


def rollout_of(server) -> dict:
    return server["client"].get("/health").json()["rollouts"].get(NAME, {})


def restart_gateway() -> str:
    """Kill the gateway's replica (Serve starts another); the killed actor's name."""
    import ray

    (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "test-rollout#Gateway" in a["name"]]
    ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
    return actor["name"]


def test_a_sound_version_advances_through_its_steps_survives_a_restart_and_completes(server):
    import ray
    from prefect_lora.lora_tasks.registry import aliases

    v1, v2 = server["v1"], server["v2"]
    load = Load(server["url"], NAME, PROMPTS, clients=4, max_tokens=4).start()
    try:
        promote(server, v2, "a sound adapter")
        wait_for(lambda: tags(server, v2).get("rollout.step") == "0.5", 300, "the rollout's second step")
    finally:
        load.stop()
    killed = restart_gateway()
    wait_for(lambda: _health(server).get("share") == 0.5, 300, "the restarted gateway to resume at 50%")
    assert tags(server, v2)["rollout.state"] == "running"
    load.start()
    try:
        wait_for(lambda: tags(server, v2).get("rollout.state") == "completed", 300, "the rollout to complete")
    finally:
        sent = load.stop()
    assert load.failed() == []
    served = {s.version for s in sent}
    assert served == {v1, v2}, served  # beside the previous champion until it completed
    assert tags(server, v2)["rollout.step"] == "1" and rollout_of(server) == {}
    history = aliases.alias_history(server["uri"], NAME)
    notes = [(r["action"], r["to_version"]) for r in history if r["action"].startswith("rollout")]
    assert notes == [("rollout-started", v2), ("rollout-advanced", v2), ("rollout-completed", v2)]
    completed = history[-1]
    assert "no signal worse at look" in completed["reason"] and "staged rollout of serve app" in completed["actor"]
    assert killed not in {a["name"] for a in ray.util.list_named_actors(all_namespaces=True)}


def _health(server) -> dict:
    import httpx

    try:
        return rollout_of(server)
    except httpx.HTTPError:  # the gateway is restarting
        return {}


def test_a_broken_version_is_rolled_back_by_itself_with_its_figures_on_record(server):
    import httpx
    from prefect_lora.lora_tasks.registry import aliases
    from typer.testing import CliRunner

    v2, v3 = server["v2"], server["v3"]
    load = Load(server["url"], NAME, PROMPTS, clients=4, max_tokens=4).start()
    try:
        promote(server, v3, "a broken adapter: every answer fails its output check")
        wait_for(lambda: (tags(server, v3).get("rollout.state") == "rolled-back"  # after the audited move
                          and server["client"].get("/health").json()["aliases"]["champion"] == v2), 300,
                 "the server to roll version 3 back")
        assert aliases.get_alias(server["uri"], NAME).version == v2
        back, after = len(load.sent), time.monotonic()  # requests are routed off version 3 before its alias moves
        wait_for(lambda: len(load.sent) >= back + 8, 120, "requests after the rollback")
    finally:
        sent = load.stop()
    assert load.failed() == []  # none failed, those in flight on version 3 included
    assert any(s.version == v3 for s in sent)  # it took its share until the rollback
    assert all(s.version == v2 for s in sent if s.sent > after)
    move = aliases.alias_history(server["uri"], NAME, "champion")[-1]
    assert (move["action"], move["from_version"], move["to_version"]) == ("rollback", v3, v2)
    assert move["reason"].startswith("rollback: output-check failures 1.00 [")
    assert f"on the previous version {v2}" in move["reason"]
    assert move["details"]["signal"] == "output_checks" and move["details"]["figures"]["bad"] >= 5
    assert "staged rollout of serve app test-rollout" in move["actor"]
    assert tags(server, v3)["rollout.state"] == "rolled-back"
    from prefect_lora.flows.cli import app

    history = CliRunner().invoke(app, ["history", NAME, "--tracking-uri", server["uri"], "--json"])
    assert history.exit_code == 0, history.output
    listed = json.loads(history.output)
    assert listed["alias_moves"][-1]["reason"] == move["reason"]
    assert {v["version"]: v["rollout"] for v in listed["versions"]} == {
        server["v1"]: None, v2: "completed at 1", v3: "rolled-back at 0.25"}
    (post,) = [p for p in server["posts"] if p["event"] == "rollback"]
    assert post["version"] == v3 and post["to_version"] == v2 and post["reason"] == move["reason"]

    def events() -> set[tuple[str, str]]:
        found = httpx.post(f"{server['api']}/events/filter", json={
            "filter": {"event": {"prefix": ["prefect-lora.rollout."]}}, "limit": 50}).json()["events"]
        return {(e["event"].rsplit(".", 1)[1], e["resource"]["prefect-lora.version"]) for e in found}

    wanted = {("started", v2), ("advanced", v2), ("completed", v2), ("started", v3), ("rolled-back", v3)}
    wait_for(lambda: wanted <= events(), 60, f"the rollouts' events in Prefect (so far {events()})")
