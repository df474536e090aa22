"""The Ray Data path: a sharded train source validated per batch on Ray (`map_batches`) and
streamed to two training workers, checked against the in-memory path on the same rows."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


def shard_rows(folder: Path, rows: list[dict], shards: int, fmt: str) -> Path:
    folder.mkdir(parents=True)
    for i in range(shards):
        part = rows[i::shards]
        if fmt == "jsonl":
            (folder / f"part-{i}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in part))
        else:
            pd.DataFrame(part).to_parquet(folder / f"part-{i}.parquet")
    return folder


def config(tmp_path: Path, train_path: Path, **data):
    from prefect_lora.lora_tasks.config import config_from_dict

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"].update({"train_path": str(train_path), "loader": "ray_data", **data})
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    raw["training"].update({"max_steps": 12, "checkpoint_every": 4})
    raw["scaling"]["storage_path"] = str(tmp_path / "runs")
    return config_from_dict(raw)


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def rows() -> list[dict]:
    lines = (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_streamed_contract_agrees_with_the_in_memory_one_and_quarantines(tmp_path, ray_session, rows, fmt):
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    bad = [dict(r) for r in rows]
    bad[3]["completion"] = "   "          # blank text
    bad[10]["prompt"] = "x" * 50_000       # longer than max_chars
    bad[25]["completion"] = ""             # blank
    src = shard_rows(tmp_path / "src", bad, 3, fmt)
    policy = {"policy": "quarantine", "max_invalid_fraction": 0.05, "check_duplicates": False, "check_overlap": False}
    cfg = config(tmp_path, src, validation=policy)
    data = prepare_data(cfg, tmp_path / "out")

    # The same rows in one file through the pandas path: same number of rows failing each check.
    one = tmp_path / "all.jsonl"
    one.write_text("".join(json.dumps(r) + "\n" for r in bad))
    memory = prepare_data(config_from_dict({**cfg.model_dump(), "data": {**cfg.data.model_dump(), "train_path": str(one),
                                                                          "loader": "memory"}}), tmp_path / "mem")
    streamed, in_memory = data.report, memory.report
    assert streamed.counts_by_check == in_memory.counts_by_check == {"blank_text": 2, "text_length": 1}
    assert sum(streamed.rows.values()) == len(bad) and sum(streamed.invalid_rows.values()) == 3
    assert all(i.reason.endswith(f".{fmt})") and "part-" in i.reason for i in streamed.issues), streamed.issues
    quarantined = [json.loads(line) for f in Path(data.quarantine_path).glob("*.json*") for line in f.read_text().splitlines()]
    assert len(quarantined) == 3
    assert data.train_stream is not None and data.train_rows == []
    assert data.train_count == streamed.valid_rows["train"] > 0
    assert 0 < len(data.eval_rows) == streamed.valid_rows["eval"]


def test_broken_streamed_data_fails_naming_the_file(tmp_path, ray_session, rows):
    from prefect_lora.lora_tasks.errors import ValidationFailed
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    bad = [dict(r) for r in rows]
    bad[7]["completion"] = "  "
    src = shard_rows(tmp_path / "src", bad, 2, "jsonl")
    with pytest.raises(ValidationFailed) as err:
        prepare_data(config(tmp_path, src), tmp_path / "out")
    assert err.value.report.counts_by_check == {"blank_text": 1}
    assert "part-1.jsonl" in err.value.report.issues[0].reason


def test_two_workers_train_from_the_stream_deterministically(tmp_path, ray_session, rows):
    """Two runs over the same stream end with the same weights (the order every rank reads is
    fixed, which is what lets a restart skip exactly the trained micro-batches); a third run in a
    finished run's folder finds its final checkpoint and trains nothing more."""
    import torch
    from prefect_lora.lora_tasks.training.distributed import train_adapter
    from prefect_lora.lora_tasks.training.launcher import prepare_data
    from safetensors.torch import load_file

    src = shard_rows(tmp_path / "src", rows, 3, "parquet")
    cfg = config(tmp_path, src)
    data = prepare_data(cfg, tmp_path / "out")
    one = train_adapter(cfg, [], tmp_path / "one", stream=data.train_stream, max_failures=0)
    two = train_adapter(cfg, [], tmp_path / "two", stream=data.train_stream, max_failures=0)
    assert one.metrics["step"] == two.metrics["step"] == 12
    assert one.metrics["train_loss"] == pytest.approx(two.metrics["train_loss"], rel=1e-6)
    a = load_file(str(Path(one.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(two.adapter_dir) / "adapter_model.safetensors"))
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    again = train_adapter(cfg, [], tmp_path / "one", stream=data.train_stream, max_failures=0)
    assert again.metrics["start_step"] == 12 and again.metrics["step"] == 12
