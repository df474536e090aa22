"""Skip-when-unchanged, retention selection and the pending registration record: pure logic."""

import json

import pytest

from lora_tasks import lifecycle
from lora_tasks.errors import LoraTaskError

LINEAGE = {"lineage.data_fingerprint": "f" * 64, "lineage.config_hash": "c" * 64, "lineage.base_model": "b"}


@pytest.mark.parametrize("champion_tags, unchanged", [
    (dict(LINEAGE), True),
    ({**LINEAGE, "lineage.base_model": "other", "eval.x": "1"}, True),  # only data and config decide
    ({**LINEAGE, "lineage.data_fingerprint": "e" * 64}, False),       # new data
    ({**LINEAGE, "lineage.config_hash": "d" * 64}, False),            # changed config
    ({"lineage.config_hash": "c" * 64}, False),                        # champion without data lineage
    ({}, False),
    (None, False),                                                     # no champion yet
])
def test_unchanged_since_needs_same_data_and_config(champion_tags, unchanged):
    assert lifecycle.unchanged_since(champion_tags, LINEAGE) is unchanged


def test_empty_lineage_never_counts_as_unchanged():
    empty = {"lineage.data_fingerprint": "", "lineage.config_hash": ""}
    assert lifecycle.unchanged_since(empty, empty) is False


@pytest.mark.parametrize("keep, current, deleted", [
    (None, "c1", []),
    (1, None, ["c2", "c1", "c0"]),
    (2, None, ["c1", "c0"]),
    (1, "c1", ["c3", "c2", "c0"]),     # the run that just finished keeps its checkpoints
    (2, "c1", ["c2", "c0"]),
    (4, "c1", []), (10, None, []),
])
def test_checkpoint_folders_beyond_the_newest_runs_are_deleted(keep, current, deleted):
    found = [("c1", 1.0), ("c3", 3.0), ("c0", 0.0), ("c2", 2.0)]
    assert lifecycle.checkpoints_to_delete(found, keep, current) == deleted


@pytest.mark.parametrize("versions, keep, protected, deleted", [
    (["1", "2", "3", "4", "5"], None, set(), []),
    (["1", "2", "3", "4", "5"], 2, set(), ["3", "2", "1"]),
    (["1", "2", "3", "4", "5"], 2, {"1", "3"}, ["2"]),                 # champion 3, previous champion 1
    (["1", "2", "3", "4", "5"], 1, {"2", None}, ["4", "3", "1"]),       # missing aliases are None
    (["9", "10", "11"], 2, set(), ["9"]),                               # numeric, not string order
    (["1", "2"], 5, set(), []),
])
def test_versions_beyond_the_newest_are_deleted_but_never_protected_ones(versions, keep, protected, deleted):
    assert lifecycle.versions_to_delete(versions, keep, protected) == deleted


def _pending(tmp_path, **kw):
    adapter = tmp_path / "adapter"
    adapter.mkdir(exist_ok=True)
    (adapter / "adapter_model.safetensors").write_bytes(b"x")
    data = lifecycle.DataSummary(10, 2, "f" * 64, "Validation passed", None, {"report_json": "/r.json"})
    return lifecycle.new_pending({"model_name": "m"}, "run1", str(tmp_path), str(adapter), "base", LINEAGE, data,
                                 {"task_gain": 0.5}, {"step": 10, "nested": {"x": 1}}, "3", **kw)


def test_pending_registration_round_trips(tmp_path):
    pending = _pending(tmp_path)
    path = pending.save()
    assert path == tmp_path / "registration.json" and not list(tmp_path.glob("*.tmp"))
    again = lifecycle.read_pending(tmp_path)
    assert again == pending
    assert again.train_metrics == {"step": 10}  # only plain values are kept
    assert again.status == "pending" and again.version is None and again.champion_version == "3"


def test_read_pending_names_what_is_missing(tmp_path):
    with pytest.raises(LoraTaskError, match="registration.json does not exist: RUN_DIR must be a run folder"):
        lifecycle.read_pending(tmp_path)
    _pending(tmp_path).save()
    (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
    with pytest.raises(LoraTaskError, match="adapter .* is missing"):
        lifecycle.read_pending(tmp_path)
    (tmp_path / "registration.json").write_text(json.dumps({"run_id": "x"}))
    with pytest.raises(LoraTaskError, match="not a registration record"):
        lifecycle.read_pending(tmp_path)


def test_operational_sections_do_not_change_the_config_hash():
    from pathlib import Path

    from lora_tasks.config import load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    base = load_config(tiny).config_hash()
    assert load_config(tiny, ["notifications.webhook_url=http://h/x", "retention.keep_versions=3"]).config_hash() == base
    assert load_config(tiny, ["training.max_steps=61"]).config_hash() != base
