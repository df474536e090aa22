"""The fleet file: its shape checked at once, each member the shared config plus its own keys."""

from __future__ import annotations

from dataclasses import replace

import pytest
import yaml
from prefect_lora.lora_tasks.config import load_config
from prefect_lora.lora_tasks.errors import ConfigError
from prefect_lora.lora_tasks.fleet import (
    MemberOutcome,
    changed_members,
    data_state,
    fleet_gate,
    load_fleet,
    only_members,
    summary_markdown,
)
from prefect_lora.lora_tasks.gate.promotion import FleetGate
from prefect_lora.lora_tasks.registry.lifecycle import RunResult


def _write(tmp_path, raw) -> str:
    path = tmp_path / "fleet.yaml"
    path.write_text(yaml.safe_dump(raw) if not isinstance(raw, str) else raw)
    return str(path)


def test_each_member_is_the_shared_config_with_its_own_name_and_keys(tmp_path):
    fleet = load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members": [
        {"name": "sums-a", "set": {"data.train_path": "a.jsonl", "training.learning_rate": 0.001}},
        {"name": "sums-b"}]}), ["training.max_steps=30"])
    assert [m.name for m in fleet.members] == ["sums-a", "sums-b"]
    a, b = (load_config(fleet.config, m.overrides) for m in fleet.members)
    assert (a.model_name, b.model_name) == ("sums-a", "sums-b")
    assert a.data.train_path.endswith("a.jsonl") and a.training.learning_rate == 0.001
    assert b.training.learning_rate == load_config("configs/tiny.yaml").training.learning_rate
    assert a.training.max_steps == b.training.max_steps == 30, "the command line's --set applies to every member"


def test_every_problem_of_the_fleet_file_is_reported_at_once_naming_the_member(tmp_path):
    with pytest.raises(ConfigError) as err:
        load_fleet(_write(tmp_path, {"config": "nope.yaml", "extra": 1, "members": [
            {"name": "a"}, {"name": "A"}, {"name": "bad name!"}, {"name": "c", "set": {"model_name": "x"}},
            {"name": "d", "set": ["data.train_path=x"]}, {"name": "e", "sets": {}}]}))
    text = str(err.value)
    for needle in ("config: no such file 'nope.yaml'", "extra: unknown key", "members[1] (A): the name is taken",
                   "members[2]: a member is a mapping with a `name`", "members[3] (c).set.model_name",
                   "members[4] (d).set: a mapping", "members[5] (e).sets: unknown key"):
        assert needle in text, text
    with pytest.raises(ConfigError, match="members: a list of members is required"):
        load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members": []}))
    with pytest.raises(ConfigError, match="a fleet file is a mapping"):
        load_fleet(_write(tmp_path, "- just a list\n"))
    with pytest.raises(ConfigError, match="cannot read the fleet file"):
        load_fleet(tmp_path / "missing.yaml")


def test_the_summary_names_each_members_decision_and_the_check_that_stopped_it():
    refused = RunResult("b", "2", False, ["task_gain: improved by 0.2 [0.1, 0.3] over base (required 0.05)",
                                          "reference_kl: 0.9 [0.8, 1.0] beyond the limit 0.5"], "r2", "d", "sqlite:///x",
                        {"task_gain": 0.2, "task_gain_ci_low": 0.1, "task_gain_ci_high": 0.3, "reference_kl": 0.9,
                         "reference_perplexity_ratio": 1.3, "reference_perplexity_ratio_ci_low": 1.25,
                         "reference_perplexity_ratio_ci_high": 1.4}, failed_checks=["reference_kl"], gate_p_value=0.91)
    outcomes = [MemberOutcome.of("a", RunResult("a", "1", True, ["task_gain: ok"], "r1", "d", "u"), 12.0),
                MemberOutcome.of("b", refused, 14.0),
                MemberOutcome.failure("c", ValueError("row 3, column completion: blank text\nmore"), 1.0)]
    assert [o.decision for o in outcomes] == ["promoted", "not promoted", "failed"]
    assert outcomes[0].reason == "" and outcomes[1].reason.startswith("reference_kl: 0.9") and outcomes[2].reason == "row 3, column completion: blank text"
    from prefect_lora.lora_tasks.fleet import Fleet

    fleet = Fleet("f/fleet.yaml", "configs/tiny.yaml", [])
    md = summary_markdown(fleet, outcomes, {"b": "http://mlflow/run/r2"}, FleetGate(0.05, 0.012, 2))
    assert "3 members (1 failed, 1 not promoted, 1 promoted)" in md
    assert "| [b](http://mlflow/run/r2) | not promoted | 2 | 0.2 [0.1, 0.3] | ratio 1.3 [1.25, 1.4], KL 0.9 | 0.91 | 14 |\n" in md
    assert "- **b** (not promoted): reference_kl: 0.9 [0.8, 1.0] beyond the limit 0.5\n" in md
    assert "- **c** (failed): row 3, column completion: blank text\n" in md and "- **a**" not in md
    assert "2 member(s) gated together" in md and "(p <= 0.012)" in md and "at most 5% of the promotions" in md
    assert "Each member promotes on its own gate" in summary_markdown(replace(fleet, fdr=None), outcomes)


def test_the_fleet_rate_is_read_and_checked(tmp_path):
    members = [{"name": "a"}]
    assert load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members": members})).fdr == 0.05
    assert load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "fdr": 0.1, "members": members})).fdr == 0.1
    assert load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "fdr": None, "members": members})).fdr is None
    for bad in (0, 1.5, "high", True):
        with pytest.raises(ConfigError, match="fdr: .* is not a rate"):
            load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "fdr": bad, "members": members}))


