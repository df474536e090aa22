"""Fuzzing the serving rules without Ray: whatever a request body holds, the gateway reads it into
a payload a replica can run, or refuses it with a 4xx whose JSON names the field and the fix."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from prefect_lora.deploy.serve_core import (
    MAX_ALIAS_CHARS,
    MAX_VERSION,
    RequestProblem,
    ServeConfig,
    check_body_size,
    parse_json,
    parse_model_field,
    parse_request,
)
from prefect_lora.deploy.testing import HUGE_DIGITS, ROUTES, request_bodies

CFG = ServeConfig(model_name="m", members=["sums-de"], max_prompt_chars=200, max_tokens_cap=8, max_batch=3,
                  max_body_bytes=16_384)
FIX_WORDS = ("use ", "send ", "must ", "at most", "the limit is", "needs", "is required")


def read(op: str, body: bytes) -> tuple[str, str, dict] | RequestProblem:
    """What the gateway makes of a body before any model runs (`Gateway._guard`, `_run`)."""
    try:
        check_body_size(len(body), CFG)
        return parse_request(op, parse_json(body), CFG)
    except RequestProblem as exc:
        return exc


def check_refusal(problem: RequestProblem) -> None:
    assert 400 <= problem.status < 500, problem.message
    answer = json.loads(json.dumps(problem.body()))  # as the gateway sends it: JSON in ASCII, any string survives
    assert answer["error"]["code"] == problem.status and answer["error"]["message"] == problem.message
    assert len(problem.message) < 600, "the message quotes the request's values cut short"
    named = f"'{problem.param}'" in problem.message or problem.param == "model" if problem.param \
        else "request body" in problem.message or "Content-Length" in problem.message
    assert named, problem.message
    assert any(word in problem.message for word in FIX_WORDS), problem.message


def check_payload(op: str, name: str, ref: str, payload: dict) -> None:
    assert name in CFG.served
    if ref.isdigit():
        assert ref == str(int(ref)) and 1 <= int(ref) <= MAX_VERSION
    else:
        assert ref.isascii() and ref.replace("-", "").replace("_", "").isalnum() and len(ref) <= MAX_ALIAS_CHARS
    texts = payload.get("prompts") or payload.get("texts") or [m["content"] for m in payload["messages"]]
    for text in texts:
        assert isinstance(text, str) and len(text) <= CFG.max_prompt_chars
        text.encode("utf-8")  # a tokenizer can read it: no lone surrogate
    if op != "classify":
        assert type(payload["max_tokens"]) is int and 1 <= payload["max_tokens"] <= CFG.max_tokens_cap
        assert payload["temperature"] == 0 or 0.01 <= payload["temperature"] <= 2


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(request_bodies(tuple(CFG.served)))
@example(("/v1/completions", b'{"prompt": "hi", "model": "m/' + HUGE_DIGITS.encode() + b'"}'))
@example(("/v1/completions", b'{"prompt": "\\ud800"}'))
@example(("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "a\\udfffb"}]}'))
@example(("/v1/completions", b'{"prompt": "hi", "max_tokens": ' + HUGE_DIGITS.encode() + b"}"))
@example(("/v1/completions", b'{"prompt": "hi", "model": "sums-de@challenger", "max_tokens": 3, "temperature": 0.5}'))
def test_any_body_is_a_runnable_payload_or_a_4xx_naming_the_field_and_the_fix(route_and_body):
    route, body = route_and_body
    result = read(ROUTES[route], body)
    event("refused" if isinstance(result, RequestProblem) else "runnable")
    if isinstance(result, RequestProblem):
        check_refusal(result)
    else:
        check_payload(ROUTES[route], *result)


@pytest.mark.parametrize("model, status, needle", [
    (f"m/{HUGE_DIGITS}", 404, "5000 digits"), (f"m/v{HUGE_DIGITS}", 404, "5000 digits"), (HUGE_DIGITS, 404, "5000 digits"),
    (f"m/{MAX_VERSION + 1}", 404, f"at most {MAX_VERSION}"), (f"m@{'a' * 300}", 404, f"at most {MAX_ALIAS_CHARS}"),
    ("m@\ud800", 400, "cannot read model"), ("\ud800@champion", 404, "not '\\ud800'"),
])
def test_references_no_registry_can_hold_are_refused_before_any_lookup(model, status, needle):
    with pytest.raises(RequestProblem) as exc:
        parse_model_field(model, "m")
    assert exc.value.status == status and needle in exc.value.message and exc.value.param == "model"
    assert len(exc.value.message) < 300


def test_the_largest_version_and_leading_zeros_still_name_a_version():
    assert parse_model_field(f"m/{MAX_VERSION}", "m") == ("m", str(MAX_VERSION))
    assert parse_model_field("m/" + "0" * 5000 + "7", "m") == ("m", "7")


@pytest.mark.parametrize("body, param, needle", [
    (b'{"prompt": "\\ud800"}', "prompt", "lone surrogate"),
    (b'{"prompt": ["ok", "x\\udc00"]}', "prompt", "at character 1"),
    (b'{"prompt": "hi", "max_tokens": ' + HUGE_DIGITS.encode() + b"}", "max_tokens", "integer of 5000 digits"),
    (b'{"prompt": "hi", "temperature": -' + HUGE_DIGITS.encode() + b"}", "temperature", "integer of 5000 digits"),
    (b'{"prompt": ' + HUGE_DIGITS.encode() + b"}", "prompt", "integer of 5000 digits"),
])
def test_text_no_tokenizer_reads_and_numbers_python_cannot_read_are_refused_by_name(body, param, needle):
    problem = read("complete", body)
    assert isinstance(problem, RequestProblem) and problem.status == 400 and problem.param == param
    assert needle in problem.message


def test_bidi_controls_and_nul_are_text_and_reach_the_model_as_sent():
    _, _, payload = read("complete", json.dumps({"prompt": ["\u202eevil\u202c", "nul\x00here"]}).encode())
    assert payload["prompts"] == ["\u202eevil\u202c", "nul\x00here"]
