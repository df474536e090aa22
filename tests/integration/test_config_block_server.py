"""The pipeline config kept as a Prefect block on a real Prefect server: saved from a YAML file by
the CLI, read back by name equal and with the same hash, its webhook URL shown obfuscated and kept
through an edit posted back as the UI posts it, a broken edit refused with the config's own
messages, the flows run from a block's name, and the block type registered from its module."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from services import prefect_harness
from typer.testing import CliRunner

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
TINY = REPO / "configs" / "tiny.yaml"
WEBHOOK = "https://hooks.example.com/services/T000/B000/SECRETTOKEN"


@pytest.fixture(scope="module")
def saved():
    """A Prefect server holding `configs/tiny.yaml` (with a webhook URL) saved as the block `tiny-sums` by the CLI."""
    from prefect_lora.flows.cli import app

    with prefect_harness():
        result = CliRunner().invoke(app, ["block", "save", str(TINY), "--name", "tiny-sums",
                                          "--set", f"notifications.webhook_url={WEBHOOK}"])
        assert result.exit_code == 0, result.output
        yield "tiny-sums"


def _tiny(*overrides: str):
    from prefect_lora.lora_tasks.config import load_config

    return load_config(TINY, [f"notifications.webhook_url={WEBHOOK}", *overrides])


def _document(name: str, include_secrets: bool = False):
    from prefect.client.orchestration import get_client

    with get_client(sync_client=True) as client:
        return client.read_block_document_by_name(name=name, block_type_slug="lora-pipeline-config",
                                                  include_secrets=include_secrets)


def _post_back(doc, data: dict) -> None:
    """Replace the block's data as the UI's form does on save (secrets as it was shown them)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import BlockDocumentUpdate

    with get_client(sync_client=True) as client:
        client.update_block_document(doc.id, BlockDocumentUpdate(data=data, merge_existing_data=False))


def test_a_saved_config_is_read_back_by_name_equal_and_with_the_same_hash(saved):
    from prefect_lora.flows.blocks import PipelineConfigBlock, read_config

    expected = _tiny()
    for cfg in (PipelineConfigBlock.load(saved).pipeline_config(), read_config(saved), read_config(f"block:{saved}")):
        assert cfg == expected
        assert (cfg.config_hash(), cfg.training_hash()) == (expected.config_hash(), expected.training_hash())
        assert cfg.notifications.webhook_url == WEBHOOK


def test_the_webhook_url_is_shown_obfuscated_and_kept_through_an_edit_posted_back(saved):
    from prefect_lora.flows.blocks import read_config

    shown = _document(saved)  # what the UI and `prefect block inspect` are given
    assert "SECRETTOKEN" not in json.dumps(shown.data)
    assert shown.data["config"]["notifications"]["webhook_url"], "the form shows that a URL is set"
    data = json.loads(json.dumps(shown.data))
    data["config"]["training"]["max_steps"] = 61
    _post_back(shown, data)
    cfg = read_config(saved)
    assert cfg.training.max_steps == 61 and cfg.notifications.webhook_url == WEBHOOK
    assert cfg == _tiny("training.max_steps=61")
    data["config"]["training"]["max_steps"] = 60  # as it was
    _post_back(shown, data)
    assert read_config(saved) == _tiny()


def test_overrides_apply_on_top_of_a_blocks_config(saved):
    from prefect_lora.flows.blocks import read_config

    cfg = read_config(saved, ["training.max_steps=7", "lora.r=4"])
    assert cfg == _tiny("training.max_steps=7", "lora.r=4")
    assert read_config(saved).training.max_steps == 60, "the saved block is unchanged"


