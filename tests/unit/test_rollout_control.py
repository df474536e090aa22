"""The gateway's staged rollouts (`deploy/rollout_control.py`) with the registry, Prefect and the
webhook replaced by recorders: what a promotion starts, how requests are shared, what each step,
completion and rollback writes and tells, an outage during a rollback, a restart, and the
`prefect` mode. A clock of the test's own; no Ray, MLflow or Prefect."""

from __future__ import annotations

import asyncio
import random

import pytest
from prefect_lora.deploy import rollout_control
from prefect_lora.deploy.live_export import LiveSignals
from prefect_lora.deploy.live_signals import LATENCY_BOUNDS_S, Tally
from prefect_lora.deploy.rollout_control import Rollouts
from prefect_lora.deploy.serve_core import Secret, ServeConfig
from prefect_lora.lora_tasks.registry.aliases import ChampionChanged

ROLLOUT = {"steps": [0.1, 0.5, 1.0], "min_requests": 20, "hold_s": 10}


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def answers(n: int, failed: int = 0) -> Tally:
    latency = [0] * (len(LATENCY_BOUNDS_S) + 1)
    latency[LATENCY_BOUNDS_S.index(0.3)] = n
    return Tally(requests=n, latency=latency, generated=n, failed_checks=failed)


class Registry:
    """What the controller reads and writes, in memory: the champion, version tags, audit notes,
    rollbacks, events, webhook posts."""

    def __init__(self, monkeypatch, champion: str = "1", last_action: str = "promote"):
        self.champion, self.last_action, self.tags = champion, last_action, {}
        self.notes, self.rollbacks, self.events, self.posts, self.down = [], [], [], [], 0
        monkeypatch.setattr(rollout_control, "_last_move", lambda uri, name: {"to_version": self.champion,
                                                                               "action": self.last_action})
        monkeypatch.setattr(rollout_control, "_tags", lambda uri, name, v: dict(self.tags.get(v, {})))
        monkeypatch.setattr(rollout_control, "_write_tags",
                            lambda uri, name, v, t: self.tags.setdefault(v, {}).update(t))
        monkeypatch.setattr(rollout_control, "_note", lambda uri, r, action, reason, actor, details:
                            self.notes.append((r.version, action, reason)))
        monkeypatch.setattr(rollout_control, "_rollback", self._rollback)
        monkeypatch.setattr("prefect_lora.flows.notifications.post_json",
                            lambda url, payload: self.posts.append((url, payload)))

    def _rollback(self, uri, r, actor):
        if self.down:
            self.down -= 1
            raise ConnectionError("MLflow is down")
        if self.champion != r.version:
            raise ChampionChanged(r.name, "champion", r.version, None)
        self.rollbacks.append((r.version, r.previous, r.reason, r.details))
        self.champion, self.last_action = r.previous, "rollback"


def controller(monkeypatch, registry: Registry, clock: Clock, rollout: dict | None = ROLLOUT,
               webhook: str | None = "http://hooks.example/x") -> Rollouts:
    cfg = ServeConfig(model_name="m", rollout=rollout)
    live = LiveSignals("sqlite:///unused.db", 300, None, clock=clock)
    warmed = []

    async def emit(events):
        registry.events.extend(events)
        return True

    async def refresh():  # as the gateway's: re-read the alias, follow the move
        before, ctl.seen = ctl.seen, registry.champion
        await ctl.follow("m", before, registry.champion)

    async def warm(key):
        warmed.append(key)

    monkeypatch.setattr(live, "emit", emit)
    ctl = Rollouts(cfg, live, refresh, warm, Secret(webhook) if webhook else None, draw=random.Random(0).random)
    ctl.seen, ctl.warmed = registry.champion, warmed
    return ctl


def promote(ctl: Rollouts, registry: Registry, version: str = "2") -> None:
    registry.champion = version
    asyncio.run(ctl._refresh())


def shares(ctl: Rollouts, n: int = 2000) -> dict[str, float]:
    routed = [ctl.route("m", "champion", ctl.seen) for _ in range(n)]
    return {v: routed.count(v) / n for v in set(routed)}


def serve_window(ctl: Rollouts, clock: Clock, new: Tally, old: Tally, seconds: float = 11) -> None:
    """Requests answered by both versions since the step began, `seconds` later, then a tick."""
    ctl.live.store.add("m/2", new)
    ctl.live.store.add("m/1", old)
    clock.now += seconds
    asyncio.run(ctl.tick())