def test_the_fleet_concurrency_is_read_and_checked(tmp_path):
    members = [{"name": "a"}]
    assert load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members": members})).concurrency == 1
    assert load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "concurrency": 4, "members": members})).concurrency == 4
    for bad in (0, 2.5, "auto", True, None):
        with pytest.raises(ConfigError, match="concurrency: .* is not a count"):
            load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "concurrency": bad, "members": members}))


def test_the_fleet_gate_counts_the_members_gated_together():
    assert fleet_gate(None, [0.01, 0.2]) is None
    gate = fleet_gate(0.05, [0.001, 0.01, 0.03, 0.2])
    assert (gate.threshold, gate.members, gate.fdr) == (0.03, 4, 0.05)


def test_every_shipped_fleet_loads_with_each_members_config(monkeypatch):
    from pathlib import Path

    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # a fleet's paths are relative to the working directory
    fleets = sorted(Path("configs/fleets").glob("*.yaml"))
    assert fleets
    for path in fleets:
        fleet = load_fleet(path)
        names = [load_config(fleet.config, m.overrides).model_name for m in fleet.members]
        assert names == [m.name for m in fleet.members], path


def test_only_the_members_named_run_and_an_unknown_name_lists_the_fleet(tmp_path):
    fleet = load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members": [{"name": n} for n in "abc"]}))
    assert [m.name for m in only_members(fleet, ["c", "a"]).members] == ["a", "c"]  # the file's order
    assert only_members(fleet, None) is fleet
    with pytest.raises(ConfigError, match="no member named 'x'; the fleet's members are a, b, c"):
        only_members(fleet, ["a", "x"])


def test_the_watcher_sees_a_changed_added_or_removed_file_and_records_on_its_first_look(tmp_path):
    import os

    data = tmp_path / "data"
    data.mkdir()
    (data / "a.jsonl").write_text("one\n")
    (tmp_path / "b.jsonl").write_text("two\n")
    states = lambda: {"folder": data_state([str(data)]), "file": data_state([str(tmp_path / "b.jsonl")])}  # noqa: E731
    first = states()
    assert changed_members(first, None) == [], "the first look only records"
    assert changed_members(states(), first) == [], "nothing changed"
    (tmp_path / "b.jsonl").write_text("two, more\n")
    assert changed_members(states(), first) == ["file"]
    second = states()
    (data / "new.jsonl").write_text("x\n")
    assert changed_members(states(), second) == ["folder"], "a file added under a member's folder"
    third = states()
    os.remove(data / "new.jsonl")
    assert changed_members(states(), third) == ["folder"]
    assert changed_members({**states(), "new-member": "s"}, third) == ["folder", "new-member"]
    assert data_state([str(tmp_path / "missing.jsonl")]) != data_state([str(tmp_path / "b.jsonl")])


def test_a_member_per_file_of_a_folder_and_listed_members_add_their_own_keys(tmp_path):
    folder = tmp_path / "customers"
    folder.mkdir()
    for name in ("acme", "globex", "initech"):
        (folder / f"{name}.jsonl").write_text("{}\n")
    fleet = load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members_from": {"glob": str(folder / "*.jsonl")},
                                         "members": [{"name": "globex", "set": {"training.learning_rate": 0.001}},
                                                     {"name": "extra"}]}))
    assert [m.name for m in fleet.members] == ["acme", "globex", "initech", "extra"]
    globex = load_config(fleet.config, fleet.members[1].overrides)
    assert globex.data.train_path.endswith("customers/globex.jsonl") and globex.training.learning_rate == 0.001
    assert load_config(fleet.config, fleet.members[3].overrides).data.train_path.endswith("tiny_sums.jsonl")
    (folder / "bad name.jsonl").write_text("{}\n")
    with pytest.raises(ConfigError) as err:
        load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members_from": {"glob": str(folder / "*.jsonl"),
                                                                                     "sets": "x"}}))
    assert "'bad name' cannot name a member" in str(err.value) and "members_from.sets: unknown key" in str(err.value)
    with pytest.raises(ConfigError, match="no file matches"):
        load_fleet(_write(tmp_path, {"config": "configs/tiny.yaml", "members_from": {"glob": str(tmp_path / "none/*.csv")}}))


def test_a_held_member_says_it_waits_for_the_fleets_gate():
    held = RunResult("a", None, False, ["held for the fleet's gate"], "r1", "d", "u", held=True, gate_p_value=0.004)
    o = MemberOutcome.of("a", held, 5.0)
    assert (o.decision, o.reason, o.p_value) == ("held", "gate p-value 0.004, decided with the other members", 0.004)


@pytest.mark.parametrize("content, says", [
    ("config: configs/tiny.yaml\nmembers: &m0 [{name: a}, {name: a}, {name: a}]\n"
     + "".join(f"x{i}: &m{i} [{', '.join([f'*m{i - 1}'] * 9)}]\n" for i in range(1, 10)), "expands to more than"),
    ("config: configs/tiny.yaml\nconcurrency: " + "9" * 5000 + "\nmembers: [{name: a}]\n", "concurrency: the number is out of range"),
    ("config: configs/tiny.yaml\nmembers: " + "[" * 150 + "]" * 150 + "\n", "nested more than 100 levels"),
])
def test_a_fleet_file_that_yaml_makes_huge_is_one_config_error(tmp_path, content, says):
    """A fleet file is read as a config is: no alias expansion beyond bounds, no int() traceback,
    no RecursionError."""
    with pytest.raises(ConfigError, match=says):
        load_fleet(_write(tmp_path, content))