def test_a_block_edited_into_a_broken_config_is_refused_naming_every_problem(saved):
    from prefect_lora.flows.blocks import PipelineConfigBlock, read_config
    from prefect_lora.lora_tasks.errors import ConfigError

    PipelineConfigBlock.from_config(_tiny()).save("broken-sums")
    doc = _document("broken-sums", include_secrets=True)
    data = json.loads(json.dumps(doc.data))
    data["config"]["training"]["learning_rate"] = -1
    data["config"]["lora"]["rank"] = 8  # a misspelt key
    _post_back(doc, data)
    with pytest.raises(ConfigError) as err:
        read_config("broken-sums")
    text = str(err.value)
    assert text.startswith("block broken-sums has 2 problem(s)"), text
    assert "training.learning_rate:" in text and "lora.rank: unknown key" in text, text


@pytest.mark.parametrize("source", ["no-such-config", "block:no-such-config"])
def test_an_unknown_name_is_a_clear_error_naming_both_ways(saved, source):
    from prefect_lora.flows.blocks import read_config
    from prefect_lora.lora_tasks.errors import ConfigError

    with pytest.raises(ConfigError) as err:
        read_config(source)
    text = " ".join(str(err.value).split())
    assert "no saved config block named 'no-such-config'" in text, text
    assert "path to a YAML config (e.g. configs/tiny.yaml)" in text and "then NAME or block:NAME" in text, text


def test_the_flows_take_a_block_name_where_they_take_a_config_path(saved, tmp_path):
    import yaml
    from prefect_lora.flows.blocks import PipelineConfigBlock
    from prefect_lora.flows.fleet import watch_fleet
    from prefect_lora.flows.retrain import retrain
    from prefect_lora.lora_tasks.errors import ConfigError, ValidationFailed

    PipelineConfigBlock.from_config(_tiny(f"scaling.storage_path={tmp_path}", "notifications.on_failure=false")).save("flow-sums")
    rows = (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text().splitlines()
    rows[3] = json.dumps({**json.loads(rows[3]), "completion": "   "})
    (tmp_path / "broken.jsonl").write_text("\n".join(rows) + "\n")
    with pytest.raises(ValidationFailed) as err:  # the block's config, with the override, reached the data contract
        retrain("block:flow-sums", [f"data.train_path={tmp_path / 'broken.jsonl'}"])
    assert "blank" in str(err.value), str(err.value)
    with pytest.raises(ConfigError, match="no saved config block named 'no-such-config'"):
        retrain("block:no-such-config")
    fleet = tmp_path / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"config": "block:flow-sums", "members": [{"name": "sums-a"}]}))
    assert watch_fleet(str(fleet)) == [], "the first look at the members' data records it"
    assert list((tmp_path / "watch").glob("*.json")), "in the storage path the block names"


def test_the_block_type_registers_from_its_module(saved):
    from prefect.client.orchestration import get_client
    from prefect.settings import PREFECT_API_URL

    env = {**os.environ, "PREFECT_API_URL": PREFECT_API_URL.value(), "PYTHONPATH": str(REPO)}
    done = subprocess.run([sys.executable, "-m", "prefect", "block", "register", "-m", "prefect_lora"],
                          check=False, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "LoRA Pipeline Config" in done.stdout, done.stdout + done.stderr
    with get_client(sync_client=True) as client:
        schema = client.get_most_recent_block_schema_for_block_type(
            client.read_block_type_by_slug("lora-pipeline-config").id)
    assert schema.fields["secret_fields"] == ["config.notifications.webhook_url"]


def test_saving_over_a_block_needs_overwrite(saved):
    from prefect_lora.flows.blocks import read_config
    from prefect_lora.flows.cli import app

    again = CliRunner().invoke(app, ["block", "save", str(TINY), "--name", saved, "--set", "training.max_steps=9"])
    assert again.exit_code == 1 and f"a config block named '{saved}' exists" in again.output, again.output
    assert read_config(saved) == _tiny(), "the saved block is unchanged"
    replaced = CliRunner().invoke(app, ["block", "save", str(TINY), "--name", saved, "--overwrite",
                                        "--set", f"notifications.webhook_url={WEBHOOK}"])
    assert replaced.exit_code == 0, replaced.output
    assert read_config(saved) == _tiny()
