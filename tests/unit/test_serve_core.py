"""The serving rules without Ray: limits, model references, auth, canary, token handling."""

from __future__ import annotations

import random

import pytest
from prefect_lora.deploy.serve_core import (
    RequestProblem,
    Secret,
    ServeConfig,
    check_auth,
    check_body_size,
    choose_alias,
    load_serve_config,
    parse_chat,
    parse_classify,
    parse_completion,
    parse_json,
    parse_model_field,
    resolve_token,
    user_texts,
)

CFG = ServeConfig(model_name="m", max_prompt_chars=20, max_tokens_cap=8, default_max_tokens=4, max_batch=2,
                  max_body_bytes=300)


@pytest.mark.parametrize("body, status, needle", [
    ({}, 400, "'prompt' is required"),
    ({"prompt": 3}, 400, "string or a non-empty list"),
    ({"prompt": []}, 400, "non-empty list"),
    ({"prompt": "x" * 21}, 400, "21 characters; the limit is 20"),
    ({"prompt": ["a", "b", "c"]}, 400, "at most 2 per request"),
    ({"prompt": "hi", "max_tokens": 9}, 400, "at most 8"),
    ({"prompt": "hi", "max_tokens": 0}, 400, "positive integer"),
    ({"prompt": "hi", "max_tokens": "5"}, 400, "positive integer"),
    ({"prompt": "hi", "temperature": 3}, 400, "from 0.01 to 2"), ({"prompt": "hi", "temperature": 1e-300}, 400, "0 (greedy)"),
])
def test_completion_limits(body, status, needle):
    with pytest.raises(RequestProblem) as exc:
        parse_completion(body, CFG)
    assert exc.value.status == status and needle in exc.value.message


def test_completion_defaults():
    assert parse_completion({"prompt": "hi"}, CFG) == {"prompts": ["hi"], "max_tokens": 4, "temperature": 0.0}
    assert parse_completion({"prompt": ["a", "b"], "max_tokens": 8, "temperature": 0.5}, CFG)["prompts"] == ["a", "b"]


@pytest.mark.parametrize("messages, needle", [
    (None, "non-empty list"),
    ([{"role": "robot", "content": "x"}], "role"),
    ([{"role": "user", "content": 1}], "string content"),
    ([{"role": "system", "content": "be nice"}], "at least one user"),
    ([{"role": "user", "content": "x" * 15}, {"role": "user", "content": "y" * 10}], "25 characters"),
])
def test_chat_limits(messages, needle):
    with pytest.raises(RequestProblem, match=needle):
        parse_chat({"messages": messages}, CFG)


def test_classify_needs_input():
    with pytest.raises(RequestProblem, match="'input' is required"):
        parse_classify({}, CFG)
    assert parse_classify({"input": "good"}, CFG) == {"texts": ["good"]}


def test_what_the_user_wrote_for_each_answer_is_each_prompt_or_the_chats_last_user_message():
    """What the live check of an answer's language compares it with (not the chat template)."""
    assert user_texts(parse_completion({"prompt": ["a", "b"]}, CFG)) == ["a", "b"]
    chat = [{"role": "system", "content": "sys"}, {"role": "user", "content": "q1"},
            {"role": "assistant", "content": "a1"}, {"role": "user", "content": "q2"}]
    assert user_texts(parse_chat({"messages": chat}, CFG)) == ["q2"]
    assert user_texts(parse_classify({"input": "good"}, CFG)) is None


@pytest.mark.parametrize("model, ref", [
    (None, "champion"), ("", "champion"), ("m", "champion"), ("m@champion", "champion"), ("m@challenger", "challenger"),
    ("m/3", "3"), ("3", "3"), ("v3", "3"), ("challenger", "challenger"), ("m/0003", "3"), ("v03", "3"),
])
def test_model_field(model, ref):
    assert parse_model_field(model, "m") == ("m", ref)


@pytest.mark.parametrize("model, expected", [
    (None, ("m", "champion")), ("m", ("m", "champion")), ("sums-de", ("sums-de", "champion")),
    ("sums-de@challenger", ("sums-de", "challenger")), ("sums.v2/7", ("sums.v2", "7")), ("3", ("m", "3")),
    ("challenger", ("m", "challenger")),
])
def test_model_field_names_one_of_many_served_models(model, expected):
    assert parse_model_field(model, ["m", "sums-de", "sums.v2"]) == expected


