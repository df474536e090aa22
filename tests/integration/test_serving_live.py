"""Live signals end to end: a structured model (answers must be JSON objects with required fields)
of the tiny Llama, its champion and challenger served from a SQLite MLflow; `/metrics` counts each
version's requests and failed output checks, and the summaries reach each version's run and page.

The random adapters answer bytes, never the JSON asked for: every answer fails its check. The
serving process is given a Prefect API that is down: its events fail, are counted, and serving
goes on."""

from __future__ import annotations

import os

import pytest
from prefect_lora.deploy.testing import free_port
from services import wait_for

pytestmark = pytest.mark.slow

RAY_TMP = os.environ["PREFECT_LORA_RAY_TMP"] + "-live"  # set by conftest; one per checkout
NAME = "live-tiny"
FIELDS = ["intent", "quantity"]
PROMPT = "Order two mugs, please."


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_model_dir):
    import httpx
    import ray
    from prefect_lora.deploy import serve as serving
    from prefect_lora.deploy.serve_core import ServeConfig
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    if ray.is_initialized():  # the server's processes must start from this module's environment (below)
        serving.stop()
    work = tmp_path_factory.mktemp("live")
    uri = f"sqlite:///{work}/mlflow.db"
    v1, v2 = register_random_adapters(uri, NAME, tiny_model_dir, [5, 6], work, required_fields=FIELDS)
    aliases.promote_version(uri, NAME, v1, reason="first champion")  # v2 stays the challenger
    cfg = ServeConfig(model_name=NAME, tracking_uri=uri, port=free_port(), poll_interval_s=1.0, max_tokens_cap=16,
                      max_prompt_tokens=64, signals_interval_s=1.0, app_name="test-live")
    os.environ["PREFECT_API_URL"] = f"http://127.0.0.1:{free_port()}/api"  # nothing listens there
    try:
        serving.start(cfg, ray_temp_dir=RAY_TMP)
    finally:
        os.environ.pop("PREFECT_API_URL")
    client = httpx.Client(base_url=f"http://127.0.0.1:{cfg.port}", timeout=60)
    try:
        yield {"uri": uri, "v1": v1, "v2": v2, "client": client}
    finally:
        client.close()
        serving.stop(cfg)


