"""The pipeline config as a Prefect block, without a Prefect server: what the block gives back, how
it keeps the webhook URL, what its form is made of, and which config sources are refused at once."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from prefect_lora.flows.blocks import PipelineConfigBlock, read_config
from prefect_lora.lora_tasks.config import PipelineConfig, load_config
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.fleet import load_fleet
from prefect_lora.lora_tasks.secrets import SECRET_KEYS
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "configs").glob("*.yaml"))
TINY = REPO / "configs" / "tiny.yaml"
WEBHOOK = "https://hooks.example.com/services/T000/B000/SECRETTOKEN"


@pytest.mark.parametrize("webhook", [WEBHOOK, None], ids=["webhook", "no-webhook"])
@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_a_block_gives_back_the_config_it_holds_with_the_same_hashes(path, webhook):
    cfg = load_config(path, [f"notifications.webhook_url={webhook}"] if webhook else None)
    back = PipelineConfigBlock.from_config(cfg).pipeline_config()
    assert isinstance(back, PipelineConfig) and back == cfg
    assert (back.config_hash(), back.training_hash()) == (cfg.config_hash(), cfg.training_hash())
    assert back.notifications.webhook_url == webhook


def test_the_webhook_url_is_kept_as_a_secret_and_given_back_whole():
    block = PipelineConfigBlock.from_config(load_config(TINY, [f"notifications.webhook_url={WEBHOOK}"]))
    for shown in (repr(block), str(block), block.model_dump_json(), json.dumps(block.model_dump(mode="json")),
                  str(block.model_dump())):
        assert "SECRETTOKEN" not in shown, shown
    secret_fields = [f"config.{section}.{key}" for section, key in SECRET_KEYS]
    assert block.model_json_schema()["secret_fields"] == secret_fields, "every secret of the config is one in the block"
    assert block.pipeline_config().notifications.webhook_url == WEBHOOK


def test_overrides_apply_on_top_of_a_blocks_config_and_leave_the_block_as_it_was():
    block = PipelineConfigBlock.from_config(load_config(TINY))
    cfg = block.pipeline_config(["training.max_steps=7", "promotion.min_task_gain=0.1"])
    assert (cfg.training.max_steps, cfg.promotion.min_task_gain) == (7, 0.1)
    assert cfg == load_config(TINY, ["training.max_steps=7", "promotion.min_task_gain=0.1"])
    assert block.pipeline_config().training.max_steps == 60


def test_a_config_read_from_a_block_is_checked_as_a_yaml_config_is():
    block = PipelineConfigBlock.from_config(load_config(TINY))
    with pytest.raises(ConfigError) as err:
        block.pipeline_config(["training.max_steps=0", "notifications.webhook_url=ftp://x"])
    text = str(err.value)
    assert "training.max_steps: Input should be greater than or equal to 1" in text, text
    assert "notifications.webhook_url: must be an http:// or https:// URL" in text, text


def test_the_form_has_every_section_of_the_config_and_a_password_field_for_the_webhook():
    schema = PipelineConfigBlock.model_json_schema()
    defs = schema["definitions"]
    config = defs[schema["properties"]["config"]["$ref"].rsplit("/", 1)[-1]]
    assert list(config["properties"]) == list(PipelineConfig.model_fields), "a section added to the config is in the form"
    training = defs[config["properties"]["training"]["$ref"].rsplit("/", 1)[-1]]
    assert training["properties"]["learning_rate"]["description"], "each setting's docstring is its help in the form"
    notifications = defs[config["properties"]["notifications"]["$ref"].rsplit("/", 1)[-1]]
    webhook = notifications["properties"]["webhook_url"]["anyOf"][0]
    assert (webhook["type"], webhook["format"], webhook.get("writeOnly")) == ("string", "password", True)
    assert schema["block_type_slug"] == "lora-pipeline-config"


def test_read_config_reads_a_yaml_file_with_overrides():
    assert read_config(str(TINY), ["training.max_steps=7"]) == load_config(TINY, ["training.max_steps=7"])


@pytest.mark.parametrize(("source", "says"), [
    ("configs/nope.yaml", "no config file 'configs/nope.yaml'"),
    ("~/nope.yml", "no config file '~/nope.yml'"),
    ("block:Nightly_Sums", "'Nightly_Sums' is no block name (lowercase letters, digits and dashes)"),
])
def test_a_source_that_is_no_file_and_can_be_no_block_is_a_clear_error_at_once(source, says):
    from prefect.settings import PREFECT_API_URL, temporary_settings

    nowhere = temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"})  # nothing answers there: no block is read
    with nowhere, pytest.raises(ConfigError) as err:
        read_config(source)
    text = " ".join(str(err.value).split())
    assert says in text and "configs/tiny.yaml" in text and "prefect-lora block save CONFIG --name NAME" in text, text


def test_run_refuses_a_missing_config_before_any_engine_starts():
    from prefect_lora.flows.cli import app

    result = CliRunner().invoke(app, ["run", "configs/nope.yaml"])
    text = " ".join(result.output.split())
    assert result.exit_code == 1 and "no config file 'configs/nope.yaml'" in text and "Traceback" not in text, text


def test_block_save_says_what_to_type():
    from prefect_lora.flows.cli import app

    out = CliRunner().invoke(app, ["block", "save", "--help"], env={"COLUMNS": "160"}).output
    assert "--name" in out and "--overwrite" in out and "--set" in out and "block:NAME" in " ".join(out.split()), out
    assert "<bool>" not in out and "list[" not in out, out


def test_a_fleet_file_may_name_a_saved_config_block(tmp_path):
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump({"config": "block:shared-sums", "members": [{"name": "sums-a"}]}))
    assert load_fleet(path).config == "block:shared-sums"
    path.write_text(yaml.safe_dump({"config": "shared.yaml", "members": [{"name": "sums-a"}]}))
    with pytest.raises(ConfigError, match=re.escape("no such file 'shared.yaml'")) as err:
        load_fleet(path)
    assert "block:NAME" in str(err.value)