def test_a_promotion_starts_a_rollout_beside_the_previous_champion(monkeypatch):
    registry, clock = Registry(monkeypatch), Clock()
    ctl = controller(monkeypatch, registry, clock)
    promote(ctl, registry)
    assert ctl.warmed == ["m/1"]  # the previous champion stays loaded to take the rest
    assert abs(shares(ctl)["2"] - 0.1) < 0.03
    assert ctl.route("m", "2", "2") == "2" and ctl.route("m", "challenger", "2") == "2"  # named otherwise: as named
    assert registry.tags["2"] == {"rollout.state": "running", "rollout.step": "0.1", "rollout.previous": "1",
                                  "rollout.reason": registry.tags["2"]["rollout.reason"]}
    assert registry.notes[0][:2] == ("2", "rollout-started") and "steps 10%, 50%, 100%" in registry.notes[0][2]
    assert [e["event"] for e in registry.events] == ["prefect-lora.rollout.started"]
    assert ctl.status()["rollouts"]["m"]["share"] == 0.1


@pytest.mark.parametrize("action, champion_of_record", [("rollback", "2"), ("promote", "3")])
def test_a_rollback_or_an_unaudited_move_swaps_at_once(monkeypatch, action, champion_of_record):
    registry, clock = Registry(monkeypatch, last_action=action), Clock()
    ctl = controller(monkeypatch, registry, clock)
    monkeypatch.setattr(rollout_control, "_last_move",
                        lambda uri, name: {"to_version": champion_of_record, "action": action})
    promote(ctl, registry)
    assert shares(ctl) == {"2": 1.0} and ctl.active == {} and registry.tags == {}


def test_a_sound_version_advances_step_by_step_and_completes(monkeypatch):
    registry, clock = Registry(monkeypatch), Clock()
    ctl = controller(monkeypatch, registry, clock)
    ctl.live.store.add("m/1", answers(100, failed=2))  # the previous champion's history: its latency reference
    promote(ctl, registry)
    serve_window(ctl, clock, answers(20, failed=1), answers(180, failed=4), seconds=5)
    assert ctl.active["m"].step == 0  # the evidence is there, the hold time not yet
    serve_window(ctl, clock, Tally(), Tally(), seconds=6)
    assert ctl.active["m"].step == 1 and registry.tags["2"]["rollout.step"] == "0.5"
    assert abs(shares(ctl)["2"] - 0.5) < 0.05
    serve_window(ctl, clock, answers(25, failed=1), answers(25, failed=1))
    assert ctl.active == {} and shares(ctl) == {"2": 1.0}
    assert registry.tags["2"]["rollout.state"] == "completed" and registry.tags["2"]["rollout.step"] == "1"
    assert [a for _, a, _ in registry.notes] == ["rollout-started", "rollout-advanced", "rollout-completed"]
    assert "no signal worse at look" in registry.notes[-1][2]
    assert [e["event"].rsplit(".", 1)[1] for e in registry.events] == ["started", "advanced", "completed"]
    assert registry.rollbacks == [] and registry.posts == []


def test_a_broken_version_is_rolled_back_at_once_with_its_figures(monkeypatch):
    registry, clock = Registry(monkeypatch), Clock()
    ctl = controller(monkeypatch, registry, clock)
    promote(ctl, registry)
    serve_window(ctl, clock, answers(6, failed=6), answers(54, failed=1), seconds=1)
    assert shares(ctl) == {"1": 1.0}  # no request goes to it any more
    ((version, to, reason, details),) = registry.rollbacks
    assert (version, to) == ("2", "1") and registry.champion == "1"
    assert reason.startswith("rollback: output-check failures 1.00 [0.61, 1.00] vs 0.02 on the previous version 1, "
                             "6 requests vs 54") and reason.endswith("at the 10% step")
    assert details["signal"] == "output_checks" and details["figures"]["bad"] == 6 and details["step"] == 0.1
    assert registry.tags["2"]["rollout.state"] == "rolled-back" and registry.tags["2"]["rollout.reason"] == reason
    assert ctl.active == {}  # ended by the swap back
    (event,) = [e for e in registry.events if e["event"] == "prefect-lora.rollout.rolled-back"]
    assert event["payload"]["reason"] == reason and event["resource"]["prefect-lora.version"] == "2"
    assert event["related"][0]["prefect-lora.version"] == "1"
    ((url, post),) = registry.posts
    assert url == "http://hooks.example/x" and post["event"] == "rollback" and post["to_version"] == "1"
    assert post["text"].startswith("prefect-lora: m version 2 rolled back to version 1: rollback: output-check")