def test_an_unserved_member_is_404_naming_a_few_served_ones():
    with pytest.raises(RequestProblem) as exc:
        parse_model_field("sums-xx@champion", [f"sums-{i:03d}" for i in range(100)])
    assert exc.value.status == 404 and "sums-000, sums-001" in exc.value.message and "and 95 more" in exc.value.message


@pytest.mark.parametrize("model, status", [("other@champion", 404), ("other/2", 404), (5, 400), ("m@", 400), ("m@bad alias!", 400),
                                           ("m/\u0661", 400), ("m/\u00b2", 400), ("m/0", 400), ("m/2.0", 400)])
def test_model_field_errors(model, status):
    with pytest.raises(RequestProblem) as exc:
        parse_model_field(model, "m")
    assert exc.value.status == status


@pytest.mark.parametrize("header, ok", [
    ("Bearer tok", True), ("bearer tok", True), (None, False), ("", False), ("Bearer", False),
    ("Bearer wrong", False), ("Basic tok", False), ("Bearer tok2", False),
])
def test_auth(header, ok):
    token = Secret("tok")
    if ok:
        check_auth(header, token)
    else:
        with pytest.raises(RequestProblem) as exc:
            check_auth(header, token)
        assert exc.value.status == 401 and "tok" not in exc.value.message.replace("token", "")


def test_no_token_configured_means_open():
    check_auth(None, None)


def test_secret_never_shows_itself():
    s = Secret("hunter2")
    assert "hunter2" not in repr(s) and "hunter2" not in str(s) and "hunter2" not in f"{s}"
    assert s.get() == "hunter2"


def test_token_from_env(monkeypatch):
    monkeypatch.setenv("PREFECT_LORA_SERVE_TOKEN", "abc")
    assert resolve_token(ServeConfig(model_name="m")).get() == "abc"
    monkeypatch.delenv("PREFECT_LORA_SERVE_TOKEN")
    assert resolve_token(ServeConfig(model_name="m")) is None


