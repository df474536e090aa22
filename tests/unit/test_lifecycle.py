"""Skip-when-unchanged, retention selection and the pending registration record: pure logic."""

import json

import pytest
from prefect_lora.lora_tasks.errors import LoraTaskError
from prefect_lora.lora_tasks.registry import lifecycle

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

    from prefect_lora.lora_tasks.config import load_config

    tiny = Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml"
    base = load_config(tiny).config_hash()
    assert load_config(tiny, ["notifications.webhook_url=http://h/x", "retention.keep_versions=3"]).config_hash() == base
    assert load_config(tiny, ["training.max_steps=61"]).config_hash() != base


def _retention_config(tmp_path, **retention):
    from prefect_lora.lora_tasks.config import config_from_dict

    return config_from_dict({
        "model_name": "m", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x.jsonl"}, "training": {"max_steps": 5}, "retention": retention,
        "scaling": {"storage_path": str(tmp_path / "runs")},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/never-opened.db"},
    })


def _runs_with_checkpoints(tmp_path, n: int) -> list:
    import os

    runs = []
    for i in range(n):
        train = tmp_path / "runs" / "m" / f"run-{i}" / "train"
        (train / "checkpoint_step_1").mkdir(parents=True)
        os.utime(train, (i, i))  # run-0 is the oldest
        runs.append(train.parent)
    return runs


def test_retention_deletes_the_oldest_checkpoint_folders_and_keeps_the_current_run(tmp_path):
    runs = _runs_with_checkpoints(tmp_path, 4)
    deleted = lifecycle.apply_retention(_retention_config(tmp_path, keep_checkpoints=2), str(runs[0]), "3")
    assert deleted == lifecycle.Retention(checkpoints=[str(runs[2] / "train"), str(runs[1] / "train")], versions=[])
    assert [r.name for r in runs if (r / "train").exists()] == ["run-0", "run-3"]
    assert all(r.exists() for r in runs)  # only checkpoints go: adapters and reports stay


def test_retention_without_limits_deletes_nothing_and_opens_no_store(tmp_path):
    runs = _runs_with_checkpoints(tmp_path, 2)
    assert lifecycle.apply_retention(_retention_config(tmp_path), str(runs[0]), "1") == lifecycle.Retention()
    assert not (tmp_path / "never-opened.db").exists()


def test_retention_that_fails_part_way_says_what_it_deleted(tmp_path, monkeypatch):
    runs = _runs_with_checkpoints(tmp_path, 3)

    def refuse(*args):
        raise RuntimeError("tracking server down")

    monkeypatch.setattr(lifecycle.aliases, "protected_versions", refuse)
    cfg = _retention_config(tmp_path, keep_checkpoints=1, keep_versions=1)
    with pytest.raises(lifecycle.RetentionStopped, match="tracking server down") as err:
        lifecycle.apply_retention(cfg, str(runs[2]), "3")
    assert err.value.deleted.checkpoints == [str(runs[1] / "train"), str(runs[0] / "train")]
    assert err.value.deleted.versions == []


def test_skip_reason_names_the_shared_lineage_the_version_its_decision_and_what_runs_it_again():
    shared = f"{lifecycle.SKIPPED_MESSAGE}: data fingerprint {'f' * 12} and config hash {'c' * 12} equal those of "
    again = "; new data, a changed config or force (--force, the flow's force=True) runs it again"
    assert lifecycle.skip_reason(LINEAGE, lifecycle.Repeat("4", True, "promoted")) == f"{shared}champion version 4{again}"
    assert lifecycle.skip_reason(LINEAGE, lifecycle.Repeat("5", False, "not promoted")) == \
        f"{shared}version 5, which the gate did not promote{again}"
    assert "version 3, which the gate promoted;" in lifecycle.skip_reason(LINEAGE, lifecycle.Repeat("3", False, "promoted"))


def decided(version, decision="rejected", **lineage):
    tags = {**LINEAGE, **{f"lineage.{k}": v for k, v in lineage.items()}}
    return lifecycle.Decided(version, {**tags, "promotion.decision": decision} if decision else tags)


@pytest.mark.parametrize("versions, latest", [
    ([decided("1", "promoted"), decided("2"), decided("3", None)], "2"),   # 3's run stopped before its gate
    ([decided("9"), decided("10", "promoted")], "10"),                      # numeric, not string order
    ([decided("4", "promoted"), decided("5", "skipped")], "4"),            # a value the gate never writes
    ([decided("1", None)], None),                                           # registered, never decided
    ([], None),                                                             # no model yet
])
def test_the_latest_decided_version_is_the_newest_the_gate_promoted_or_refused(versions, latest):
    found = lifecycle.latest_decided(versions)
    assert (found.version if found else None) == latest


OTHER = {"data_fingerprint": "e" * 64}
# (label, champion, latest decided, the version repeated (None: train), whether it is the champion, its decision)
REPEAT_CASES = [
    ("no champion, the latest refused on the same inputs", None, decided("1"), "1", False, "not promoted"),
    ("a champion of another config, the latest refused on these", decided("1", "promoted", config_hash="d" * 64),
     decided("2"), "2", False, "not promoted"),
    ("the champion on the same inputs stays", decided("1", "promoted"), decided("2", config_hash="d" * 64), "1", True,
     "promoted"),
    ("champion and latest both on these inputs: the champion", decided("1", "promoted"), decided("2"), "1", True,
     "promoted"),
    ("new data since every decided version", decided("1", "promoted", **OTHER), decided("2", **OTHER), None, False, ""),
    ("an older decided version on these inputs is not the latest", None, decided("3", **OTHER), None, False, ""),
    ("nothing decided yet", None, None, None, False, ""),
    ("a champion promoted by hand, never gated", decided("1", None), None, "1", True, ""),
    ("a promoted version rolled back from is still decided", decided("1", "promoted", **OTHER), decided("2", "promoted"),
     "2", False, "promoted"),
]


@pytest.mark.parametrize("label, champion, latest, version, champion_repeated, decision", REPEAT_CASES,
                         ids=[c[0] for c in REPEAT_CASES])
def test_a_run_repeating_the_champion_or_the_latest_decided_version_is_skipped(label, champion, latest, version,
                                                                               champion_repeated, decision):
    repeat = lifecycle.repeated_version(LINEAGE, champion, latest)
    assert (repeat.version if repeat else None) == version
    if repeat:
        assert (repeat.champion, repeat.decision) == (champion_repeated, decision)


def test_run_result_survives_pickling_as_prefect_persists_it():
    import pickle

    result = lifecycle.RunResult("m", "2", True, ["gain 0.5"], "r", "/runs/m/run-1", "sqlite:///x.db", {"task_gain": 0.5},
                                 champion_before="1", summary="# m")
    assert pickle.loads(pickle.dumps(result)) == result
    assert (result.skipped, result.method) == (False, "lora")


def test_an_already_completed_registration_is_skipped(tmp_path):
    pending = _pending(tmp_path)
    pending.version, pending.status = "5", "done"
    result = lifecycle.already_registered(pending, str(tmp_path), "m", "sqlite:///x.db")
    assert result.skipped and result.version == "5" and not result.promoted
    assert result.reasons == [f"{tmp_path}: already registered as version 5 and gated; nothing to do"]
