"""Compare-and-set promotion, manual promote, rollback and the audit history on a real SQLite MLflow."""

from __future__ import annotations

import multiprocessing as mp
import threading

import pytest
from prefect_lora.lora_tasks.config import PromotionPolicy
from prefect_lora.lora_tasks.errors import RegistryError
from prefect_lora.lora_tasks.gate.promotion import candidate_from_metrics, decide_promotion
from prefect_lora.lora_tasks.registry import aliases, registry, tracking

pytestmark = pytest.mark.slow
NAME = "race-model"
POLICY = PromotionPolicy(require_forgetting_metrics=False)


def _add_version(uri: str, eval_loss: float) -> str:
    """A run with base/adapted loss and a registered version pointing at its (empty) artifacts."""
    c = tracking.client(uri)
    exp = tracking.ensure_experiment(c, NAME, str(uri.removeprefix("sqlite:///").rsplit("/", 1)[0] + "/art"))
    run = c.create_run(exp)
    tracking.log_metrics(uri, run.info.run_id, {"base_eval_loss": 2.0, "adapted_eval_loss": eval_loss})
    c.set_terminated(run.info.run_id)
    return registry.register_version(uri, NAME, f"{run.info.artifact_uri}/adapter", run.info.run_id, {"lineage.x": "1"})


def _decide(uri: str, version: str, champion):
    metrics = registry.get_version(uri, NAME, version).metrics
    cand = candidate_from_metrics(metrics, "eval_loss", False, version=version)
    inc = candidate_from_metrics(champion.metrics, "eval_loss", False, version=champion.version) if champion else None
    return decide_promotion(cand, inc, POLICY)


def _settle(uri: str, version: str, champion, barrier=None):
    decision = _decide(uri, version, champion)  # the evaluation-time decision, against the old champion
    if barrier is not None:
        barrier.wait()
    return aliases.settle_decision(uri, NAME, version, decision, champion,
                                    lambda cur: _decide(uri, version, cur), actor=f"test-{version}")


@pytest.fixture()
def uri(tmp_path):
    return f"sqlite:///{tmp_path}/mlflow.db"


def test_first_promotion_and_compare_and_set(uri):
    v1 = _add_version(uri, 1.0)
    final, against, record = _settle(uri, v1, None)
    assert final.promote and against is None and record.to_version == v1 and record.from_version is None
    v2 = _add_version(uri, 0.5)
    with pytest.raises(aliases.ChampionChanged) as exc:  # decided against "no champion", but v1 is champion now
        aliases.compare_and_set_alias(uri, NAME, v2, expected=None, reason="stale", action="auto-promote")
    assert exc.value.current.version == v1
    assert registry.get_alias(uri, NAME).version == v1


def _race_in_process(uri, version, champion_version, barrier, out):
    champion = registry.get_version(uri, NAME, champion_version)
    final, against, record = _settle(uri, version, champion, barrier)
    out.put((version, final.promote, against.version if against else None, record.action))


