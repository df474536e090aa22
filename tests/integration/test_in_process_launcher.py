"""One worker trained in the flow's process gives what Ray Train gives with one worker."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from test_fault_tolerance import tiny_raw

pytestmark = pytest.mark.slow


def test_in_process_training_equals_one_ray_train_worker(tmp_path):
    """The same weights, and the same progress lines handed to the caller in its own process (a
    flow's run logger): from the loop here, from rank 0's worker through the driver on Ray."""
    import ray
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.training.launcher import prepare_data, train_adapter
    from safetensors.torch import load_file

    raw = tiny_raw(tmp_path, max_steps=12)
    raw["scaling"]["num_workers"] = 1
    results, lines = {}, {"local": [], "ray": []}
    ray.shutdown()
    try:
        for launcher in ("local", "ray"):
            raw["scaling"]["launcher"] = launcher
            cfg = config_from_dict(raw)
            rows = prepare_data(cfg, tmp_path / "data").train_rows
            results[launcher] = train_adapter(cfg, rows, tmp_path / launcher, progress=lines[launcher].append)
            assert ray.is_initialized() == (launcher == "ray")
    finally:
        ray.shutdown()
    on_ray, here = results["ray"], results["local"]
    print(f"\nray: step {on_ray.metrics['step']} loss {on_ray.metrics['train_loss']:.6f}; "
          f"in-process: step {here.metrics['step']} loss {here.metrics['train_loss']:.6f}")
    assert here.metrics["step"] == on_ray.metrics["step"] == 12
    for launcher, said in lines.items():  # a tenth of 12 steps rounds to every step
        assert said[0].startswith("training 12 steps on 1 worker(s) in "), (launcher, said)
        assert [line.split()[2] for line in said[1:]] == [f"{i}/12" for i in range(1, 13)], (launcher, said)
    assert here.metrics["train_loss"] == pytest.approx(on_ray.metrics["train_loss"], rel=1e-5)
    assert Path(here.checkpoint_path).parent == tmp_path / "local" / "train"
    a = load_file(str(Path(here.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(on_ray.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
