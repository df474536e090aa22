"""The MLflow pyfunc flavour of a registered adapter, logged as a model from code (no pickle).

The logged model carries only the PEFT adapter (safetensors) and a reference to its base
(hub id and revision, or local folder and content hash); loading resolves the base, attaches
the adapter and predicts. `mlflow.pyfunc.load_model("models:/NAME@champion")` gives one.
"""

from __future__ import annotations

import json
from pathlib import Path

import mlflow.models
import mlflow.pyfunc
import numpy as np
import pandas as pd
import torch

INPUT_COLUMN = {"causal_lm": "prompt", "sequence_classification": "text"}


def _texts(model_input, column: str) -> list[str]:
    if isinstance(model_input, pd.DataFrame):
        if column not in model_input.columns:
            raise ValueError(f"input needs a {column!r} column; got columns {list(model_input.columns)}")
        texts = []
        for cell in model_input[column].tolist():  # MLflow turns {"prompt": [a, b]} into one row holding a list
            texts.extend(str(x) for x in cell) if isinstance(cell, (list, tuple, np.ndarray)) else texts.append(str(cell))
        return texts
    if isinstance(model_input, str):
        return [model_input]
    if isinstance(model_input, dict):
        value = model_input[column]
        return [value] if isinstance(value, str) else [str(x) for x in value]
    return [str(x) for x in model_input]


def _check_base(cfg: dict) -> None:
    """A local base folder must still hold the bytes the adapter was trained on (recorded hash)."""
    import warnings
    from pathlib import Path

    from lora_tasks.modeling import folder_hash

    expected = cfg.get("base_model_hash")
    if expected and Path(cfg["base_model"]).is_dir() and folder_hash(cfg["base_model"]) != expected:
        warnings.warn(
            f"base model folder {cfg['base_model']} changed since this adapter was trained (content hash differs "
            "from lineage.base_model_hash); its answers may differ from the evaluated ones", stacklevel=2,
        )


class LoraAdapterModel(mlflow.pyfunc.PythonModel):
    """Base model + LoRA adapter, loaded lazily from the model's config and artifacts."""

    def load_context(self, context) -> None:
        from lora_tasks.modeling import load_adapted_model, load_base_model, load_tokenizer

        settings = context.artifacts.get("settings")  # versions logged before it carry `model_config`
        cfg = json.loads(Path(settings).read_text()) if settings else context.model_config
        self.task = cfg["task"]
        self.labels = cfg.get("labels")
        _check_base(cfg)
        self.tokenizer = load_tokenizer(cfg["base_model"], cfg.get("revision"))
        torch.manual_seed(int(cfg.get("seed", 0)))
        base = load_base_model(
            cfg["base_model"], self.task, revision=cfg.get("revision"),
            num_labels=len(self.labels) if self.labels else None,
            torch_dtype=cfg.get("torch_dtype", "float32"), pad_token_id=self.tokenizer.pad_token_id,
        )
        self.model = load_adapted_model(base, context.artifacts["adapter"])
        self.max_length = int(cfg.get("max_seq_length", 512))
        # Prompts are wrapped exactly as in training (chat template and system prompt).
        self.prompting = {"chat_template": bool(cfg.get("chat_template")), "system_prompt": cfg.get("system_prompt")}

    @torch.no_grad()
    def predict(self, context, model_input: pd.DataFrame, params: dict | None = None) -> pd.DataFrame:
        texts = _texts(model_input, INPUT_COLUMN[self.task])
        if self.task == "sequence_classification":
            enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt")
            probs = self.model(**enc).logits.softmax(-1)
            score, idx = probs.max(-1)
            return pd.DataFrame({"label": [str(self.labels[i]) for i in idx.tolist()], "score": score.tolist()})
        from lora_tasks.training.encoding import generate_answers

        max_new = int((params or {}).get("max_new_tokens", 64))
        return pd.DataFrame({"completion": generate_answers(self.model, self.tokenizer, texts, max_new, 8, **self.prompting)})


mlflow.models.set_model(LoraAdapterModel())