def test_a_rollback_while_mlflow_is_down_keeps_the_traffic_off_and_is_retried(monkeypatch):
    registry, clock = Registry(monkeypatch), Clock()
    registry.down = 2
    ctl = controller(monkeypatch, registry, clock)
    promote(ctl, registry)
    serve_window(ctl, clock, answers(6, failed=6), answers(54), seconds=1)
    assert registry.rollbacks == [] and ctl.live.failures["mlflow"] == 1 and shares(ctl) == {"1": 1.0}
    serve_window(ctl, clock, Tally(), Tally(), seconds=1)
    assert registry.rollbacks == [] and ctl.live.failures["mlflow"] == 2 and shares(ctl) == {"1": 1.0}
    serve_window(ctl, clock, Tally(), Tally(), seconds=1)
    assert len(registry.rollbacks) == 1 and registry.champion == "1" and ctl.active == {}
    assert registry.rollbacks[0][3]["figures"]["bad"] == 6  # the retried move still carries the figures


def test_a_newer_promotion_during_a_rollback_is_left_alone(monkeypatch):
    registry, clock = Registry(monkeypatch), Clock()
    registry.down = 1
    ctl = controller(monkeypatch, registry, clock)
    promote(ctl, registry)
    serve_window(ctl, clock, answers(6, failed=6), answers(54), seconds=1)  # the move fails once
    registry.champion = "3"  # meanwhile someone promotes version 3
    serve_window(ctl, clock, Tally(), Tally(), seconds=1)
    assert registry.rollbacks == [] and registry.champion == "3"
    assert registry.tags["2"]["rollout.state"] == "superseded"


def test_a_restarted_gateway_resumes_the_rollout_at_its_step(monkeypatch):
    registry, clock = Registry(monkeypatch, champion="2"), Clock()
    registry.tags["2"] = {"rollout.state": "running", "rollout.step": "0.5", "rollout.previous": "1"}
    ctl = controller(monkeypatch, registry, clock)
    ctl.seen = None  # a fresh gateway has served nothing yet
    asyncio.run(ctl._refresh())
    assert ctl.active["m"].step == 1 and ctl.active["m"].previous == "1" and ctl.warmed == ["m/1"]
    assert abs(shares(ctl)["2"] - 0.5) < 0.05
    registry.tags["2"]["rollout.state"] = "completed"
    fresh = controller(monkeypatch, registry, clock)
    fresh.seen = None
    asyncio.run(fresh._refresh())
    assert fresh.active == {}


def test_in_prefect_mode_the_gateway_stops_the_traffic_and_asks_prefect_to_move_the_alias(monkeypatch):
    registry, clock = Registry(monkeypatch), Clock()
    ctl = controller(monkeypatch, registry, clock, rollout={**ROLLOUT, "rollback": "prefect"})
    promote(ctl, registry)
    serve_window(ctl, clock, answers(6, failed=6), answers(54), seconds=1)
    assert registry.rollbacks == [] and registry.champion == "2" and shares(ctl) == {"1": 1.0}
    (asked,) = [e for e in registry.events if e["event"] == "prefect-lora.rollout.rollback-requested"]
    assert asked["payload"]["previous_version"] == "1" and asked["payload"]["reason"].startswith("rollback: ")
    assert registry.posts[0][1]["event"] == "rollback-requested"
    assert registry.tags["2"]["rollout.state"] == "rollback-requested"
    registry.champion, registry.last_action = "1", "rollback"  # the automation's rollback flow moves it
    asyncio.run(ctl._refresh())
    assert ctl.active == {} and registry.tags["2"]["rollout.state"] == "rolled-back"


def test_without_a_rollout_config_nothing_changes(monkeypatch):
    registry, clock = Registry(monkeypatch), Clock()
    ctl = controller(monkeypatch, registry, clock, rollout=None)
    promote(ctl, registry)
    assert ctl.active == {} and ctl.status() == {} and shares(ctl) == {"2": 1.0} and registry.tags == {}
    assert asyncio.run(ctl.run()) is None  # nothing to judge: returns at once


def test_the_rollback_moves_under_the_shared_lock_and_under_this_machines_when_that_one_is_down(monkeypatch):
    from prefect_lora.deploy.rollout import Rollout

    calls = []

    def rollback_champion(uri, name, to, reason, actor, lock=None, from_version=None, details=None):
        calls.append((to, from_version, lock))
        if lock is not None and lock == "down":
            raise ConnectionError("Prefect is down")

    monkeypatch.setattr("prefect_lora.lora_tasks.registry.aliases.rollback_champion", rollback_champion)
    r = Rollout("m", "2", "1", reason="rollback: errors")
    for shared, expected in (("up", [("1", "2", "up")]), ("down", [("1", "2", "down"), ("1", "2", None)]),
                             (None, [("1", "2", None)])):
        calls.clear()
        monkeypatch.setattr("prefect_lora.flows.locks.shared_alias_lock", lambda shared=shared: shared)
        rollout_control._rollback("sqlite:///x.db", r, "me")
        assert calls == expected
