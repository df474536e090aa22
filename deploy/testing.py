"""Registered adapters made in seconds, for tests, benches and demos of serving.

Each adapter is a PEFT LoRA with random (non-zero) weights on the given base, so every version
answers differently from the base and from the others; it is logged and registered exactly as
the retraining flow does (pyfunc model from code, lineage tags, `challenger` alias)."""

from __future__ import annotations

import tempfile
from pathlib import Path

from prefect_lora.lora_tasks.config import config_from_dict
from prefect_lora.lora_tasks.registry import aliases, registry, tracking


def free_port() -> int:
    """A TCP port on loopback that nothing listens on now (for a server a test or bench starts)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tiny_config(name: str, base_dir: str, tracking_uri: str, artifacts: str, task: str = "causal_lm"):
    data = ({"train_path": "unused.jsonl", "prompt_column": "prompt", "completion_column": "completion"}
            if task == "causal_lm" else {"train_path": "unused.jsonl", "text_column": "text", "labels": ["neg", "pos"]})
    raw = {
        "model_name": name, "task": task, "base_model": {"name_or_path": str(base_dir)}, "data": data,
        "training": {"max_steps": 1, "max_seq_length": 64, "seed": 0},
        "tracking": {"tracking_uri": tracking_uri, "artifact_location": artifacts},
    }
    return config_from_dict(raw, "tiny serving config")


def make_random_adapter(base_dir: str, out_dir: str | Path, seed: int, scale: float = 0.5, task: str = "causal_lm") -> Path:
    """A LoRA adapter with random A and B (scaled), saved as safetensors; for classification
    the (saved) classifier head is random too."""
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from prefect_lora.lora_tasks.modeling import load_base_model

    torch.manual_seed(seed)
    causal = task == "causal_lm"
    base = load_base_model(base_dir, task, num_labels=None if causal else 2, pad_token_id=0)
    model = get_peft_model(base, LoraConfig(task_type=TaskType.CAUSAL_LM if causal else TaskType.SEQ_CLS, r=4,
                                            lora_alpha=8, target_modules="all-linear", init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_" in n or (not causal and "score" in n):
                p.normal_(0.0, scale)
    model.save_pretrained(str(out_dir), safe_serialization=True)
    return Path(out_dir)


def register_random_adapters(tracking_uri: str, name: str, base_dir: str, seeds: list[int],
                             workdir: str | Path | None = None, task: str = "causal_lm") -> list[str]:
    """Register one version per seed; returns the version numbers."""
    workdir = Path(workdir or tempfile.mkdtemp(prefix="pl-adapters-"))
    cfg = tiny_config(name, base_dir, tracking_uri, str(workdir / "mlartifacts"), task)
    versions = []
    for seed in seeds:
        adapter = make_random_adapter(base_dir, workdir / f"adapter-{name}-{seed}", seed, task=task)
        c = tracking.client(tracking_uri)
        exp = tracking.ensure_experiment(c, cfg.experiment_name, cfg.tracking.artifact_location)
        run_id = c.create_run(exp, run_name=f"random-adapter-{seed}", tags={"seed": str(seed)}).info.run_id
        tracking.log_metrics(tracking_uri, run_id, {"base_eval_loss": 5.0, "adapted_eval_loss": 4.0})
        uri = registry.log_adapter_model(cfg, run_id, str(adapter), str(base_dir))
        versions.append(registry.register_version(tracking_uri, name, uri, run_id, {"lineage.base_model": str(base_dir)}))
        aliases.set_challenger(tracking_uri, name, versions[-1], "a random adapter, for serving tests", run_id)
        tracking.end_run(tracking_uri, run_id)
    return versions
