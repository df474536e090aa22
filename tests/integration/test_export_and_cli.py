"""Registered adapters load through pyfunc, export as a PEFT folder or a merged model, and the
promote / rollback / history / export commands act on them (flows under Prefect's test harness)."""

from __future__ import annotations

import json

import pytest
from services import prefect_harness
from typer.testing import CliRunner

pytestmark = pytest.mark.slow
NAME = "export-tiny"
PROMPTS = ["What is 12 plus 30? Answer:", "Add 40 and 2. Answer:"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    from prefect_lora.deploy.testing import register_random_adapters
    from prefect_lora.lora_tasks.registry import aliases

    work = tmp_path_factory.mktemp("export")
    uri = f"sqlite:///{work}/mlflow.db"
    v1, v2 = register_random_adapters(uri, NAME, tiny_model_dir, [5, 6], work)
    aliases.promote_version(uri, NAME, v1, reason="first")
    return {"uri": uri, "v1": v1, "v2": v2, "work": work, "base": tiny_model_dir}


def _greedy(model, tokenizer, prompts, n=6):
    from prefect_lora.lora_tasks.training.encoding import generate_answers

    return generate_answers(model, tokenizer, prompts, n, 8)


def test_champion_loads_through_pyfunc_with_a_signature(store):
    import mlflow

    mlflow.set_tracking_uri(store["uri"])
    model = mlflow.pyfunc.load_model(f"models:/{NAME}@champion")
    sig = model.metadata.signature
    assert sig.inputs.input_names() == ["prompt"] and sig.outputs.input_names() == ["completion"]
    out = model.predict({"prompt": PROMPTS}, params={"max_new_tokens": 6})
    assert len(out) == 2 and all(isinstance(x, str) for x in out["completion"])
    store["pyfunc"] = list(out["completion"])


def test_export_adapter_and_merged_give_the_same_answers(store, tmp_path):
    from peft import PeftModel
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer
    from prefect_lora.lora_tasks.registry import export
    from transformers import AutoModelForCausalLM

    a = export.export_adapter(store["uri"], f"{NAME}@champion", tmp_path / "adapter")
    assert a.version == store["v1"]
    assert {"adapter_config.json", "adapter_model.safetensors"} <= set(a.files)
    assert not [f for f in a.files if f.endswith((".bin", ".pt", ".pkl"))]
    lineage = json.loads((a.path / "prefect_lora.json").read_text())
    assert lineage["registered_model"] == NAME and lineage["version"] == store["v1"]

    m = export.export_merged(store["uri"], f"{NAME}/{store['v1']}", tmp_path / "merged")
    assert "model.safetensors" in m.files and "config.json" in m.files

    tok = load_tokenizer(store["base"])
    adapted = PeftModel.from_pretrained(load_base_model(store["base"], "causal_lm"), str(a.path)).eval()
    merged = AutoModelForCausalLM.from_pretrained(str(m.path)).eval()
    answers = _greedy(adapted, tok, PROMPTS)
    assert _greedy(merged, tok, PROMPTS) == answers
    if "pyfunc" in store:
        assert store["pyfunc"] == answers
    base_answers = _greedy(load_base_model(store["base"], "causal_lm"), tok, PROMPTS)
    assert base_answers != answers  # the adapter changes what the model says


def test_export_errors_name_the_problem(store, tmp_path):
    from prefect_lora.lora_tasks.errors import LoraTaskError
    from prefect_lora.lora_tasks.registry import export

    with pytest.raises(LoraTaskError, match="no alias 'staging'"):
        export.export_adapter(store["uri"], f"{NAME}@staging", tmp_path / "x")
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    with pytest.raises(LoraTaskError, match="not empty.*--force"):
        export.export_adapter(store["uri"], NAME, tmp_path / "full")


@pytest.fixture(scope="module")
def harness():
    with prefect_harness():
        yield


def test_promote_and_rollback_flows_then_history(store, harness):
    from prefect_lora.flows.promote import promote
    from prefect_lora.flows.rollback import rollback
    from prefect_lora.lora_tasks.registry import aliases, registry

    uri, v1, v2 = store["uri"], store["v1"], store["v2"]
    record = promote(NAME, v2, "wins the A/B test", tracking_uri=uri)
    assert (record["from_version"], record["to_version"]) == (v1, v2)
    assert registry.get_alias(uri, NAME).version == v2
    rollback(NAME, tracking_uri=uri)
    assert registry.get_alias(uri, NAME).version == v1
    last = aliases.alias_history(uri, NAME)[-2:]
    assert [(h["action"], h["from_version"], h["to_version"]) for h in last] == [("promote", v1, v2), ("rollback", v2, v1)]
    assert "prefect flow run" in last[0]["actor"] and last[0]["reason"] == "wins the A/B test"

    r = CliRunner().invoke(app_(), ["history", NAME, "--tracking-uri", uri])
    assert r.exit_code == 0 and "rollback" in r.output and "wins the A/B" in r.output


def app_():
    from prefect_lora.flows.cli import app

    return app


def test_cli_user_errors_and_export(store, tmp_path):
    runner, uri = CliRunner(), store["uri"]
    for args, needle in [
        (["promote", NAME, "42", "--reason", "x"], "has no version '42'"),
        (["promote", "nope", "1", "--reason", "x"], "no registered model named 'nope'"),
        (["rollback", NAME, "--to", "9"], "has no version '9'"),
        (["export", NAME], "--adapter DIR, --merged DIR"),
        (["export", f"{NAME}@staging", "--adapter", str(tmp_path / "s")], "no alias 'staging'"),
    ]:
        r = runner.invoke(app_(), [*args, "--tracking-uri", uri])
        assert r.exit_code == 1 and needle in r.output, (args, r.output)
        assert "Traceback" not in r.output
    r = runner.invoke(app_(), ["export", f"{NAME}@champion", "--adapter", str(tmp_path / "a"), "--tracking-uri", uri])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "a" / "adapter_model.safetensors").exists()


def test_cli_promote_runs_the_flow(store, tmp_path):
    import os
    import subprocess
    import sys

    from prefect_lora.lora_tasks.registry import registry

    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect-home")}
    proc = subprocess.run([sys.executable, "-m", "prefect_lora.flows.cli", "promote", NAME, store["v2"], "--reason", "cli test",
                           "--tracking-uri", store["uri"]], capture_output=True, text=True, env=env, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "promote" in proc.stderr and f"-> {store['v2']}" in proc.stderr
    assert registry.get_alias(store["uri"], NAME).version == store["v2"]
