"""Ray Serve end to end: serve the champion of a tiny Llama from a SQLite MLflow, swap it under load.

Two registered versions carry LoRA adapters with different random weights, so each answers a
prompt differently; the answer says which adapter served it."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from prefect_lora.deploy.testing import HUGE_DIGITS, free_port, request_bodies

pytestmark = pytest.mark.slow

TOKEN = "test-token-6f1c2b9e"
RAY_TMP = os.environ["PREFECT_LORA_RAY_TMP"] + "-serve"  # set by conftest; one per checkout
NAME = "serve-tiny"
PROMPT = "What is 12 plus 30? Answer:"


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    import os

    import httpx
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    work = tmp_path_factory.mktemp("serve")
    uri = f"sqlite:///{work}/mlflow.db"
    v1, v2 = register_random_adapters(uri, NAME, tiny_model_dir, [11, 22], work)
    aliases.promote_version(uri, NAME, v1, reason="first champion")
    cfg = ServeConfig(model_name=NAME, tracking_uri=uri, port=free_port(), poll_interval_s=1.0,
                      max_prompt_chars=400, max_prompt_tokens=64, max_tokens_cap=16, max_body_bytes=8192,
                      app_name="test-serving")
    os.environ["PREFECT_LORA_SERVE_TOKEN"] = TOKEN
    try:
        serving.start(cfg, ray_temp_dir=RAY_TMP)
    finally:
        os.environ.pop("PREFECT_LORA_SERVE_TOKEN", None)
    client = httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"})
    try:
        yield {"uri": uri, "v1": v1, "v2": v2, "client": client, "cfg": cfg}
    finally:
        client.close()
        serving.stop(cfg)


def _complete(client, model=None):
    body = {"prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    if model:
        body["model"] = model
    r = client.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    j = r.json()
    return j["model"].rsplit("/", 1)[1], j["choices"][0]["text"]


def test_health_models_and_both_versions_answer_differently(server):
    c = server["client"]
    assert c.get("/health").json()["aliases"]["champion"] == server["v1"]
    ids = {m["id"]: m["version"] for m in c.get("/v1/models").json()["data"]}
    assert ids[f"{NAME}@champion"] == server["v1"] and ids[f"{NAME}@challenger"] == server["v2"]
    v, a1 = _complete(c)
    assert v == server["v1"]
    assert _complete(c, f"{NAME}/{server['v1']}") == (server["v1"], a1)  # greedy: same answer again
    v, a2 = _complete(c, f"{NAME}@challenger")
    assert v == server["v2"] and a2 != a1
    chat = c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": PROMPT}], "max_tokens": 6})
    assert chat.status_code == 200 and chat.json()["choices"][0]["message"]["content"] == a1
    server["answers"] = {server["v1"]: a1, server["v2"]: a2}


def test_promotion_and_rollback_swap_under_load_without_failures(server):
    import httpx
    from prefect_lora.lora_tasks.registry import aliases

    answers = server.get("answers") or {}
    assert len(answers) == 2, "runs after the test that records each version's answer"
    uri, v1, v2, cfg = server["uri"], server["v1"], server["v2"], server["cfg"]
    results: list[tuple[float, int, str, str]] = []  # (sent, status, version, answer)
    stop = threading.Event()

    def client_loop():
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as c:
            while not stop.is_set():
                sent = time.monotonic()  # requests sent before a swap may finish on the old version
                r = c.post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 6})
                j = r.json() if r.status_code == 200 else {}
                results.append((sent, r.status_code, j.get("model", "/").rsplit("/", 1)[1],
                                (j.get("choices") or [{}])[0].get("text")))

    threads = [threading.Thread(target=client_loop) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        time.sleep(2)
        aliases.promote_version(uri, NAME, v2, reason="better adapter")
        swap = server["client"].post("/admin/refresh")  # what `prefect-lora promote --notify URL` does
        assert swap.status_code == 200 and swap.json()["aliases"]["champion"] == v2
        t_promoted = time.monotonic()
        time.sleep(2)
        t_rolled = time.monotonic()  # before the move: the poll may see it while the audit is still written
        aliases.rollback_champion(uri, NAME, reason="roll back in the test")  # no notify: the poll finds it
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline and not (results and results[-1][0] > t_rolled and results[-1][2] == v1):
            time.sleep(0.2)
        time.sleep(1)
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    assert len(results) > 20
    failures = [r for r in results if r[1] != 200]
    assert failures == [], failures[:5]
    for _, _, version, text in results:  # every answer is the one of the adapter that says it served it
        assert text == answers[version]
    after_promotion = [r[2] for r in results if t_promoted < r[0] < t_rolled]
    assert after_promotion and set(after_promotion) == {v2}
    assert results[-1][2] == v1  # rolled back: answers switched back
    assert next(r[2] for r in results if r[0] < t_promoted) == v1


def _generate(client, model: str, route: str, max_tokens: int) -> tuple[str, str, int]:
    """(text, finish reason, completion tokens) of a greedy completion or chat of PROMPT."""
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0}
    if route == "chat":
        r = client.post("/v1/chat/completions", json={**body, "messages": [{"role": "user", "content": PROMPT}]})
        choice = r.json()["choices"][0] if r.status_code == 200 else {}
        text = choice.get("message", {}).get("content")
    else:
        r = client.post("/v1/completions", json={**body, "prompt": PROMPT})
        choice = r.json()["choices"][0] if r.status_code == 200 else {}
        text = choice.get("text")
    assert r.status_code == 200, r.text
    return text, choice["finish_reason"], r.json()["usage"]["completion_tokens"]


def test_concurrent_generations_batch_continuously_and_each_answers_as_alone(server):
    """Completions and chats of both versions asking for 16, 3 or 2 tokens, from 6 clients at
    once: each greedy answer is the one the request gets alone, and the replica ran passes of
    several rows (continuous batching is on by default)."""
    import httpx

    c, cfg = server["client"], server["cfg"]
    asks = [(f"{NAME}/{v}", route, n) for v in (server["v1"], server["v2"]) for route, n in
            (("complete", 16), ("chat", 3), ("complete", 2))]
    alone = {a: _generate(c, *a) for a in asks}
    assert len({text for text, _, _ in alone.values()}) == len(asks), "every ask answers differently"
    before = c.get("/admin/stats").json()["replica"]["passes_by_rows"]
    results = []

    def client(i: int) -> None:
        with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60,
                          headers={"Authorization": f"Bearer {TOKEN}"}) as own:
            for k in range(4):
                ask = asks[(i + k) % len(asks)]
                results.append((ask, _generate(own, *ask)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert len(results) == 24
    assert [answer for _, answer in results] == [alone[ask] for ask, _ in results]
    after = c.get("/admin/stats").json()["replica"]["passes_by_rows"]
    shared = {rows: n - before.get(rows, 0) for rows, n in after.items() if int(rows) >= 2}
    assert sum(shared.values()) > 0, f"no pass ran several rows: {after}"


@pytest.mark.parametrize("kwargs, status, needle", [
    ({"json": {"prompt": "x" * 401}}, 400, "limit is 400"),
    ({"json": {"prompt": "x" * 100}}, 400, "tokens; the limit is 64"),
    ({"json": {"prompt": "hi", "max_tokens": 17}}, 400, "at most 16"),
    ({"content": b"{not json", "headers": {"Content-Type": "application/json"}}, 400, "not valid JSON"),
    ({"content": b"[1]"}, 400, "JSON object"),
    ({"content": b'{"prompt": "' + b"x" * 9000 + b'"}'}, 413, "limit is 8192"),
    ({"content": iter([b'{"prompt": "', b"x" * 9000, b'"}'])}, 413, "limit is 8192"),  # chunked: no Content-Length
    ({"content": b"[" * 1000 + b"]" * 1000}, 400, "nests JSON too deeply"),
    ({"json": {"prompt": "hi", "temperature": 1e-300}}, 400, "0 (greedy)"),
    ({"json": {"prompt": "hi", "model": f"{NAME}/\u0661"}}, 400, "ASCII digits"),
    ({"json": {"prompt": "hi", "model": "other@champion"}}, 404, "not 'other'"),
    ({"json": {"prompt": "hi", "model": f"{NAME}@staging"}}, 404, "no alias 'staging'"),
    ({"json": {"prompt": "hi", "model": f"{NAME}/99"}}, 404, "no version '99'"),
    ({"json": {"messages": "hello"}, "path": "/v1/chat/completions"}, 400, "'messages'"),
    ({"json": {"input": "a text"}, "path": "/v1/classify"}, 400, "causal_lm model: use /v1/completions"),
    ({"json": {"prompt": ["hi", ""]}}, 400, "no tokens"),  # found by the fuzz test: was a 500 (generate on nothing)
    ({"json": {"prompt": "hi", "model": f"{NAME}/{HUGE_DIGITS}"}}, 404, "(5000 digits)"),  # was a 500 in plain text
    ({"content": b'{"prompt": "\\ud800"}'}, 400, "lone surrogate"),  # was a 500 in plain text
    ({"content": b'{"messages": [{"role": "user", "content": "\\udfff"}]}', "path": "/v1/chat/completions"}, 400,
     "lone surrogate"),
    ({"content": b'{"prompt": "hi", "max_tokens": ' + HUGE_DIGITS.encode() + b"}"}, 400, "integer of 5000 digits"),
])
def test_bad_requests_get_4xx_with_a_message_and_the_server_stays_up(server, kwargs, status, needle):
    c = server["client"]
    path = kwargs.pop("path", "/v1/completions")
    r = c.post(path, **kwargs)
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/json" and needle in r.json()["error"]["message"]
    assert c.get("/health").status_code == 200


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(route_and_body=request_bodies((NAME,)))
def test_any_request_body_is_answered_200_or_4xx_in_json_never_500(server, route_and_body):
    """The real gateway and replica under the same fuzzed bodies as the rules' unit test
    (tests/unit/test_serve_fuzz.py): what passes the rules must run on the model."""
    route, body = route_and_body
    r = server["client"].post(route, content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 200 or 400 <= r.status_code < 500, (body[:300], r.status_code, r.text[:500])
    assert r.headers["content-type"] == "application/json", r.text[:300]
    answer = r.json()
    assert ("choices" in answer) if r.status_code == 200 else answer["error"]["message"]


def test_requests_without_the_token_get_401_and_the_token_is_never_logged(server):
    import httpx

    base = f"http://127.0.0.1:{server['cfg'].port}"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}):
        assert httpx.post(f"{base}/v1/completions", json={"prompt": "hi"}, headers=headers).status_code == 401
        assert httpx.get(f"{base}/v1/models", headers=headers).status_code == 401
        assert httpx.post(f"{base}/admin/refresh", headers=headers).status_code == 401
    assert httpx.get(f"{base}/health").status_code == 200  # health stays open
    assert _complete(server["client"])[0]  # and the server still answers
    logs = Path(RAY_TMP) / "session_latest" / "logs"
    leaked = [p.name for p in logs.rglob("*") if p.is_file() and TOKEN.encode() in p.read_bytes()]
    assert leaked == []


@pytest.fixture(scope="module")
def classifier(server, tiny_model_dir, tmp_path_factory):
    """A classification model served as a second app beside the first (same Ray, own route prefix)."""
    import httpx
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases
    from ray import serve

    work = tmp_path_factory.mktemp("serve-cls")
    uri = f"sqlite:///{work}/mlflow.db"
    (v1,) = register_random_adapters(uri, "cls-tiny", tiny_model_dir, [3], work, task="sequence_classification")
    aliases.promote_version(uri, "cls-tiny", v1, reason="first")
    cfg = ServeConfig(model_name="cls-tiny", tracking_uri=uri, port=server["cfg"].port, app_name="test-cls")
    serve.run(serving.build_app(cfg, None), name=cfg.app_name, route_prefix="/cls", blocking=False)
    with httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}/cls", timeout=60) as c:
        yield c
    serve.delete(cfg.app_name)


def test_classification_route(classifier):
    r = classifier.post("/v1/classify", json={"input": ["a great film", "an awful film"]})
    assert r.status_code == 200, r.text
    data = r.json()["data"]
    assert [d["index"] for d in data] == [0, 1] and all(d["label"] in {"neg", "pos"} and 0.5 <= d["score"] <= 1 for d in data)
    r = classifier.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 400 and "use /v1/classify" in r.json()["error"]["message"]
    for texts in ("", ["a great film", ""]):  # the byte tokenizer reads no token in "": was a 500
        r = classifier.post("/v1/classify", json={"input": texts})
        assert r.status_code == 400 and "no tokens" in r.json()["error"]["message"], r.text
    r = classifier.post("/v1/classify", json={"input": ["\x00", "\u202eevil\u202c", "\U0001f642"]})
    assert r.status_code == 200 and len(r.json()["data"]) == 3, r.text