def test_body_size_and_json():
    check_body_size("300", CFG)
    with pytest.raises(RequestProblem) as exc:
        check_body_size(301, CFG)
    assert exc.value.status == 413
    with pytest.raises(RequestProblem, match="not valid JSON"):
        parse_json(b"{oops")
    with pytest.raises(RequestProblem, match="not a number of bytes"):
        check_body_size("12abc", CFG)
    with pytest.raises(RequestProblem, match="nests JSON too deeply"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
    with pytest.raises(RequestProblem, match="JSON object"):
        parse_json(b"[1, 2]")
    assert parse_json(b'{"a": 1}') == {"a": 1}


def test_canary_share():
    rng = random.Random(0)
    picks = [choose_alias("champion", 0.3, True, rng) for _ in range(2000)]
    assert 0.25 < picks.count("challenger") / len(picks) < 0.35
    assert choose_alias("champion", 0.3, False, rng) == "champion"  # no distinct challenger
    assert choose_alias("3", 1.0, True, rng) == "3"  # an explicit version is never redirected
    assert choose_alias("champion", 0.0, True, rng) == "champion"


def test_serve_config_errors_are_one_message(tmp_path):
    path = tmp_path / "serve.yaml"
    path.write_text("canary_share: 2\nsurprise: 1\n")
    with pytest.raises(ValueError) as exc:
        load_serve_config(path, model_name="m")
    assert "canary_share" in str(exc.value) and "surprise" in str(exc.value)


def test_the_example_serve_configs_load():
    from pathlib import Path

    deploy = Path(__file__).resolve().parents[2] / "deploy"
    cfg = load_serve_config(deploy / "serve.yaml", model_name="m", port=9000)
    assert cfg.port == 9000 and cfg.mode == "adapter" and cfg.trust_remote_code is False
    assert cfg.rollout is None  # a promotion takes all traffic at once unless a rollout is configured
    demo = load_serve_config(deploy / "serve-rollout-demo.yaml", model_name="demo-orders")
    assert demo.rollout.steps[-1] == 1.0 and demo.rollout.rollback == "serve"


def test_token_from_a_prefect_secret_block(monkeypatch):
    from prefect.blocks.system import Secret as SecretBlock

    monkeypatch.delenv("PREFECT_LORA_SERVE_TOKEN", raising=False)
    loaded = []
    monkeypatch.setattr(SecretBlock, "load", classmethod(lambda cls, name: loaded.append(name) or SecretBlock(value="from-block")))
    token = resolve_token(ServeConfig(model_name="m", token_secret_block="serve-token"))
    assert token.get() == "from-block" and loaded == ["serve-token"]
    monkeypatch.setenv("PREFECT_LORA_SERVE_TOKEN", "env-wins")
    assert resolve_token(ServeConfig(model_name="m", token_secret_block="serve-token")).get() == "env-wins"


def test_a_missing_secret_block_is_one_clear_message(monkeypatch):
    from prefect.blocks.system import Secret as SecretBlock

    def boom(cls, name):
        raise ValueError("Unable to find block document named nope")

    monkeypatch.delenv("PREFECT_LORA_SERVE_TOKEN", raising=False)
    monkeypatch.setattr(SecretBlock, "load", classmethod(boom))
    with pytest.raises(ValueError, match="Prefect Secret block 'nope'.*PREFECT_LORA_SERVE_TOKEN"):
        resolve_token(ServeConfig(model_name="m", token_secret_block="nope"))


@pytest.mark.parametrize("content, says", [
    (None, "no such file"), ("dir", "is a folder"), ("port: [1\n", "not valid YAML at line"),
    ("- a\n- b\n", "must be a mapping of settings"), ("port: 0\n", "port"), (b"\xff\xfe", "not UTF-8"),
])
def test_a_bad_serve_config_is_one_message_naming_the_fix(tmp_path, content, says):
    from prefect_lora.deploy.serve_core import load_serve_config

    path = tmp_path / "serve.yaml"
    if content == "dir":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    with pytest.raises(ValueError, match=says):
        load_serve_config(path, model_name="m")


def test_options_not_given_leave_the_serve_files_host_and_port(tmp_path):
    from prefect_lora.deploy.serve_core import load_serve_config

    (tmp_path / "s.yaml").write_text("host: 10.1.2.3\nport: 9001\nallow_unauthenticated: true\n")
    cfg = load_serve_config(tmp_path / "s.yaml", model_name="m", host=None, port=None)
    assert (cfg.host, cfg.port) == ("10.1.2.3", 9001)
    assert load_serve_config(tmp_path / "s.yaml", model_name="m", port=8123).port == 8123


@pytest.mark.parametrize("host, token, allowed, ok", [
    ("127.0.0.1", None, False, True), ("localhost", None, False, True), ("::1", None, False, True),
    ("0.0.0.0", None, False, False), ("10.0.0.5", None, False, False), ("0.0.0.0", "t", False, True),
    ("0.0.0.0", None, True, True),
])
def test_serving_beyond_this_machine_needs_a_token_or_an_explicit_yes(host, token, allowed, ok):
    from prefect_lora.deploy.serve_core import ServeConfig, check_exposure

    cfg = ServeConfig(model_name="m", host=host, allow_unauthenticated=allowed)
    if ok:
        check_exposure(cfg, token)
    else:
        with pytest.raises(ValueError, match="refusing to serve on .* without a bearer token"):
            check_exposure(cfg, token)


def _batched_run(calls: list, delay: float = 0.05):
    import time

    def run(key, items):
        calls.append((key, list(items)))
        time.sleep(delay)  # the model's forward pass: requests arriving meanwhile wait for the next batch
        return [ValueError(f"bad {item}") if item == "bad" else f"{key}:{item}" for item in items]
    return run


def test_concurrent_requests_of_one_key_run_as_one_batch_and_each_gets_its_own_result():
    import asyncio

    from prefect_lora.deploy.serve_core import MicroBatcher

    calls: list = []

    async def main():
        b = MicroBatcher(_batched_run(calls), max_rows=4, wait_s=0.01)
        jobs = [b.submit("v1", i) for i in range(6)] + [b.submit("v2", "x"), b.submit("v1", "bad")]
        return b, await asyncio.gather(*jobs, return_exceptions=True)

    b, results = asyncio.run(main())
    assert results[:6] == [f"v1:{i}" for i in range(6)] and results[6] == "v2:x"
    assert isinstance(results[7], ValueError) and "bad" in str(results[7])  # fails alone, not its batch
    # The oldest waiting request leads each batch; those of its key join it, up to 4 rows.
    assert [(k, len(items)) for k, items in calls] == [("v1", 4), ("v1", 3), ("v2", 1)]
    assert list(b.batches) == [4, 3, 1]


def test_a_request_counts_its_rows_and_a_cancelled_one_is_left_out():
    import asyncio

    from prefect_lora.deploy.serve_core import MicroBatcher

    calls: list = []

    async def main():
        b = MicroBatcher(_batched_run(calls), max_rows=4, wait_s=0.0)
        first = asyncio.ensure_future(b.submit("v1", "a", rows=3))
        await asyncio.sleep(0.01)  # `a` runs; the next three queue behind it
        gone = asyncio.ensure_future(b.submit("v1", "gone"))
        big = asyncio.ensure_future(b.submit("v1", "b", rows=3))
        small = asyncio.ensure_future(b.submit("v1", "c", rows=2))
        await asyncio.sleep(0)
        gone.cancel()  # its caller timed out
        return await asyncio.gather(first, big, small)

    assert asyncio.run(main()) == ["v1:a", "v1:b", "v1:c"]
    assert [items for _, items in calls] == [["a"], ["b"], ["c"]]  # 3 + 2 rows would pass the 4-row limit


@pytest.mark.parametrize("content, says", [
    ("members: &m0 [a, a, a, a, a, a, a, a, a]\n" + "".join(f"x{i}: &m{i} [{', '.join([f'*m{i - 1}'] * 9)}]\n"
                                                              for i in range(1, 10)), "expands to more than"),
    ("port: " + "9" * 5000 + "\n", "port: the number is out of range"),  # was int()'s conversion-limit ValueError
    ("port: true\n", "port: .*True is a boolean"),  # was read as port 1
    ("members: " + "[" * 150 + "]" * 150 + "\n", "nested more than 100 levels"),  # was a RecursionError
])
def test_a_serve_config_that_yaml_makes_huge_is_one_message(tmp_path, content, says):
    """The serve config is read as a pipeline config is: aliases expanded within bounds, numbers
    beyond 64 bits and booleans where a number goes refused under their key."""
    path = tmp_path / "serve.yaml"
    path.write_text(content)
    with pytest.raises(ValueError, match=says) as err:
        load_serve_config(path, model_name="m")
    assert "\n" not in str(err.value) and len(str(err.value)) < 400


def _streamed(log: list, running, go):
    """A streamed batch (`MicroBatcher`'s `stream`) that takes its first requests, runs a pass,
    says so and waits for `go`, takes what arrived meanwhile, runs a pass, then answers all
    (`bad` fails the batch)."""

    def stream(key, intake):
        first = intake.take(0)
        intake.stepped(sum(rows for _, _, rows in first))
        running.set()
        assert go.wait(10)
        later = intake.take(sum(rows for _, _, rows in first))
        log.append(([item for _, item, _ in first], [item for _, item, _ in later]))
        intake.stepped(sum(rows for _, _, rows in first + later))
        for ticket, item, _ in first + later:
            if item == "bad":
                raise RuntimeError("the model failed")
            intake.answer(ticket, f"{key}:{item}")
    return stream


def test_a_streamed_batch_takes_in_arrivals_of_its_key_within_its_rows_and_none_behind_another_key():
    import asyncio
    import threading

    from prefect_lora.deploy.serve_core import MicroBatcher

    log: list = []
    running, go = threading.Event(), threading.Event()

    async def main():
        b = MicroBatcher(_batched_run([]), max_rows=4, wait_s=0.0, stream=_streamed(log, running, go))
        first = asyncio.ensure_future(b.submit("g", "a", streamed=True))
        assert await asyncio.to_thread(running.wait, 10)
        later = [asyncio.ensure_future(b.submit(key, item, rows, streamed=key == "g"))
                 for key, item, rows in [("g", "b", 2), ("g", "c", 2), ("g", "d", 1), ("x", "e", 1), ("g", "f", 1)]]
        await asyncio.sleep(0)  # all queued
        go.set()
        return b, await asyncio.gather(first, *later)

    b, results = asyncio.run(main())
    assert results == ["g:a", "g:b", "g:c", "g:d", "x:e", "g:f"]
    # a runs; b and d join it (c's 2 rows would pass 4); f waits behind e, which runs next
    assert log == [(["a"], ["b", "d"]), (["c", "f"], [])]
    assert list(b.joins) == [(1, 1, 3)], "batch 1 took in 3 rows after its first pass"
    assert b.started == 3 and list(b.batches) == [1, 4, 3, 3, 1]


def test_a_streamed_batch_that_fails_fails_the_requests_it_has_not_answered():
    import asyncio
    import threading

    from prefect_lora.deploy.serve_core import MicroBatcher

    running, go = threading.Event(), threading.Event()
    go.set()

    async def main():
        b = MicroBatcher(_batched_run([]), max_rows=4, wait_s=0.0, stream=_streamed([], running, go))
        jobs = [b.submit("g", item, streamed=True) for item in ("a", "bad", "c")]
        return await asyncio.gather(*jobs, return_exceptions=True)

    a, bad, c = asyncio.run(main())
    assert a == "g:a" and isinstance(bad, RuntimeError) and isinstance(c, RuntimeError), (a, bad, c)