def metrics(client) -> dict[tuple, float]:
    """`/metrics` as {(sample name, sorted labels): value}, read by Prometheus' own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    r = client.get("/metrics")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain; version=0.0.4"), r.text
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text) for s in family.samples}


def of(version: str, **more) -> tuple:
    return tuple(sorted({"model": NAME, "version": version, **more}.items()))


@pytest.fixture(scope="module")
def traffic(server):
    """Requests to both versions, a bad one of each kind (one refused by the champion); what each version answered."""
    from prefect_lora.deploy.live_signals import AnswerContract, json_answer_problem, off_prompt

    c, sent, asked = server["client"], {server["v1"]: [], server["v2"]: []}, {server["v1"]: [], server["v2"]: []}
    for model, prompt in ((None, PROMPT), (None, [PROMPT, "Cancel my order"]), (f"{NAME}@champion", "Track it"),
                          (f"{NAME}@challenger", PROMPT), (f"{NAME}/{server['v2']}", "Return the lamp")):
        r = c.post("/v1/completions", json={"prompt": prompt, "max_tokens": 8, "model": model or NAME})
        assert r.status_code == 200, r.text
        sent[r.json()["model"].rsplit("/", 1)[1]].append(r.json())
        asked[r.json()["model"].rsplit("/", 1)[1]] += [prompt] if isinstance(prompt, str) else prompt
    assert c.post("/v1/completions", json={"prompt": "x" * 100, "model": f"{NAME}@champion"}).status_code == 400  # over 64 tokens
    assert c.post("/v1/completions", json={"prompt": "hi", "model": f"{NAME}/99"}).status_code == 404  # no such version
    assert c.post("/v1/completions", content=b"{not json").status_code == 400  # names nothing
    texts = {v: [ch["text"] for a in answers for ch in a["choices"]] for v, answers in sent.items()}
    return {v: {"requests": len(answers), "answers": len(texts[v]), "refused": int(v == server["v1"]),
                "failed": sum(json_answer_problem(t, tuple(FIELDS)) is not None for t in texts[v]),
                "completion_tokens": sum(a["usage"]["completion_tokens"] for a in answers),
                "off_prompt": sum(off_prompt(p, t, AnswerContract(True, tuple(FIELDS))) for p, t in zip(asked[v], texts[v]))}
            for v, answers in sent.items()}


def test_metrics_count_each_versions_requests_tokens_and_failed_json_checks(server, traffic):
    v1, v2 = server["v1"], server["v2"]
    assert traffic[v1]["requests"] == 3 and traffic[v1]["answers"] == 4 and traffic[v2]["requests"] == 2
    assert traffic[v1]["failed"] == 4 and traffic[v2]["failed"] == 2  # random adapters write no JSON object
    m = metrics(server["client"])
    assert m[("prefect_lora_requests_total", of(v1))] == 4  # 3 answered + 1 refused as the client's
    assert m[("prefect_lora_client_errors_total", of(v1))] == 1 and m[("prefect_lora_client_errors_total", of(v2))] == 0
    assert m[("prefect_lora_requests_total", of(v2))] == 2
    for v in (v1, v2):
        assert m[("prefect_lora_request_errors_total", of(v))] == 0
        assert m[("prefect_lora_answers_total", of(v))] == traffic[v]["answers"]
        assert m[("prefect_lora_answers_json_checked_total", of(v))] == traffic[v]["answers"]
        assert m[("prefect_lora_answers_failed_checks_total", of(v))] == traffic[v]["failed"]
        assert (m[("prefect_lora_answers_json_invalid_total", of(v))]
                + m[("prefect_lora_answers_fields_missing_total", of(v))]) == traffic[v]["failed"]
        assert m[("prefect_lora_completion_tokens_total", of(v))] == traffic[v]["completion_tokens"]
        assert m[("prefect_lora_answers_off_prompt_total", of(v))] == traffic[v]["off_prompt"]
        assert m[("prefect_lora_request_duration_seconds_count", of(v))] == traffic[v]["requests"]
        assert m[("prefect_lora_request_duration_seconds_bucket", of(v, le="+Inf"))] == traffic[v]["requests"]
        assert 0 < m[("prefect_lora_request_duration_window_seconds", of(v, quantile="0.95"))] < 60
    assert m[("prefect_lora_rejected_requests_total", (("status", "404"),))] == 1
    assert m[("prefect_lora_rejected_requests_total", (("status", "400"),))] == 1


def test_the_summaries_reach_each_versions_run_and_page(server, traffic):
    from mlflow import MlflowClient
    from prefect_lora.deploy.live_export import SUMMARY_TAG

    c = MlflowClient(server["uri"])
    for v in (server["v1"], server["v2"]):
        run_id = c.get_model_version(NAME, v).run_id

        def summarised(run_id=run_id, v=v):  # every request of the traffic, over however many summaries
            return sum(p.value for p in c.get_metric_history(run_id, "live/requests")) == traffic[v]["requests"] + traffic[v]["refused"]

        wait_for(summarised, 60, f"the summaries of version {v} in MLflow")
        failures = [p.value for p in c.get_metric_history(run_id, "live/check_failure_rate")]
        assert failures and all(f == 1.0 for f in failures)
        tag = c.get_model_version(NAME, v).tags[SUMMARY_TAG]  # the latest summary's line: its window may hold
        assert " in the last " in tag  # only the refused request, so no answer to check (seen once under load)


def test_a_prefect_api_that_is_down_is_counted_and_serving_goes_on(server, traffic):
    key = ("prefect_lora_signals_export_failures_total", (("sink", "prefect"),))
    wait_for(lambda: metrics(server["client"]).get(key, 0) >= 1, 60, "a failed send to Prefect")
    r = server["client"].post("/v1/completions", json={"prompt": PROMPT, "max_tokens": 4})
    assert r.status_code == 200, r.text
    assert metrics(server["client"]).get(("prefect_lora_signals_export_failures_total", (("sink", "mlflow"),)), 0) == 0
