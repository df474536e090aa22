"""Replay: general rows mixed into training at a set share, formatted as the base saw them, and
never the text the forgetting gate reads."""

from __future__ import annotations

import shutil

import pytest
from prefect_lora.lora_tasks.config import config_from_dict
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.training.encoding import IGNORE_INDEX, REPLAY_KEY, encode_examples
from test_training import make_cfg


def _with(cfg, **sections):
    raw = cfg.model_dump(mode="json")
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value}
    return config_from_dict(raw)


def test_replay_changes_the_training_hash_only_when_used():
    cfg = make_cfg()
    assert _with(cfg, replay={"share": 0.0}).training_hash() == cfg.training_hash()
    assert _with(cfg, replay={"share": 0.2}).training_hash() != cfg.training_hash()
    assert _with(cfg, replay={"share": 0.2, "kl_weight": 0.0}).training_hash() == _with(cfg, replay={"share": 0.2}).training_hash()
    assert _with(cfg, replay={"share": 0.2, "kl_weight": 1.0}).training_hash() != _with(cfg, replay={"share": 0.2}).training_hash()


@pytest.mark.parametrize("sections,message", [
    ({"replay": {"share": 0.2, "source": "corpus"}}, "needs replay.path"),
    ({"replay": {"share": 0.7}}, "less than or equal to 0.5"),
    ({"replay": {"share": 0.2}, "data": {"loader": "ray_data"}}, "held in memory"),
    ({"replay": {"kl_weight": 1.0}}, "replay.share > 0"),
    ({"replay": {"share": 0.2, "kl_weight": 1.0}, "scaling": {"strategy": "fsdp"}}, "scaling.strategy: ddp"),
    ({"replay": {"share": 0.2, "kl_weight": 1.0}, "training": {"method": "full"}}, "training.method: lora"),
])
def test_bad_replay_settings_are_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message):
        _with(make_cfg(), **sections)


def test_replay_rows_are_encoded_as_the_base_answered_them(tiny_model_dir):
    from prefect_lora.lora_tasks.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = _with(make_cfg(), data={"system_prompt": "Answer in JSON."})
    rows = [{"prompt": "1 + 2 =", "completion": " 3"},
            {"prompt": "Why is the sky blue?", "completion": " Light scatters.", REPLAY_KEY: "chat"},
            {"prompt": "", "completion": "Rivers flow to the sea.", REPLAY_KEY: "text"}]
    task, chat, text = encode_examples(rows, tok, cfg)
    assert task == encode_examples(rows[:1], tok, cfg)[0], "task rows are encoded as without replay"
    plain = encode_examples([{"prompt": rows[1]["prompt"], "completion": rows[1]["completion"]}],
                            tok, _with(cfg, data={"system_prompt": None}))[0]
    assert chat == {**plain, "replay": True}, "a replayed pair gets no task system prompt, and is flagged"
    assert "replay" not in task
    assert all(label != IGNORE_INDEX for label in text["labels"]), "plain text is learned whole"
    # One kind of replay alone (self-distillation has no plain text): the absent kind is skipped.
    assert encode_examples(rows[:2], tok, cfg) == [task, chat]


def test_replay_rows_make_up_the_share_cycling_through_the_set(tiny_model_dir, tmp_path, monkeypatch):
    from prefect_lora.lora_tasks.training import probes
    from prefect_lora.lora_tasks.training.replay import replay_rows

    monkeypatch.setattr(probes, "cache_dir", lambda: tmp_path)
    prompts = tmp_path / "replay.txt"
    prompts.write_text("Name a colour.\nName a fruit.\nName a river.\n")
    cfg = _with(make_cfg(), replay={"share": 0.2, "path": str(prompts), "max_new_tokens": 4})
    rows = replay_rows(cfg, num_task_rows=40)
    assert len(rows) == 10, "10 of 50 rows: a share of 0.2"
    assert {r["prompt"] for r in rows} <= {"Name a colour.", "Name a fruit.", "Name a river."}
    assert all(r[REPLAY_KEY] == "chat" and isinstance(r["completion"], str) for r in rows)
    assert list(tmp_path.glob("probes/*.jsonl")), "the base's answers are cached"
    assert replay_rows(cfg, num_task_rows=40) == rows, "and reused"
    assert replay_rows(_with(cfg, replay={"share": 0.0}), num_task_rows=40) == []


def test_the_base_answers_only_as_many_replay_prompts_as_training_reads_twice_over(tiny_model_dir, tmp_path, monkeypatch):
    from prefect_lora.lora_tasks.training import probes
    from prefect_lora.lora_tasks.training.replay import replay_rows

    monkeypatch.setattr(probes, "cache_dir", lambda: tmp_path)
    prompts = tmp_path / "replay.txt"
    prompts.write_text("".join(f"Name thing number {i}.\n" for i in range(40)))
    # 5 steps x 2 rows x 1 worker = 10 rows read, a fifth of them replay: about 2, so 4 prompts answered.
    cfg = _with(make_cfg(), replay={"share": 0.2, "path": str(prompts), "max_new_tokens": 4},
                training={"max_steps": 5, "batch_size": 2})
    rows = replay_rows(cfg, num_task_rows=200)
    assert len(rows) == 50, "the mix still holds a fifth of replay rows"
    asked = {r["prompt"] for r in rows}
    assert len(asked) == 4 and {"Name thing number 0.", "Name thing number 30."} <= asked, "spread over the set"
    answered = (tmp_path / "probes").glob("*.jsonl")
    assert sum(len(f.read_text().splitlines()) for f in answered) == 4
    longer = replay_rows(_with(cfg, training={"max_steps": None, "epochs": 1.0}), num_task_rows=200)
    assert len({r["prompt"] for r in longer}) == 40, "by epochs every row of the mix is read: every prompt answered"