@pytest.mark.parametrize("mode", ["threads", "processes"])
def test_two_racing_promotions_end_with_one_champion_and_both_decisions(uri, mode):
    v1 = _add_version(uri, 1.0)
    aliases.promote_version(uri, NAME, v1, reason="seed")
    v2, v3 = _add_version(uri, 0.6), _add_version(uri, 0.4)  # both beat v1; v3 beats v2
    champion = registry.get_alias(uri, NAME)
    if mode == "threads":
        barrier, results = threading.Barrier(2), []
        threads = [threading.Thread(target=lambda v=v: results.append(_settle(uri, v, champion, barrier))) for v in (v2, v3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        outcomes = {r[2].details.get("candidate", r[2].to_version): (r[0].promote, r[2].action) for r in results}
    else:
        ctx = mp.get_context("spawn")
        barrier, out = ctx.Barrier(2), ctx.Queue()
        procs = [ctx.Process(target=_race_in_process, args=(uri, v, v1, barrier, out)) for v in (v2, v3)]
        for p in procs:
            p.start()
        got = [out.get(timeout=180) for _ in procs]
        for p in procs:
            p.join(30)
        outcomes = {v: (promote, action) for v, promote, _, action in got}
    assert set(outcomes) == {v2, v3}
    # Whoever wrote first, the better version v3 ends as the only champion.
    assert registry.get_alias(uri, NAME).version == v3
    assert outcomes[v3] == (True, "auto-promote")
    c = tracking.client(uri)
    for v in (v2, v3):  # both decisions are on their versions
        assert c.get_model_version(NAME, v).tags["promotion.decision"] in {"promoted", "rejected"}
    history = aliases.alias_history(uri, NAME)
    assert history[0]["action"] == "promote"
    assert {h.get("details", {}).get("candidate") or h["to_version"] for h in history[1:]} == {v2, v3}
    assert all(h["at"] and h["actor"] and h["reason"] for h in history)


def test_manual_promote_rollback_and_history(uri):
    v1, v2 = _add_version(uri, 1.0), _add_version(uri, 0.5)
    aliases.promote_version(uri, NAME, v1, reason="first")
    aliases.promote_version(uri, NAME, v2, reason="better on the new data", actor="alice@host")
    record = aliases.rollback_champion(uri, NAME, reason="bad answers in production")
    assert (record.from_version, record.to_version, record.action) == (v2, v1, "rollback")
    assert registry.get_alias(uri, NAME).version == v1
    history = aliases.alias_history(uri, NAME)
    assert [(h["action"], h["from_version"], h["to_version"]) for h in history] == [
        ("promote", None, v1), ("promote", v1, v2), ("rollback", v2, v1)]
    assert history[1]["actor"] == "alice@host" and history[2]["reason"] == "bad answers in production"
    aliases.rollback_champion(uri, NAME, to_version=v2)
    assert registry.get_alias(uri, NAME).version == v2


def test_user_errors_name_the_thing_and_the_fix(uri):
    v1 = _add_version(uri, 1.0)
    with pytest.raises(RegistryError, match=r"has no version '7'; its versions are \[1\]"):
        aliases.promote_version(uri, NAME, "7", reason="x")
    with pytest.raises(RegistryError, match="needs a reason"):
        aliases.promote_version(uri, NAME, v1, reason=" ")
    with pytest.raises(RegistryError, match=r"no registered model named 'nope'.*race-model"):
        registry.resolve_version(uri, "nope", "champion")
    with pytest.raises(RegistryError, match="has no alias 'champion'.*prefect-lora promote"):
        registry.resolve_version(uri, NAME, "champion")
    with pytest.raises(RegistryError, match="no previous champion"):
        aliases.rollback_champion(uri, NAME)


def test_settling_again_after_our_own_move_changes_nothing(uri):
    v1 = _add_version(uri, 1.0)
    _settle(uri, v1, None)
    before = aliases.alias_history(uri, NAME)
    final, _, record = _settle(uri, v1, None)  # a task retry: decided against "no champion" again
    assert final.promote and record.action == "already-champion"
    assert aliases.alias_history(uri, NAME) == before


def test_a_version_spelled_with_zeros_moves_the_alias_once_and_audited(uri):
    """`promote NAME 0002` is version 2: moved, audited with "2", nothing left half-done."""
    v1, v2 = _add_version(uri, 1.0), _add_version(uri, 0.5)
    aliases.promote_version(uri, NAME, v1, reason="first")
    record = aliases.promote_version(uri, NAME, "000" + v2, reason="spelled with zeros")
    assert (record.from_version, record.to_version) == (v1, v2)
    assert registry.get_alias(uri, NAME).version == v2 and registry.resolve_version(uri, NAME, "0" + v2) == v2
    assert [h["to_version"] for h in aliases.alias_history(uri, NAME, registry.CHAMPION)] == [v1, v2]
    with pytest.raises(RegistryError, match="ASCII digits"):
        aliases.promote_version(uri, NAME, "\u0661", reason="an Arabic-Indic one")
    assert registry.get_alias(uri, NAME).version == v2


def test_an_overwrite_seen_after_the_write_still_leaves_the_audit_record(uri, monkeypatch):
    """Another writer that bypasses the lock: the re-read reports it, and the move made before it
    is on record."""
    v1, v2 = _add_version(uri, 1.0), _add_version(uri, 0.5)
    real_set = tracking.MlflowClient.set_registered_model_alias

    def set_then_overwritten(self, name, alias, version):  # a writer without the lock lands right after ours
        real_set(self, name, alias, version)
        real_set(self, name, alias, v1)

    monkeypatch.setattr(tracking.MlflowClient, "set_registered_model_alias", set_then_overwritten)
    with pytest.raises(aliases.AliasConflict, match="audited"):
        aliases.promote_version(uri, NAME, v2, reason="ours")
    assert [(h["to_version"], h["reason"]) for h in aliases.alias_history(uri, NAME)] == [(v2, "ours")]
