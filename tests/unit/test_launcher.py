"""Which launcher a config gets, and the in-process launcher's checkpoints and resume."""

import hashlib
import json
import shutil

import pytest
from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.errors import ConfigError, TrainingError
from prefect_lora.lora_tasks.training.launcher import latest_checkpoint, launcher_for, train_in_process
from test_training import REPO, ROWS, make_cfg


def _with(cfg, **scaling):
    return cfg.model_copy(update={"scaling": cfg.scaling.model_copy(update=scaling)})


def test_auto_trains_one_local_worker_here_and_everything_else_on_ray():
    cfg = make_cfg()
    assert launcher_for(cfg) == "local"
    assert launcher_for(_with(cfg, num_workers=2)) == "ray"
    assert launcher_for(_with(cfg, address="ray://head:10001")) == "ray"
    assert launcher_for(_with(cfg, storage_path="s3://bucket/runs")) == "ray"
    assert launcher_for(cfg, streaming=True) == "ray"
    assert launcher_for(_with(cfg, launcher="ray")) == "ray"


def test_local_launcher_refuses_what_only_ray_can_do():
    with pytest.raises(ConfigError, match=r"scaling.launcher: local .*scaling.num_workers: 1"):
        load_config(REPO / "configs" / "tiny.yaml", ["scaling.launcher=local", "scaling.num_workers=2"])
    with pytest.raises(TrainingError, match="streams through Ray Data.*scaling.launcher: ray"):
        launcher_for(_with(make_cfg(), launcher="local"), streaming=True)
    with pytest.raises(TrainingError, match="RAY_ADDRESS"):  # RAY_ADDRESS lands in scaling.address after validation
        launcher_for(_with(make_cfg(), launcher="local", address="auto"))


def test_the_launcher_changes_neither_hash_of_existing_configs():
    cfg = make_cfg()
    d = cfg.model_dump(mode="json", exclude={"notifications", "retention"})
    del d["scaling"]["launcher"], d["training"]["packing"], d["training"]["attention"], d["remedy"], d["replay"]
    del d["promotion"]["underpowered"], d["promotion"]["more_evidence"]  # added later too, at their defaults
    del d["data"]["validation"]["check_conflicts"], d["evaluation"]["baseline_rows"], d["promotion"]["max_retrieval_loss"]
    d["promotion"]["max_representation_drift"] = 0.2  # replaced later for classifiers; a causal LM hashes it as before
    assert cfg.config_hash() == hashlib.sha256(json.dumps(d, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    assert _with(cfg, launcher="ray").config_hash() != cfg.config_hash()
    assert {_with(cfg, launcher=x).training_hash() for x in ("auto", "ray", "local")} == {cfg.training_hash()}


def test_in_process_training_keeps_the_newest_checkpoints_and_resumes_from_the_latest(tiny_model_dir, tmp_path):
    """A run that died after its checkpoint of step 6 (the state it leaves: checkpoints up to 6
    and maybe a half-copied one) is continued from 6 and ends where an unbroken run ends."""
    cfg = make_cfg(max_steps=8, checkpoint_every=2)
    straight = train_in_process(cfg, ROWS, tmp_path / "a")
    train = tmp_path / "a" / "train"
    assert sorted(p.name for p in train.iterdir()) == ["checkpoint_step_000006", "checkpoint_step_000008"]
    assert straight.checkpoint_path == str(train / "checkpoint_step_000008")
    assert (tmp_path / "a" / "adapter" / "adapter_model.safetensors").is_file()
    assert straight.metrics["step"] == 8 and straight.metrics["start_step"] == 0

    shutil.rmtree(train / "checkpoint_step_000008")
    shutil.copytree(train / "checkpoint_step_000006", train / ".checkpoint_step_000008.partial")
    assert latest_checkpoint(train).name == "checkpoint_step_000006"
    resumed = train_in_process(cfg, ROWS, tmp_path / "a")
    assert resumed.metrics["start_step"] == 6 and resumed.metrics["step"] == 8
    assert resumed.metrics["train_loss"] == pytest.approx(straight.metrics["train_loss"], rel=1e-5)
    assert not (train / ".checkpoint_step_000008.partial").exists()