def test_replay_that_overlaps_the_forgetting_evidence_is_refused(tmp_path):
    from prefect_lora.lora_tasks.training.probes import GENERAL_PROBES, REPLAY_PROMPTS
    from prefect_lora.lora_tasks.training.replay import check_disjoint

    leaky = tmp_path / "replay.txt"
    leaky.write_text(f"Tell me a joke.\n{GENERAL_PROBES[3].upper()}\n")
    cfg = _with(make_cfg(), replay={"share": 0.2, "path": str(leaky)}, evaluation={"reference": {"probes": "general"}})
    with pytest.raises(ConfigError, match="shares 1 text.*evaluation.reference.probes"):
        check_disjoint(cfg)
    check_disjoint(_with(cfg, replay={"path": None}))  # the built-in replay set is disjoint from the probes
    assert not {p.lower() for p in REPLAY_PROMPTS} & {p.lower() for p in GENERAL_PROBES}


def _mixed_examples(tok):
    rows = [{"prompt": "1 + 2 =" * (1 + i % 3), "completion": " 3" * (1 + i % 2), **({REPLAY_KEY: "chat"} if i % 3 == 0 else {})}
            for i in range(9)]
    return encode_examples(rows, tok, make_cfg())


def _adapted(tiny_model_dir):
    """The tiny base with a LoRA adapter that changes it (B not zero), and that model's base."""
    import torch
    from prefect_lora.lora_tasks.modeling import apply_lora, load_base_model

    torch.manual_seed(0)
    model = apply_lora(load_base_model(tiny_model_dir, "causal_lm"), "causal_lm", r=4, alpha=8, dropout=0.0,
                       target_modules=None, bias="none").eval()
    for name, p in model.named_parameters():
        if "lora_B" in name:
            p.data.normal_(0, 0.2)

    def base(**inputs):
        with model.disable_adapter():
            return model(**inputs)

    return model, base


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_kl_penalty_is_the_base_to_adapted_kl_on_replay_targets_only(tiny_model_dir, layout):
    """The added loss is exactly weight x KL(base || adapted), summed over the replay examples'
    target tokens, each computed alone with full logits; task rows add nothing."""
    import torch
    from prefect_lora.lora_tasks.measurement.forgetting import token_kl
    from prefect_lora.lora_tasks.modeling import load_tokenizer
    from prefect_lora.lora_tasks.training.encoding import causal_lm_loss, collate, pack

    tok = load_tokenizer(tiny_model_dir)
    model, base = _adapted(tiny_model_dir)
    examples = _mixed_examples(tok)
    batch = pack(examples, tok.pad_token_id) if layout == "packed" else collate(examples, tok.pad_token_id, "causal_lm")
    assert 0 < int(batch["replay"].sum()) < len(batch["replay"]), "replay rows apart from task rows"
    with torch.no_grad():
        plain, n = causal_lm_loss(model, batch)
        penalised, n_kl = causal_lm_loss(model, batch, base, kl_weight=2.5)
        expected = 0.0
        for x in (x for x in examples if x.get("replay")):
            ids = torch.tensor([x["input_ids"]])
            mask = torch.tensor(x["labels"][1:]) != IGNORE_INDEX
            expected += token_kl(base(input_ids=ids).logits[0, :-1], model(input_ids=ids).logits[0, :-1], mask)[0]
        no_replay = {k: v for k, v in batch.items() if k != "replay"}
        assert float(causal_lm_loss(model, no_replay, base, kl_weight=2.5)[0]) == pytest.approx(float(plain), rel=1e-6)
    assert n_kl == n
    assert expected > 0.01
    assert float(penalised - plain) == pytest.approx(2.5 * expected, rel=1e-3)


def test_kl_penalty_keeps_replay_closer_to_the_base(tiny_model_dir, tmp_path):
    """Trained on the same rows and steps, the adapter with the KL penalty ends nearer the base
    on the replay examples (KL per token) than the one with replay alone."""
    import torch
    from peft import PeftModel
    from prefect_lora.lora_tasks.modeling import load_base_model, load_tokenizer
    from prefect_lora.lora_tasks.training.encoding import causal_lm_loss, collate
    from prefect_lora.lora_tasks.training.loop import WorkerContext, train_worker

    tok = load_tokenizer(tiny_model_dir)
    rows = [{"prompt": f"{i} + {i} =", "completion": f" {2 * i}", **({REPLAY_KEY: "chat"} if i % 2 else {})}
            for i in range(32)]
    replay = [x for x in encode_examples(rows, tok, make_cfg()) if x.get("replay")]

    def kl_after(weight, tmp):
        cfg = _with(make_cfg(learning_rate=3e-2, max_steps=40), replay={"share": 0.5, "kl_weight": weight})
        saved = []

        def report(metrics, folder):
            if folder:
                saved.append(shutil.copytree(folder, tmp / str(weight)))

        train_worker(cfg, rows, WorkerContext(report=report))
        model = PeftModel.from_pretrained(load_base_model(tiny_model_dir, "causal_lm"), saved[-1] / "adapter").eval()
        batch = collate(replay, tok.pad_token_id, "causal_lm")

        def base(**inputs):
            with model.disable_adapter():
                return model(**inputs)

        with torch.no_grad():
            plain, n = causal_lm_loss(model, batch)
            return float(causal_lm_loss(model, batch, base, kl_weight=1.0)[0] - plain) / n

    with_kl, alone = kl_after(100.0, tmp_path), kl_after(0.0, tmp_path)
    # the tiny random model's loss per token is ~5 and its KL ~0.02: only a large weight makes the KL matter
    assert with_kl < 0.7 * alone, (with_kl, alone)  # measured: 0.010 against 0.020
