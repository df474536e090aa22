"""One server, many members of one base: each member routed by name and alias, adapters detached
least recently used first when a replica's bounds are reached and attached again on demand, and
every member's champion followed."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from prefect_lora.deploy.testing import free_port

pytestmark = pytest.mark.slow

RAY_TMP = os.environ["PREFECT_LORA_RAY_TMP"] + "-serve"  # as test_serving: one Ray session directory per checkout
MEMBERS = [f"member-{i}" for i in range(6)]
LATE = "member-late"  # in the fleet from the start, registered and promoted only while the server runs
PROMPT = "What is 12 plus 30? Answer:"


@pytest.fixture(scope="module")
def fleet_server(tmp_path_factory, tiny_model_dir):
    import httpx
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    work = tmp_path_factory.mktemp("serve-fleet")
    uri = f"sqlite:///{work}/mlflow.db"
    for i, name in enumerate(MEMBERS):
        (version,) = register_random_adapters(uri, name, tiny_model_dir, [100 + i], work)
        aliases.promote_version(uri, name, version, reason="first champion")
    adapter_bytes = next(Path(work).glob("adapter-member-0-*/adapter_model.safetensors")).stat().st_size
    limit_mb = 2.5 * adapter_bytes / 2**20  # two adapters fit, a third does not: memory binds before the count
    cfg = ServeConfig(model_name=MEMBERS[0], members=[*MEMBERS[1:], LATE], tracking_uri=uri, port=free_port(), poll_interval_s=1.0,
                      max_adapters_per_replica=3, max_adapter_memory_mb=limit_mb, app_name="test-serving-fleet",
                      batch_wait_ms=300)  # requests sent together wait for each other: one batch of many adapters
    serving.start(cfg, ray_temp_dir=RAY_TMP)
    client = httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60)
    try:
        yield {"uri": uri, "client": client, "cfg": cfg, "work": work, "limit": limit_mb * 2**20}
    finally:
        client.close()
        serving.stop(cfg)


def _answer(client, model: str | None) -> tuple[str, str]:
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0, **({"model": model} if model else {})}
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    return r.json()["model"], r.json()["choices"][0]["text"]


def test_every_member_answers_by_name_and_alias_within_the_replicas_bounds(fleet_server):
    c = fleet_server["client"]
    ids = {m["id"] for m in c.get("/v1/models").json()["data"]}
    assert {f"{n}@champion" for n in MEMBERS} <= ids
    first = {n: _answer(c, f"{n}@champion") for n in MEMBERS}
    assert [served for served, _ in first.values()] == [f"{n}/1" for n in MEMBERS]
    assert len({text for _, text in first.values()}) >= 5, "each member's adapter answers its own way"
    assert _answer(c, None) == first[MEMBERS[0]], "no model named: the default member's champion"
    assert _answer(c, MEMBERS[3]) == first[MEMBERS[3]], "a bare member name: its champion"

    stats = c.get("/admin/stats").json()["replica"]
    assert stats["adapters"] <= 2 and stats["adapter_bytes"] <= fleet_server["limit"], stats
    assert stats["evictions"] >= len(MEMBERS) - 2, stats
    again = {n: _answer(c, f"{n}@champion") for n in reversed(MEMBERS)}  # detached ones attached again
    assert again == first
    assert c.get("/admin/stats").json()["replica"]["loads"] > len(MEMBERS)

    r = c.post("/v1/completions", json={"model": "member-99@champion", "prompt": PROMPT})
    assert r.status_code == 404 and "member-0, member-1" in r.text
    fleet_server["answers"] = first


def test_a_batch_that_mixes_members_gives_each_row_its_own_adapter(fleet_server):
    """`mixed_batches: auto` on the tiny model: one pass per adapter of the batch."""
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    first = fleet_server.get("answers")
    assert first, "runs after the test that records each member's answer"
    port, c = fleet_server["cfg"].port, fleet_server["client"]
    mixed_before = c.get("/admin/stats").json()["replica"]["mixed_batches"]

    def ask(name):
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as own:
            return _answer(own, f"{name}@champion")

    with ThreadPoolExecutor(len(MEMBERS)) as pool:
        together = dict(zip(MEMBERS, pool.map(ask, MEMBERS)))
    assert together == first, "a row answers with its own member's adapter, as it does alone"
    stats = c.get("/admin/stats").json()["replica"]
    assert stats["mixed_batches"] > mixed_before and stats["largest_batch_rows"] >= 2, stats


def test_the_server_follows_each_members_champion(fleet_server, tiny_model_dir):
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    c, uri = fleet_server["client"], fleet_server["uri"]
    before = _answer(c, "member-2@champion")
    (v2,) = register_random_adapters(uri, "member-2", tiny_model_dir, [999], fleet_server["work"])
    aliases.promote_version(uri, "member-2", v2, reason="new champion of one member")
    swapped = c.post("/admin/refresh").json()
    assert swapped["models"]["member-2"]["champion"] == v2 and swapped["models"]["member-1"]["champion"] == "1"
    served, text = _answer(c, "member-2@champion")
    assert served == f"member-2/{v2}" and text != before[1]
    assert _answer(c, "member-2/1") == before, "the old version stays servable by number"



def test_a_member_promoted_after_the_server_started_is_served_without_a_restart(fleet_server, tiny_model_dir):
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    c, uri = fleet_server["client"], fleet_server["uri"]
    r = c.post("/v1/completions", json={"model": f"{LATE}@champion", "prompt": PROMPT})
    assert r.status_code == 404 and "promote a version first" in r.text, r.text
    assert not any(m["id"].startswith(LATE) for m in c.get("/v1/models").json()["data"])

    (version,) = register_random_adapters(uri, LATE, tiny_model_dir, [4242], fleet_server["work"])
    aliases.promote_version(uri, LATE, version, reason="first champion, while serving")
    assert c.post("/admin/refresh").json()["models"][LATE]["champion"] == version
    served, text = _answer(c, LATE)
    assert served == f"{LATE}/{version}" and text
    assert f"{LATE}@champion" in {m["id"] for m in c.get("/v1/models").json()["data"]}
