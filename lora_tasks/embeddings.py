"""Pooled text embeddings of a model's final hidden states: what a linear probe reads and what
an encoder's general retrieval is scored on."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def pooled_embeddings(model, token_ids: list[list[int]], pad_id: int, batch_size: int, device="cpu") -> np.ndarray:
    """The mean of the final hidden states over each text's tokens, (texts, hidden) in float32.

    Mean pooling reads every token, so it suits encoders and decoders alike (sentence encoders
    such as all-MiniLM-L6-v2 are trained for it). Texts are batched by length: little padding."""
    order = sorted(range(len(token_ids)), key=lambda i: len(token_ids[i]))
    out: np.ndarray | None = None
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        width = max(len(token_ids[i]) for i in rows)
        ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for j, i in enumerate(rows):
            ids[j, : len(token_ids[i])] = torch.tensor(token_ids[i])
            mask[j, : len(token_ids[i])] = 1
        ids, mask = ids.to(device), mask.to(device)
        hidden = model(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[-1].float()
        weights = mask.unsqueeze(-1).float()
        pooled = ((hidden * weights).sum(1) / weights.sum(1).clamp(min=1.0)).cpu().numpy()
        if out is None:
            out = np.zeros((len(token_ids), pooled.shape[1]), dtype=np.float32)
        out[rows] = pooled
    return out if out is not None else np.zeros((0, 0), dtype=np.float32)
