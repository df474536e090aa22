"""Live signals per served version (`deploy/live_signals.py`, `deploy/live_export.py`): what one
request adds, windows, quantiles off the histogram, the Prometheus text, and summaries whose
sinks may be down. A clock of the test's own; the sinks are replaced (no MLflow, no Prefect)."""

from __future__ import annotations

import asyncio
import json
import logging
import random

import pytest
from prefect_lora.deploy import live_export
from prefect_lora.deploy.languages import language_of
from prefect_lora.deploy.live_export import LiveSignals
from prefect_lora.deploy.live_signals import (
    LATENCY_BOUNDS_S,
    AnswerContract,
    SignalStore,
    Tally,
    answered,
    exposition,
    failed,
    figures,
    json_answer_problem,
    off_prompt,
    quantile,
    stopped_mid_sentence,
    summary_line,
)

ORDER = AnswerContract(json=True, required_fields=("intent", "quantity"))


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def generation(*answers: tuple[str, str], prompt_tokens: int = 5, completion_tokens: int = 7) -> dict:
    return {"texts": [a for a, _ in answers], "finish": [f for _, f in answers],
            "prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens}


@pytest.mark.parametrize("text, problem", [
    ('{"intent": "order", "quantity": 2}', None),
    ('  {"intent": "order", "quantity": 2, "extra": 1}\n', None),  # stripped, as evaluation reads it
    ('{"intent": "order"}', "missing"),
    ('{"intent": "order", "quantity": 2', "invalid"),  # cut off at max_tokens
    ('["intent", "quantity"]', "invalid"),  # JSON, but no object
    ('"intent"', "invalid"),
    ("", "invalid"),
    ("Sure! Here is the JSON: {}", "invalid"),
])
def test_a_json_answer_is_an_object_holding_the_required_fields(text, problem):
    assert json_answer_problem(text, ORDER.required_fields) == problem


def test_an_answered_generation_counts_tokens_latency_and_each_answers_checks():
    result = generation(('{"intent": "order", "quantity": 1}', "stop"), ('{"intent": "x"}', "stop"),
                        ('{"intent": "order", "qu', "length"), ("   ", "stop"))
    t = answered(result, 0.12, ORDER)
    assert (t.requests, t.errors, t.client_errors, t.prompt_tokens, t.completion_tokens) == (1, 0, 0, 5, 7)
    assert (t.generated, t.json_checked, t.json_invalid, t.fields_missing, t.empty, t.truncated) == (4, 4, 2, 1, 1, 1)
    assert t.failed_checks == 3  # invalid twice, a field missing once: each answer once
    assert sum(t.latency) == 1 and t.latency[LATENCY_BOUNDS_S.index(0.15)] == 1  # 0.1 < 0.12 <= 0.15
    plain = answered(result, 0.12)  # a version with no JSON contract: only empty answers fail
    assert (plain.json_checked, plain.failed_checks, plain.empty, plain.truncated) == (0, 1, 1, 1)
    assert t.unfinished == 0, "the answer that stopped on '{\"intent\": \"x\"}' ended its object; the cut one is `truncated`"


@pytest.mark.parametrize("answer, finish, unfinished", [
    ("The order is cancelled and your refund is on its way.", "stop", False),
    ("The order is cancelled and your refund is on its", "stop", True),  # an early end token
    ("The order is cancelled and your refund is on its", "length", False),  # max_tokens: `truncated`'s
    ("Please confirm the following:", "stop", True),
    ("We will refund you for the mats,", "stop", True),
    ("Two items (both damaged", "stop", True),
    ("Die Bestellung ist stornier", "stop", True),
    ("Заказ отменён", "stop", True),
    ("ご注文はキャンセルされました。", "stop", False),
    ("17", "stop", False),
    ('{"intent": "cancel"}', "stop", False),
    ("Done!  \n", "stop", False),
    ("   ", "stop", False),  # empty: the output check's
])
def test_an_answer_that_ended_by_itself_mid_sentence_is_unfinished(answer, finish, unfinished):
    t = answered(generation((answer, finish)), 0.1)
    assert t.unfinished == unfinished
    assert stopped_mid_sentence(answer) is unfinished or finish == "length"


def test_unfinished_answers_are_a_rate_a_summary_and_a_counter():
    t = answered(generation(("The refund is on its way.", "stop"), ("The refund is on", "stop"),
                            ("The refund is on its way to", "length"), ("Your refund", "stop")), 0.1)
    assert (t.truncated, t.unfinished, t.failed_checks) == (1, 2, 0), "no output check fails: only this rate sees it"
    f = figures(t)
    assert (f["truncated_rate"], f["unfinished_rate"]) == (0.25, 0.5)
    assert "cut at max_tokens 25.0%, stopped mid-sentence 50.0%" in summary_line(f, 60)
    assert 'prefect_lora_answers_unfinished_total{model="m",version="1"} 2' in _exposed(t)


ASKED = "Hi team, please cancel my order of two yoga mats, they arrived damaged. Thank you for the help."


@pytest.mark.parametrize("prompt, answer, off", [
    (ASKED, "Your order of two yoga mats is cancelled and the refund is on its way to you.", False),
    (ASKED, "Ihre Bestellung ist storniert und die Erstattung ist auf dem Weg zu Ihnen, wir danken für die Geduld.", True),
    (ASKED, "Votre commande est annulée et le remboursement est en route pour vous, merci de votre patience.", True),
    (ASKED, "Ваш заказ отменён, деньги вернутся в течение недели.", True),
    (ASKED, "ご注文はキャンセルされました。返金手続きを進めます。", True),
    (ASKED, "OK", False),  # too little to tell: never counted
    ("12+5=", "17", False),
    ("Qual é a capital do Brasil? Responda com uma frase curta.", "A capital do Brasil é Brasília, fundada em 1960.", False),
    ("Qual é a capital do Brasil? Responda com uma frase curta.", "The capital of Brazil is Brasília, which was founded in 1960.", True),
    (ASKED, "Cancelled: 2 yoga mats (damaged) - refund #4471", False),  # no function words: Latin, language untold
])
def test_an_answer_in_another_language_than_its_prompt_is_off_the_prompt(prompt, answer, off):
    assert off_prompt(prompt, answer) is off
    assert language_of(ASKED) == "en"


@pytest.mark.parametrize("answer, off", [
    ('{"intent": "cancel", "product": "yoga mat", "quantity": 2}', False),  # a value copied from the prompt
    ('{"intent": "stornieren", "product": "Yogamatte", "quantity": 2}', True),  # translated: nothing from the prompt
    ('{"intent": "cancel", "product": "Yogamatte", "quantity": 2}', False),  # one value from the prompt is enough
    ('{"quantity": 2}', False),  # no text value to look for
    ('{"intent": "cancel", "product": "yoga mat"', False),  # no JSON: the JSON check's, not this one's
])
def test_a_json_answer_drawing_no_value_from_its_prompt_is_off_the_prompt(answer, off):
    assert off_prompt(ASKED, answer, ORDER) is off
    assert not off_prompt(ASKED, answer), "without a JSON contract only the language counts"


def test_answers_off_their_prompt_are_counted_where_the_prompts_are_known():
    result = generation(('{"intent": "cancel", "product": "yoga mat", "quantity": 2}', "stop"),
                        ('{"intent": "stornieren", "product": "Yogamatte", "quantity": 2}', "stop"))
    assert answered(result, 0.1, ORDER, [ASKED, ASKED]).off_prompt == 1
    assert answered(result, 0.1, ORDER).off_prompt == 0  # prompts unknown: not counted
    t = answered(result, 0.1, ORDER, [ASKED, ASKED])
    assert t.failed_checks == 0, "valid JSON with its fields: the output checks pass, only this signal sees it"
    assert figures(t)["off_prompt_rate"] == 0.5 and "off the prompt" in summary_line(figures(t), 60)
    assert 'prefect_lora_answers_off_prompt_total{model="m",version="1"} 1' in _exposed(t)


def _exposed(t: Tally) -> str:
    store = SignalStore(clock=Clock())
    store.add("m/1", t)
    return exposition(store)


def test_a_classification_counts_its_labels_and_no_answer_checks():
    t = answered({"labels": ["pos", "neg", "pos"], "scores": [0.9, 0.8, 0.7]}, 0.01)
    assert t.labels == {"pos": 2, "neg": 1} and t.classified == 3 and t.generated == t.failed_checks == 0
    f = figures(t)
    assert f["label_share/pos"] == pytest.approx(2 / 3) and "check_failure_rate" not in f


def test_a_5xx_is_the_versions_error_and_a_4xx_the_clients():
    server, client = failed(504, 60.0), failed(400, 0.001)
    assert (server.requests, server.errors, server.client_errors, sum(server.latency)) == (1, 1, 0, 1)
    assert (client.requests, client.errors, client.client_errors, sum(client.latency)) == (1, 0, 1, 0)
    f = figures(server + client + answered(generation(("ok", "stop")), 0.2))
    assert f["error_rate"] == 0.5  # of the 2 requests the version served: the client's 4xx is not its error


def test_tallies_add_and_subtract_back():
    a = answered(generation(("{}", "stop")), 0.25, ORDER) + answered({"labels": ["pos"]}, 0.5)  # exact in binary
    b = answered({"labels": ["neg"]}, 1.0) + failed(500, 2.0)
    assert (a + b) - b == a and (a + b) - a == b
    assert ((a + b) - b).labels == {"pos": 1}  # labels counted down to 0 are gone


@pytest.mark.parametrize("latencies, q, expected", [
    ([0.12] * 10, 0.5, (0.1, 0.15)),  # one bucket: within it
    ([0.001] * 95 + [10.0] * 5, 0.95, (0.0, 0.001)),
    ([0.001] * 94 + [10.0] * 6, 0.95, (7.5, 10.0)),
    ([5000.0] * 3, 0.5, (750.0, 750.0)),  # past the last bound: that bound
])
def test_quantiles_read_off_the_histogram_land_in_the_right_bucket(latencies, q, expected):
    t = Tally()
    for x in latencies:
        t = t + answered({}, x)
    assert expected[0] <= quantile(t.latency, q) <= expected[1]


def test_quantiles_off_the_histogram_are_within_a_bucket_of_the_exact_ones():
    rng = random.Random(7)
    latencies = sorted(rng.lognormvariate(-1.5, 0.8) for _ in range(2000))
    t = Tally()
    for x in latencies:
        t = t + answered({}, x)
    for q in (0.5, 0.95):
        exact = latencies[int(q * len(latencies)) - 1]
        assert exact / 1.25 < quantile(t.latency, q) < exact * 1.25, q
    assert quantile(Tally().latency, 0.5) is None


def test_the_recent_window_drops_slots_older_than_it_and_since_a_mark_is_exact():
    clock = Clock()
    store = SignalStore(window_s=60, slots=6, clock=clock)
    store.add("m/1", answered(generation(("a", "stop")), 0.1))
    mark = store.mark()
    clock.now += 30
    store.add("m/1", answered(generation(("b", "stop")), 0.1))
    store.add("m/2", failed(500, 1.0), 500)
    seconds, recent = store.recent()
    assert seconds == 30 and recent["m/1"].requests == 2  # younger than the window: everything since the start
    clock.now += 45  # the first request is 75 s old, the others 45 s
    seconds, recent = store.recent()
    assert seconds == 60 and recent["m/1"].requests == 1 and recent["m/2"].errors == 1
    since = store.since(mark)  # the same instant for both versions, however long ago
    assert since["m/1"].requests == 1 and since["m/2"].requests == 1
    assert store.totals["m/1"].requests == 2
    clock.now += 1000
    assert store.recent()[1] == {} and store.since(store.mark()) == {}


def test_requests_that_name_no_served_version_are_counted_apart_and_versions_are_bounded():
    store = SignalStore(max_versions=3, clock=Clock())
    store.add(None, failed(401, 0.0), 401)
    store.add("m/99", failed(404, 0.0), 404)  # the replica found no such version
    assert store.totals == {} and store.rejected == {401: 1, 404: 1}
    for v in (1, 2, 3, 1, 4):
        store.add(f"m/{v}", failed(500, 0.1), 500)
    assert list(store.totals) == ["m/3", "m/1", "m/4"]  # the least recently seen went
    assert store.totals["m/1"].errors == 2
    mark = store.mark()
    store.add("m/5", failed(500, 0.1), 500)  # m/3 goes: marked at 1 error, and ...
    store.add("m/3", failed(400, 0.0), 400)  # ... back with none of its old counts
    assert store.since(mark)["m/3"] == failed(400, 0.0) and store.since(mark)["m/5"].errors == 1


def test_the_exposition_parses_as_prometheus_text_with_each_versions_counts():
    parser = pytest.importorskip("prometheus_client.parser")
    store = SignalStore(clock=Clock())
    for _ in range(3):
        store.add("orders/1", answered(generation(('{"intent": "a", "quantity": 1}', "stop")), 0.05, ORDER))
    store.add("orders/2", answered(generation(("nope", "length")), 0.4, ORDER))
    store.add("orders/2", failed(504, 60.0), 504)
    store.add('we"ird\\name/3', answered({"labels": ["pos", "neg"]}, 0.02))
    store.add(None, failed(413, 0.0), 413)
    families = {f.name: f for f in parser.text_string_to_metric_families(exposition(store, {"mlflow": 2}))}

    def value(family: str, sample: str | None = None, **labels) -> float:
        found = [s.value for s in families[family].samples
                 if s.name == (sample or family) and all(s.labels.get(k) == v for k, v in labels.items())]
        assert len(found) == 1, (family, labels, found)
        return found[0]

    assert value("prefect_lora_requests", "prefect_lora_requests_total", model="orders", version="1") == 3
    assert value("prefect_lora_requests", "prefect_lora_requests_total", model="orders", version="2") == 2
    assert value("prefect_lora_request_errors", "prefect_lora_request_errors_total", version="2") == 1
    assert value("prefect_lora_answers_json_invalid", "prefect_lora_answers_json_invalid_total", version="2") == 1
    assert value("prefect_lora_answers_failed_checks", "prefect_lora_answers_failed_checks_total", version="1") == 0
    assert value("prefect_lora_classified", "prefect_lora_classified_total", model='we"ird\\name', label="pos") == 1
    hist = "prefect_lora_request_duration_seconds"
    assert families[hist].type == "histogram"
    assert value(hist, f"{hist}_count", version="2") == 2 and value(hist, f"{hist}_bucket", version="2", le="0.5") == 1
    assert value(hist, f"{hist}_bucket", version="2", le="+Inf") == 2 and value(hist, f"{hist}_sum", version="2") == 60.4
    p95 = value("prefect_lora_request_duration_window_seconds", version="1", quantile="0.95")
    assert 0.03 < p95 <= 0.05
    assert value("prefect_lora_rejected_requests", "prefect_lora_rejected_requests_total", status="413") == 1
    assert value("prefect_lora_signals_export_failures", "prefect_lora_signals_export_failures_total", sink="mlflow") == 2


def test_figures_and_the_summary_line_say_the_rates():
    t = answered(generation(('{"intent": "a", "quantity": 1}', "stop"), ("oops", "length")), 0.2, ORDER) + failed(500, 3.0)
    f = figures(t)
    assert (f["requests"], f["error_rate"], f["answers"], f["check_failure_rate"], f["json_invalid_rate"]) == (2, 0.5, 2, 0.5, 0.5)
    assert f["truncated_rate"] == 0.5 and f["latency_p50_s"] <= 0.2 < f["latency_p95_s"] <= 3.0
    line = summary_line(f, 60)
    assert "2 requests in the last 60 s" in line and "errors 50.0%" in line and "no JSON object 50.0%" in line


@pytest.mark.parametrize("settings, contract", [
    ({"task": "causal_lm", "answer_format": "json", "required_fields": ["a", "b"]}, AnswerContract(True, ("a", "b"))),
    ({"task": "causal_lm", "answer_format": "json"}, AnswerContract(True, ())),
    ({"task": "causal_lm"}, AnswerContract()),  # versions registered before the contract: no JSON checks
    ({"task": "sequence_classification", "labels": ["neg", "pos"]}, AnswerContract()),
])
def test_the_answer_contract_is_read_off_the_registered_settings(settings, contract):
    assert AnswerContract.from_settings(settings) == contract


# ----------------------------------------------------------------------------- the gateway's side


def _live(monkeypatch, clock=None, prefect: bool = False) -> LiveSignals:
    live = LiveSignals("sqlite:///unused.db", window_s=60, interval_s=1, clock=clock or Clock())
    live.contracts = {"orders/1": ORDER, "orders/2": ORDER}
    monkeypatch.setattr(live_export, "prefect_api_configured", lambda: prefect)
    return live


def refused(status: int) -> Exception:
    from prefect_lora.deploy.serve_core import RequestProblem

    return RequestProblem(status, "refused")  # what the gateway raises for a 4xx or 5xx answer


def test_a_request_is_counted_by_the_version_it_named_or_apart(monkeypatch):
    live = _live(monkeypatch)
    with live.request() as seen:
        seen.key, seen.result = "orders/1", generation(('{"intent": "a", "quantity": 1}', "stop"))
    for key, exc in ((None, refused(401)), ("orders/1", refused(400)), ("orders/2", RuntimeError())):
        with pytest.raises(type(exc)), live.request() as seen:
            seen.key = key
            raise exc
    one, two = live.store.totals["orders/1"], live.store.totals["orders/2"]
    assert (one.requests, one.client_errors, one.json_checked, two.errors) == (2, 1, 1, 1)  # an exception without a status: 500
    assert live.store.rejected == {401: 1}


def test_summaries_cover_the_interval_since_the_previous_one_and_reach_both_sinks(monkeypatch):
    clock = Clock()
    live = _live(monkeypatch, clock, prefect=True)
    written: list[tuple[str, dict, float]] = []
    monkeypatch.setattr(live, "_to_mlflow", lambda s, seconds: written.append(("mlflow", s, seconds)))

    async def to_prefect(s, seconds):
        written.append(("prefect", s, seconds))

    monkeypatch.setattr(live, "_to_prefect", to_prefect)
    live.store.add("orders/1", answered(generation(("{}", "stop")), 0.1, ORDER))
    clock.now += 60
    first = asyncio.run(live.summarise())
    assert first["mlflow"] == first["prefect"] and first["mlflow"]["orders/1"]["fields_missing_rate"] == 1.0
    assert [(sink, seconds) for sink, _, seconds in written] == [("mlflow", 60), ("prefect", 60)]
    live.store.add("orders/2", failed(500, 2.0), 500)
    clock.now += 30
    assert list(asyncio.run(live.summarise())["mlflow"]) == ["orders/2"]  # orders/1 had no request since
    assert asyncio.run(live.summarise()) == {"mlflow": {}, "prefect": {}} and len(written) == 4  # nothing new: nothing written


def test_a_sink_that_is_down_is_counted_and_logged_once_and_loses_no_request(monkeypatch, caplog):
    clock = Clock()
    live = _live(monkeypatch, clock)
    calls = []

    def down_twice(summaries, seconds):
        calls.append((summaries["orders/1"]["requests"], seconds))
        if len(calls) < 3:
            raise ConnectionError("connection refused")

    monkeypatch.setattr(live, "_to_mlflow", down_twice)
    with caplog.at_level(logging.INFO, logger="ray.serve"):
        for _ in range(3):
            live.store.add("orders/1", failed(400, 0.0), 400)
            clock.now += 10
            asyncio.run(live.summarise())
    assert live.failures == {"mlflow": 2}
    assert calls == [(1, 10), (2, 20), (3, 30)]  # each try covers what the failed ones could not write
    lines = [r.getMessage() for r in caplog.records]
    assert sum("writing the summary (or a rollout's state) to MLflow failed" in m for m in lines) == 1
    assert sum("writing the summary (or a rollout's state) to MLflow works again" in m for m in lines) == 1
    assert 'prefect_lora_signals_export_failures_total{sink="mlflow"} 2' in live.metrics_text()


def test_without_a_prefect_api_no_event_is_sent(monkeypatch):
    live = _live(monkeypatch, prefect=False)
    monkeypatch.setattr(live, "_to_mlflow", lambda s, seconds: None)

    async def never(s, seconds):
        raise AssertionError("no Prefect API is configured: no event")

    monkeypatch.setattr(live, "_to_prefect", never)
    live.store.add("orders/1", failed(500, 1.0), 500)
    assert asyncio.run(live.summarise()) == {"mlflow": {"orders/1": pytest.approx(figures(failed(500, 1.0)))}}
    assert live.failures == {}


def _events_client(monkeypatch, down: list[bool] | None = None) -> list:
    """Prefect's events client replaced by one that keeps what it is sent (the list returned), or
    that cannot connect while `down[0]`."""
    from prefect.events import clients

    sent = []

    class Client:
        async def __aenter__(self):
            if down and down[0]:
                raise ConnectionError("connection refused")
            return self

        async def __aexit__(self, *exc):
            return False

        async def emit(self, event):
            sent.append(event)

    monkeypatch.setattr(clients, "get_events_client", lambda **kw: Client())
    return sent


def test_events_name_the_version_as_their_resource(monkeypatch):
    sent = _events_client(monkeypatch)
    live = _live(monkeypatch)
    asyncio.run(live._to_prefect({"orders/2": {"requests": 3.0, "error_rate": 0.0}}, 60.0))
    (event,) = sent
    assert event.event == live_export.EVENT == "prefect-lora.model.live-signals"
    assert event.resource.id == "prefect-lora.model.orders.2" and event.resource["prefect-lora.version"] == "2"
    assert event.payload == {"window_s": 60.0, "requests": 3.0, "error_rate": 0.0}
    json.dumps(event.payload)  # plain numbers: an automation's template reads them


@pytest.mark.parametrize("config, contract", [
    ("demo.yaml", AnswerContract(True, ("intent", "product", "quantity", "urgency"))),
    ("tiny.yaml", AnswerContract()),
    ("sst2-tiny.yaml", AnswerContract()),
])
def test_the_registered_settings_carry_the_configs_answer_contract(config, contract):
    from pathlib import Path

    from prefect_lora.lora_tasks.config import load_config
    from prefect_lora.lora_tasks.registry.registry import answer_contract

    cfg = load_config(Path(__file__).resolve().parents[2] / "configs" / config)
    assert AnswerContract.from_settings({"task": cfg.task, **answer_contract(cfg)}) == contract


def test_a_summary_lands_on_each_versions_run_and_page_and_skips_a_deleted_version(tmp_path, tiny_model_dir):
    """The MLflow side of a summary on a real (SQLite) store: the version's run gets `live/`
    metrics, the version its `live.signals` tag; a version deleted since it answered is skipped."""
    from mlflow import MlflowClient
    from prefect_lora.deploy.testing import register_random_adapters

    uri = f"sqlite:///{tmp_path}/m.db"
    v1, v2 = register_random_adapters(uri, "orders", tiny_model_dir, [1, 2], tmp_path, required_fields=["intent"])
    c = MlflowClient(uri)
    c.delete_model_version("orders", v2)
    live = LiveSignals(uri, window_s=60, interval_s=None)
    asyncio.run(live.prepare(f"orders/{v1}"))
    assert live.contracts == {f"orders/{v1}": AnswerContract(True, ("intent",))}  # read off the registered settings
    f = figures(answered(generation(("{}", "stop")), 0.5, live.contracts[f"orders/{v1}"]))
    live._to_mlflow({f"orders/{v2}": f, f"orders/{v1}": f}, 60.0)
    run = c.get_run(c.get_model_version("orders", v1).run_id)
    assert run.data.metrics["live/requests"] == 1 and run.data.metrics["live/check_failure_rate"] == 1.0
    tag = c.get_model_version("orders", v1).tags[live_export.SUMMARY_TAG]
    assert tag.startswith("1 request in the last 60 s; errors 0.0%") and "failed output checks 100.0% of 1 answer;" in tag


def test_events_that_could_not_be_sent_go_first_with_the_next_send_as_the_same_events(monkeypatch):
    """A rollout's events while Prefect cannot be reached are kept and sent later, each once
    under its own id and time (Prefect keeps one event per id), before the newer ones."""
    down = [True]
    sent = _events_client(monkeypatch, down)
    monkeypatch.setattr(live_export, "MAX_UNSENT", 2)
    live = _live(monkeypatch, prefect=True)
    monkeypatch.setattr(live, "_to_mlflow", lambda s, seconds: None)
    started, advanced, dropped = (live_export.event(f"prefect-lora.rollout.{w}", "orders", "2", {}) for w in
                                  ("started", "advanced", "ignored"))
    assert not asyncio.run(live.emit([dropped])) and not asyncio.run(live.emit([started, advanced]))
    assert live.failures == {"prefect": 2} and sent == []
    down[0] = False
    asyncio.run(live.summarise())  # (no request since: only the kept events go)
    assert [(e.event, str(e.id), e.occurred.isoformat()) for e in sent] == [
        (e["event"], e["id"], e["occurred"]) for e in (started, advanced)]  # the newest 2 kept, as they were
    completed = live_export.event("prefect-lora.rollout.completed", "orders", "2", {})
    assert asyncio.run(live.emit([completed])) and [e.event for e in sent][-1] == completed["event"] and len(sent) == 3
