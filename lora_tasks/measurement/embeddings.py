"""Pooled text embeddings of a model's final hidden states: what a linear probe reads and what
an encoder's general retrieval is scored on."""

from __future__ import annotations

import hashlib
import io

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


def kept_embeddings(model, token_ids: list[list[int]], pad_id: int, batch_size: int, identity: str | None,
                    device="cpu") -> np.ndarray:
    """`pooled_embeddings`, reading back the rows this base embedded before and embedding only
    the rest: a scheduled retrain whose train split grew by a night's rows pays for those rows.

    The rows are kept per base `identity` (None: nothing kept), keyed by their token ids; the
    store holds the latest call's rows only, so it stays the size of one train split."""
    if not identity or not token_ids:
        return pooled_embeddings(model, token_ids, pad_id, batch_size, device)
    from ..modeling import cache_dir, write_cache_file

    path = cache_dir() / "embeddings" / f"{hashlib.sha256(identity.encode()).hexdigest()[:32]}.npz"
    keys = np.array([hashlib.blake2b(np.asarray(t, dtype=np.int64).tobytes(), digest_size=16).digest()
                     for t in token_ids], dtype="S16")
    try:
        with np.load(path, allow_pickle=False) as z:
            kept = dict(zip(z["keys"].tolist(), z["vectors"]))
    except (OSError, ValueError, KeyError):
        kept = {}
    missing = [i for i, k in enumerate(keys.tolist()) if k not in kept]
    fresh = pooled_embeddings(model, [token_ids[i] for i in missing], pad_id, batch_size, device)
    kept.update(zip(keys[missing].tolist(), fresh))
    out = np.stack([kept[k] for k in keys.tolist()]).astype(np.float32)
    if missing:
        buf = io.BytesIO()
        np.savez(buf, keys=keys, vectors=out)
        write_cache_file(path, lambda f: f.write(buf.getvalue()))
    return out
