"""Secrets in settings: shown redacted, stored left out."""

from __future__ import annotations

import pytest
from prefect_lora.lora_tasks.secrets import redact_url, redacted_config, without_credentials


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
