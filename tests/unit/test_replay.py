"""Replay: general rows mixed into training at a set share, formatted as the base saw them, and
never the text the forgetting gate reads."""

from __future__ import annotations

import pytest
from test_training import make_cfg

from lora_tasks.config import config_from_dict
from lora_tasks.encoding import IGNORE_INDEX, REPLAY_KEY, encode_examples
from lora_tasks.errors import ConfigError


def _with(cfg, **sections):
    raw = cfg.model_dump(mode="json")
    for name, value in sections.items():
        raw[name] = {**raw.get(name, {}), **value}
    return config_from_dict(raw)


def test_replay_changes_the_training_hash_only_when_used():
    cfg = make_cfg()
    assert _with(cfg, replay={"share": 0.0}).training_hash() == cfg.training_hash()
    assert _with(cfg, replay={"share": 0.2}).training_hash() != cfg.training_hash()


@pytest.mark.parametrize("sections,message", [
    ({"replay": {"share": 0.2, "source": "corpus"}}, "needs replay.path"),
    ({"replay": {"share": 0.7}}, "less than or equal to 0.5"),
    ({"replay": {"share": 0.2}, "data": {"loader": "ray_data"}}, "held in memory"),
])
def test_bad_replay_settings_are_config_errors(sections, message):
    with pytest.raises(ConfigError, match=message):
        _with(make_cfg(), **sections)


def test_replay_rows_are_encoded_as_the_base_answered_them(tiny_model_dir):
    from lora_tasks.modeling import load_tokenizer

    tok = load_tokenizer(tiny_model_dir)
    cfg = _with(make_cfg(), data={"system_prompt": "Answer in JSON."})
    rows = [{"prompt": "1 + 2 =", "completion": " 3"},
            {"prompt": "Why is the sky blue?", "completion": " Light scatters.", REPLAY_KEY: "chat"},
            {"prompt": "", "completion": "Rivers flow to the sea.", REPLAY_KEY: "text"}]
    task, chat, text = encode_examples(rows, tok, cfg)
    assert task == encode_examples(rows[:1], tok, cfg)[0], "task rows are encoded as without replay"
    plain = encode_examples([{"prompt": rows[1]["prompt"], "completion": rows[1]["completion"]}],
                            tok, _with(cfg, data={"system_prompt": None}))[0]
    assert chat == plain, "a replayed pair gets no task system prompt"
    assert all(label != IGNORE_INDEX for label in text["labels"]), "plain text is learned whole"
    # One kind of replay alone (self-distillation has no plain text): the absent kind is skipped.
    assert encode_examples(rows[:2], tok, cfg) == [task, chat]


def test_replay_rows_make_up_the_share_cycling_through_the_set(tiny_model_dir, tmp_path, monkeypatch):
    from lora_tasks import probes
    from lora_tasks.replay import replay_rows

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


def test_replay_that_overlaps_the_forgetting_evidence_is_refused(tmp_path):
    from lora_tasks.probes import GENERAL_PROBES, REPLAY_PROMPTS
    from lora_tasks.replay import check_disjoint

    leaky = tmp_path / "replay.txt"
    leaky.write_text(f"Tell me a joke.\n{GENERAL_PROBES[3].upper()}\n")
    cfg = _with(make_cfg(), replay={"share": 0.2, "path": str(leaky)}, evaluation={"reference": {"probes": "general"}})
    with pytest.raises(ConfigError, match="shares 1 text.*evaluation.reference.probes"):
        check_disjoint(cfg)
    check_disjoint(_with(cfg, replay={"path": None}))  # the built-in replay set is disjoint from the probes
    assert not {p.lower() for p in REPLAY_PROMPTS} & {p.lower() for p in GENERAL_PROBES}
