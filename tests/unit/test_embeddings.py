"""Pooled embeddings kept per base: a train split that grew pays only for its new rows."""

import numpy as np
from prefect_lora.lora_tasks.measurement.embeddings import kept_embeddings, pooled_embeddings
from prefect_lora.lora_tasks.modeling import load_base_model


def test_kept_embeddings_embed_only_rows_not_seen_before(tiny_model_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("PREFECT_LORA_CACHE", str(tmp_path))
    model = load_base_model(tiny_model_dir, "causal_lm").eval()
    embedded = []
    model.register_forward_hook(lambda m, args, kwargs, out: embedded.append(kwargs["input_ids"].shape[0]),
                                with_kwargs=True)
    rng = np.random.default_rng(0)
    rows = [rng.integers(3, 250, size=rng.integers(2, 12)).tolist() for _ in range(20)]

    first = kept_embeddings(model, rows, 0, 8, "base-a|model")
    assert sum(embedded) == 20
    embedded.clear()
    grown = rows[5:] + [rng.integers(3, 250, size=6).tolist() for _ in range(3)]
    again = kept_embeddings(model, grown, 0, 8, "base-a|model")
    assert sum(embedded) == 3  # the 15 kept rows are read back
    np.testing.assert_allclose(again[:15], first[5:], rtol=0, atol=0)
    np.testing.assert_allclose(again, pooled_embeddings(model, grown, 0, 8), atol=1e-5)
    embedded.clear()
    kept_embeddings(model, grown, 0, 8, "base-b|model")  # another base embeds everything
    assert sum(embedded) == len(grown) == 18
