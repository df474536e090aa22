"""FSDP2 on two CPU workers (gloo): the base weights sharded, the same training as DDP, and a
checkpoint (gathered to full tensors) that resumes."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def ray_session():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_fsdp_trains_like_ddp_and_resumes(tmp_path, ray_session):
    import torch
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.training.distributed import train_adapter
    from prefect_lora.lora_tasks.training.launcher import prepare_data
    from safetensors.torch import load_file

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    raw["training"].update({"max_steps": 10, "checkpoint_every": 5})
    ddp = config_from_dict(raw)
    raw["scaling"]["strategy"] = "fsdp"
    fsdp = config_from_dict(raw)
    rows = prepare_data(ddp, tmp_path / "data").train_rows

    a = train_adapter(ddp, rows, tmp_path / "ddp", max_failures=0)
    b = train_adapter(fsdp, rows, tmp_path / "fsdp", max_failures=0)
    print(f"\nloss after 10 steps: ddp {a.metrics['train_loss']:.6f}, fsdp {b.metrics['train_loss']:.6f}")
    assert b.metrics["step"] == 10
    assert b.metrics["train_loss"] == pytest.approx(a.metrics["train_loss"], rel=1e-4)
    wa = load_file(str(Path(a.adapter_dir) / "adapter_model.safetensors"))
    wb = load_file(str(Path(b.adapter_dir) / "adapter_model.safetensors"))
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-3, atol=1e-4)

    # A longer run in the FSDP run's folder continues from its step-10 checkpoint.
    raw["training"]["max_steps"] = 14
    longer = train_adapter(config_from_dict(raw), rows, tmp_path / "fsdp", max_failures=0)
    assert longer.metrics["start_step"] == 10 and longer.metrics["step"] == 14
