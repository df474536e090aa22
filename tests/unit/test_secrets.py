"""Secrets in settings: shown redacted, stored left out."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from prefect_lora.lora_tasks.secrets import (
    redact_url,
    redacted_config,
    scrubbed,
    webhook_url_problem,
    without_credentials,
)


@pytest.mark.parametrize("url, shown", [
    ("https://hooks.slack.com/services/T000/B000/XXXX", "https://hooks.slack.com/…(redacted)"),
    ("https://example.com/hook?token=abc", "https://example.com/…(redacted)"),
    ("http://user:pw@10.0.0.1:8080", "http://10.0.0.1:8080/…(redacted)"),
    ("https://example.com", "https://example.com"), (None, None), ("not a url", "(redacted)"),
])
def test_a_url_is_shown_by_where_it_goes_not_its_token(url, shown):
    assert redact_url(url) == shown


def test_credentials_never_reach_a_link():
    assert without_credentials("https://bob:s3cret@mlflow.example:5000/x") == "https://mlflow.example:5000/x"
    assert without_credentials("http://mlflow:5000") == "http://mlflow:5000"


def test_configs_show_the_secret_redacted_and_store_it_left_out():
    cfg = {"notifications": {"webhook_url": "https://h.example/T/secret", "on_failure": True}, "model_name": "m"}
    assert redacted_config(cfg)["notifications"]["webhook_url"] == "https://h.example/…(redacted)"
    assert redacted_config(cfg, drop=True)["notifications"] == {"webhook_url": None, "on_failure": True}
    assert cfg["notifications"]["webhook_url"] == "https://h.example/T/secret"  # a copy: the config itself is untouched


def test_the_mlflow_run_params_hold_the_webhook_redacted(tmp_path):
    from mlflow import MlflowClient
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.registry import tracking

    cfg = config_from_dict({
        "model_name": "m", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x.jsonl", "prompt_column": "p", "completion_column": "c"},
        "training": {"max_steps": 1}, "notifications": {"webhook_url": "https://h.example/T/sekrit"},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/m.db", "artifact_location": str(tmp_path / "a")},
    })
    run_id = tracking.start_run(cfg, "r", {})
    params = MlflowClient(cfg.tracking.tracking_uri).get_run(run_id).data.params
    assert params["notifications.webhook_url"] == "https://h.example/…(redacted)"
    assert not [v for v in params.values() if "sekrit" in v]


# ---------------------------------------------------------------------------------------------
# Malformed URLs: redaction never raises (it runs in the failure hook that sends the alert) and
# never shows a token; the config refuses a webhook URL that cannot be posted to, saying so
# without printing it.
# ---------------------------------------------------------------------------------------------

TOKEN = st.from_regex(r"[A-Za-z][A-Za-z0-9]{11,30}", fullmatch=True)
HOSTS = st.one_of(
    st.sampled_from(["127.0.0.1", "hooks.example.com", "[::1]", "[::1", "::1]", "[zz]", "[::1]x", "h\uff03st",
                     "", "exa mple.com", "host\\x", "ho@st", "[v1.x]", "xn--n3h.example"]),
    st.text(max_size=20),
)
PORTS = st.one_of(st.just(""), st.integers(-10, 10**7).map(lambda p: f":{p}"), st.text(max_size=8).map(lambda t: ":" + t))
SCHEMES = st.sampled_from(["http", "https", "HTTP", "ftp", "", "h t", "1http"])
MALFORMED = ["http://127.0.0.1:99999/h", "http://[::1/h", "http://[zz]/h", "http://host:abc/h", "http://host:-1/h",
             "http://h\uff03st/h", "http://[::1]:70000/h", "https://hooks.example.com:99999999999999999999/T/B/x"]


@pytest.mark.parametrize("url", MALFORMED)
def test_a_url_that_cannot_be_parsed_is_shown_as_redacted(url):
    assert redact_url(url) == "(redacted)"
    assert without_credentials(url) in (url, "(redacted)")  # never raises either


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(), st.builds("".join, st.lists(st.sampled_from(
    ["http", "://", "[", "]", ":", "@", "/", "?", "#", "99999", "::1", "host", "%", "\\", "\uff03", " "]), max_size=12))))
def test_redaction_never_raises(url):
    shown = redact_url(url)
    assert shown is None or isinstance(shown, str)
    assert isinstance(without_credentials(url), str)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=SCHEMES, host=HOSTS, port=PORTS, token=TOKEN, where=st.sampled_from(
    ["path", "query", "fragment", "user", "password", "port", "path+bad-port"]))
def test_redaction_never_shows_the_token(scheme, host, port, token, where):
    assume(token.lower() not in (host + port).lower())
    url = {"path": f"{scheme}://{host}{port}/hooks/{token}", "query": f"{scheme}://{host}{port}/h?token={token}",
           "fragment": f"{scheme}://{host}{port}#{token}", "user": f"{scheme}://{token}@{host}{port}/",
           "password": f"{scheme}://bot:{token}@{host}{port}", "port": f"{scheme}://{host}:{token}/h",
           "path+bad-port": f"{scheme}://{host}:99999/{token}"}[where]
    assert token not in (redact_url(url) or "")
    assert token not in (webhook_url_problem(url) or "")
    assert token not in scrubbed(f"<urlopen error {url!r}: nonnumeric port: '{token}'>", url)


def _config_error(url: str) -> str:
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.errors import ConfigError

    with pytest.raises(ConfigError) as exc:
        config_from_dict({
            "model_name": "m", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
            "data": {"train_path": "x.jsonl", "prompt_column": "p", "completion_column": "c"},
            "training": {"max_steps": 1}, "notifications": {"webhook_url": url}})
    return str(exc.value)


@pytest.mark.parametrize("url, says", [
    ("http://127.0.0.1:99999/h/SECRETTOKEN", "port"), ("http://[::1/h/SECRETTOKEN", "host"),
    ("http://[zz]/SECRETTOKEN", "host"), ("http://host:SECRETTOKEN/h", "port"),
    ("ftp://host/SECRETTOKEN", "http:// or https://"), ("hooks.example.com/SECRETTOKEN", "http:// or https://"),
    ("http://host:0/SECRETTOKEN", "port 0"), ("http:///SECRETTOKEN", "no host"),
    ("https://hooks.example.com/T 1/SECRETTOKEN", "space"),
])
def test_the_config_refuses_a_webhook_url_that_cannot_be_posted_to_without_printing_it(url, says):
    text = _config_error(url)
    line = next(line for line in text.splitlines() if "notifications.webhook_url" in line)
    assert says in line and "https://HOST:PORT/PATH" in line, text  # the key, what is wrong, the fix
    assert "SECRETTOKEN" not in text


@pytest.mark.parametrize("url", ["https://hooks.slack.com/services/T0/B0/x", "http://127.0.0.1:8080/h",
                                 "http://[::1]:65535/h?x=1", "HTTPS://hooks.example.com"])
def test_a_usable_webhook_url_is_accepted(url):
    assert webhook_url_problem(url) is None


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scheme=SCHEMES, host=HOSTS, port=PORTS, token=TOKEN)
def test_the_config_check_never_raises_and_never_shows_the_token(scheme, host, port, token):
    assume(token.lower() not in (host + port).lower())
    url = f"{scheme}://{host}{port}/h/{token}"
    problem = webhook_url_problem(url)
    assert problem is None or token not in problem
