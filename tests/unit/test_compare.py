"""LoRA vs full fine-tuning report: what is measured, on the tiny Llama (no Ray, no MLflow)."""

import json
from pathlib import Path

import yaml
from prefect_lora.lora_tasks.config import config_from_dict
from prefect_lora.lora_tasks.measurement.compare import compare_methods, format_table, ratios, to_json
from typer.testing import CliRunner

REPO = Path(__file__).resolve().parents[2]
ROWS = [json.loads(line) for line in (REPO / "configs" / "data" / "tiny_sums.jsonl").read_text().splitlines()]


def _cfg():
    return config_from_dict({
        "model_name": "t", "task": "causal_lm", "base_model": {"name_or_path": "builtin:tiny-llama"},
        "data": {"train_path": "x.jsonl", "prompt_column": "prompt", "completion_column": "completion"},
        "lora": {"r": 2, "dropout": 0.0, "target_modules": ["q_proj", "v_proj"]},
        "training": {"max_steps": 3, "batch_size": 4, "max_seq_length": 48, "checkpoint_every": 1},
    })


def test_lora_keeps_a_fraction_of_full_fine_tunings_training_state(tiny_model_dir):
    results = compare_methods(_cfg(), ROWS[:32], [], evaluate=False, log=lambda m: None)
    lora, full = results["lora"], results["full"]
    assert lora.trainable_params < full.trainable_params == full.total_params
    assert lora.total_params == full.total_params + lora.trainable_params  # the adapter adds its own
    # full: fp32 weights, one gradient and two Adam moments per weight (tied embedding once)
    assert full.state_bytes["gradients"] == full.state_bytes["weights"]
    assert full.state_bytes["optimizer"] >= 2 * full.state_bytes["weights"]
    assert lora.state_bytes["gradients"] == 4 * lora.trainable_params
    r = ratios(results)
    assert r["training_state"] < 0.4 and r["artifact"] < 0.5
    assert lora.steps == full.steps == 3 and lora.peak_rss_mb > 0
    table = format_table(results)
    assert "training state total (MiB)" in table and "LoRA / full: training_state" in table
    json.dumps(to_json(results))


def test_compare_full_command_prints_the_table_and_writes_json(tiny_model_dir, tmp_path):
    from prefect_lora.flows.cli import app

    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["scaling"]["storage_path"] = str(tmp_path / "runs")
    raw["training"].update(max_steps=2, warmup_steps=0)
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(raw))
    out = tmp_path / "cmp.json"
    result = CliRunner().invoke(app, ["compare-full", str(path), "--no-eval", "--full-lr", "1e-4", "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "optimizer state (MiB)" in result.output
    saved = json.loads(out.read_text())
    assert set(saved["results"]) == {"lora", "full"}
    assert saved["results"]["full"]["learning_rate"] == 1e-4


def test_full_fine_tuning_is_compared_without_a_remedy_lora_keeps_its_own():
    from prefect_lora.lora_tasks.measurement.compare import config_for

    raw = yaml.safe_load(Path("configs/demo.yaml").read_text())
    cfg = config_from_dict(raw)
    assert cfg.remedy.strategy == "scale"
    assert config_for(cfg, "full").remedy.strategy == "none", "a full model has no update to scale"
    assert config_for(cfg, "lora", 1e-3).remedy == cfg.remedy
    assert cfg.replay.kl_weight > 0
    assert config_for(cfg, "full").replay.kl_weight == 0.0, "no adapter to disable for the base's logits"
    assert config_for(cfg, "lora").replay == cfg.replay
