"""The gateway's staged rollouts: what follows a promotion of a served model while the server
runs (the decisions are `rollout.py`'s).

When the gateway sees `champion` move to another version by an audited promotion (`promote`,
`auto-promote`; a rollback or an unaudited move swaps at once), the new champion takes the first
step's share of champion-bound requests beside the previous champion; every `TICK_S` each step's
window (both versions' counts since the step began) is judged: hold, advance to the next share
(1.0 completes the rollout), or roll back. A rollback first sends the new version no more
traffic (requests already on it finish there, it stays loaded), then moves `champion` back by the
audited compare-and-set of `prefect-lora rollback` (only while the champion is still the rolled
out version), emits the Prefect event `prefect-lora.rollout.rolled-back` and posts to the webhook
(`PREFECT_LORA_WEBHOOK_URL`). With `rollback: prefect` it emits
`prefect-lora.rollout.rollback-requested` instead and a Prefect automation moves the alias.

The state lives in the registry, on the rolled-out version's tags (`rollout.state`, `rollout.step`,
`rollout.previous`, `rollout.reason`), and each start, step and end is an audit record beside the
alias moves (`prefect-lora history`): a restarted gateway resumes a running rollout at its step,
on a fresh window. MLflow or Prefect being down never fails a request: a failed write is counted
and logged once (`/metrics`), and a rollback's alias move is tried again at every tick."""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable

from prefect_lora.deploy.live_export import LiveSignals, event
from prefect_lora.deploy.live_signals import Tally
from prefect_lora.deploy.rollout import (
    COMPLETED,
    RESUMABLE,
    ROLLBACK_REQUESTED,
    ROLLED_BACK,
    ROLLING_BACK,
    RUNNING,
    SUPERSEDED,
    Rollout,
    RolloutConfig,
    Verdict,
    judge,
    thresholds,
)
from prefect_lora.deploy.serve_core import Secret, served_key

logger = logging.getLogger("ray.serve")
TICK_S = 1.0
"""How often each running step is judged (a look is taken only when one falls due)."""
TAGS = ("rollout.state", "rollout.step", "rollout.previous", "rollout.reason")
"""The model-version tags that hold a rollout's state."""
EVENT_PREFIX = "prefect-lora.rollout."
"""Events: `started`, `advanced`, `completed`, `rolled-back`, `rollback-requested`, `superseded`."""


class Rollouts:
    """Every served model's rollout: `follow` after each alias refresh, `route` per request,
    `run` to judge them until cancelled. Without `rollout` in the serve config, none starts."""

    def __init__(self, cfg, live: LiveSignals, refresh: Callable[[], Awaitable], warm: Callable[[str], Awaitable],
                 webhook: Secret | None = None, draw: Callable[[], float] = random.random):
        self.cfg: RolloutConfig | None = cfg.rollout
        self.uri, self.app, self.live, self.webhook = cfg.tracking_uri, cfg.app_name, live, webhook
        self._refresh, self._warm, self._draw = refresh, warm, draw
        self.active: dict[str, Rollout] = {}

    @property
    def clock(self):
        return self.live.store.clock

    # -- requests

    def route(self, name: str, ref: str, version: str) -> str:
        """The version a request for `name`'s `ref` (an alias or a version, resolved to `version`) runs on."""
        r = self.active.get(name)
        if ref != "champion" or r is None or r.version != version:
            return version
        return r.route(self.cfg, self._draw())

    def status(self) -> dict:
        """`{"rollouts": {name: state}}` for `/health` (nothing without a rollout config)."""
        if self.cfg is None:
            return {}
        return {"rollouts": {name: {"version": r.version, "previous": r.previous, "state": r.state,
                                    "share": r.share(self.cfg), "reason": r.reason} for name, r in self.active.items()}}

    # -- alias moves

    async def follow(self, name: str, before: str | None, now: str | None) -> None:
        """After a refresh: `name`'s champion was `before` and is `now`. End a rollout whose version
        is no longer champion; start one after a promotion; resume one a restart interrupted."""
        r = self.active.get(name)
        if r is not None and r.version != now:
            await self._end(r, now)
        if self.cfg is None or now is None or (r is not None and r.version == now):
            return
        try:
            if before is not None and before != now:
                move = await self._io("mlflow", _last_move, self.uri, name)
                if move and move.get("to_version") == now and move.get("action") != "rollback":
                    await self._start(Rollout(name, now, before))
            elif before is None:
                tags = await self._io("mlflow", _tags, self.uri, name, now) or {}
                if tags.get("rollout.state") in RESUMABLE and tags.get("rollout.previous"):
                    await self._resume(name, now, tags)
        except Exception as exc:  # noqa: BLE001  (the previous version cannot load: the swap stands as it is)
            self.active.pop(name, None)
            logger.error("%s: no staged rollout of version %s (%s); it takes all champion traffic", name, now, exc)

    async def _end(self, r: Rollout, now: str | None) -> None:
        """The champion moved away from `r.version`: rolled back (by this rollout or anyone), or superseded."""
        self.active.pop(r.name, None)
        ours = r.state in (ROLLING_BACK, ROLLBACK_REQUESTED, ROLLED_BACK)
        r.state = ROLLED_BACK if now == r.previous else SUPERSEDED
        reason = r.reason if ours and r.state == ROLLED_BACK else f"champion moved to version {now} by another mover"
        await self._record(r, r.state, reason, note=not ours)

    async def _start(self, r: Rollout) -> None:
        await self._warm(served_key(r.name, r.previous))
        await asyncio.to_thread(thresholds, self.cfg)  # the boundaries' simulation, off the event loop
        r.begin_step(0, self.live.store.mark(), self.clock(), served_key(r.name, r.previous))
        self.active[r.name] = r
        steps = ", ".join(f"{s:.0%}" for s in self.cfg.steps)
        r.reason = (f"staged rollout of version {r.version} beside version {r.previous}: steps {steps}, "
                    f"min_requests {self.cfg.min_requests}, hold_s {self.cfg.hold_s:g}, "
                    f"false rollback rate {self.cfg.false_rollback_rate:g}")
        logger.info("%s: %s", r.name, r.reason)
        await self._record(r, "started", r.reason)

    async def _resume(self, name: str, version: str, tags: dict) -> None:
        share = float(tags.get("rollout.step") or self.cfg.steps[0])
        step = next((i for i, s in enumerate(self.cfg.steps) if s >= share), 0)
        r = Rollout(name, version, tags["rollout.previous"], state=tags["rollout.state"],
                    reason=tags.get("rollout.reason", ""))
        await self._warm(served_key(name, r.previous))
        await asyncio.to_thread(thresholds, self.cfg)
        r.begin_step(step, self.live.store.mark(), self.clock(), served_key(name, r.previous))
        self.active[name] = r
        logger.info("%s: resumed the rollout of version %s (%s, step %s) after a restart", name, version, r.state,
                    share)

    # -- judging

    async def run(self) -> None:
        """Judge every rollout each `TICK_S` until cancelled."""
        while self.cfg is not None:
            await asyncio.sleep(TICK_S)
            try:
                await self.tick()
            except Exception:  # (a fault of ours: the next tick tries again)
                logger.exception("rollout: the tick failed")

    async def tick(self) -> None:
        for r in list(self.active.values()):
            if r.state == ROLLING_BACK:
                await self._move_back(r)
            elif r.state == RUNNING:
                await self._judge(r)

    async def _judge(self, r: Rollout) -> None:
        window = self.live.store.since(r.mark)
        new, old = (window.get(served_key(r.name, v), Tally()) for v in (r.version, r.previous))
        verdict = judge(self.cfg, new, old, held_s=self.clock() - r.started, looked=r.looked, previous=r.previous,
                        latency_bucket=r.latency_bucket)
        r.looked = verdict.look if verdict.look is not None else r.looked
        if verdict.action == "rollback":
            await self._roll_back(r, verdict)
        elif verdict.action == "advance":
            await self._advance(r, verdict)

    async def _advance(self, r: Rollout, verdict: Verdict) -> None:
        was = self.cfg.steps[r.step]
        r.begin_step(r.step + 1, self.live.store.mark(), self.clock(), served_key(r.name, r.previous))
        r.reason = f"{verdict.reason} at the {was:.0%} step"
        if self.cfg.steps[r.step] >= 1.0:
            r.state = COMPLETED
            self.active.pop(r.name, None)
            logger.info("%s: rollout of version %s completed (%s)", r.name, r.version, r.reason)
            await self._record(r, "completed", f"rollout completed: {r.reason}", verdict)
        else:
            logger.info("%s: version %s advances to %.0f%% (%s)", r.name, r.version, 100 * self.cfg.steps[r.step],
                        r.reason)
            await self._record(r, "advanced", f"advanced to {self.cfg.steps[r.step]:.0%}: {r.reason}", verdict)

    async def _roll_back(self, r: Rollout, verdict: Verdict) -> None:
        """Send the version no more traffic at once, then record, tell, and move `champion` back."""
        share = self.cfg.steps[r.step]
        r.state = ROLLING_BACK if self.cfg.rollback == "serve" else ROLLBACK_REQUESTED
        r.reason = f"{verdict.reason}, at the {share:.0%} step"
        r.details = {"rollout": True, "step": share, **_figures(verdict)}
        logger.warning("%s: version %s: %s", r.name, r.version, r.reason)
        requested = r.state == ROLLBACK_REQUESTED
        await self._record(r, "rollback-requested" if requested else None, r.reason, verdict, note=requested)
        await self._notify(r, verdict)
        if not requested:
            await self._move_back(r)

    async def _move_back(self, r: Rollout) -> None:
        """`prefect-lora rollback`'s move while `r.version` is champion; then swap (`follow` ends it)."""
        from prefect_lora.lora_tasks.registry.aliases import ChampionChanged

        try:
            await asyncio.to_thread(_rollback, self.uri, r, self._actor())
        except ChampionChanged:  # moved since: back already (someone else), or a newer promotion
            pass
        except Exception as exc:  # noqa: BLE001  (MLflow or the lock is down: try again at the next tick)
            self.live.sink_failed("mlflow", exc)
            return
        else:
            self.live.sink_ok("mlflow")
        r.state = ROLLED_BACK
        await self._refresh()

    # -- records: tags, audit notes, events, webhook

    async def _record(self, r: Rollout, what: str | None, reason: str, verdict: Verdict | None = None,
                      note: bool = True) -> None:
        """Write an audit note (`note`), the state to the version's tags, and a Prefect event
        (`what`), in this order: a state on the tags has its record in the history."""
        if note and what:
            await self._io("mlflow", _note, self.uri, r, f"rollout-{what}", reason, self._actor(), _figures(verdict))
        state = {"rollout.state": r.state, "rollout.step": f"{self.cfg.steps[r.step]:g}",
                 "rollout.previous": r.previous, "rollout.reason": reason[:5000]}
        await self._io("mlflow", _write_tags, self.uri, r.name, r.version, state)
        if what:
            previous = [{"prefect.resource.id": f"prefect-lora.model.{r.name}.{r.previous}",
                         "prefect.resource.role": "previous-version", "prefect-lora.version": r.previous}]
            await self.live.emit([event(EVENT_PREFIX + what, r.name, r.version, {
                "state": r.state, "share": r.share(self.cfg), "step": self.cfg.steps[r.step],
                "previous_version": r.previous, "reason": reason, **_figures(verdict)}, previous)])

    async def _notify(self, r: Rollout, verdict: Verdict) -> None:
        if self.webhook is None:
            return
        from prefect_lora.flows.notifications import post_json

        kind = "rollback" if self.cfg.rollback == "serve" else "rollback-requested"
        done = "rolled back to" if kind == "rollback" else "stopped; a rollback is requested to"
        await asyncio.to_thread(post_json, self.webhook.get(), {
            "event": kind, "model": r.name, "version": r.version, "to_version": r.previous, "reason": r.reason,
            "text": f"prefect-lora: {r.name} version {r.version} {done} version {r.previous}: {r.reason}",
            **_figures(verdict)})

    async def _io(self, sink: str, fn, *args):
        """`fn(*args)` in a thread; None (counted, logged once) when its sink is down."""
        try:
            out = await asyncio.to_thread(fn, *args)
        except Exception as exc:  # noqa: BLE001  (never fail serving for a record)
            self.live.sink_failed(sink, exc)
            return None
        self.live.sink_ok(sink)
        return out

    def _actor(self) -> str:
        from prefect_lora.lora_tasks.registry.aliases import default_actor

        return f"{default_actor()} (staged rollout of serve app {self.app})"


def resolve_webhook() -> Secret | None:
    """Where an automatic rollback is posted: `PREFECT_LORA_WEBHOOK_URL` of the serving process (as
    the flows' notifications read it), or nowhere."""
    import os

    from prefect_lora.flows.notifications import WEBHOOK_ENV

    return Secret(os.environ[WEBHOOK_ENV]) if os.environ.get(WEBHOOK_ENV) else None


def _figures(verdict: Verdict | None) -> dict:
    if verdict is None:
        return {}
    worst = verdict.worst
    return {**({"signal": worst.signal, "figures": worst.figures()} if worst else {}),
            "comparisons": [c.figures() for c in verdict.comparisons]}


# ----------------------------------------------------------------------------- registry I/O (threads)


def _last_move(uri: str, name: str) -> dict | None:
    from prefect_lora.lora_tasks.registry.aliases import last_move

    return last_move(uri, name)


def _tags(uri: str, name: str, version: str) -> dict:
    from prefect_lora.lora_tasks.registry import tracking

    return dict(tracking.client(uri).get_model_version(name, version).tags)


def _write_tags(uri: str, name: str, version: str, tags: dict) -> None:
    from prefect_lora.lora_tasks.registry import tracking

    c = tracking.client(uri)
    for key, value in tags.items():
        c.set_model_version_tag(name, version, key, value)


def _note(uri: str, r: Rollout, action: str, reason: str, actor: str, details: dict) -> None:
    from prefect_lora.lora_tasks.registry.aliases import note

    note(uri, r.name, r.version, action=action, reason=reason, actor=actor, details=details)


def _rollback(uri: str, r: Rollout, actor: str) -> None:
    """`prefect-lora rollback NAME --to PREVIOUS`, only while VERSION is champion, under the lock
    every mover shares; under this machine's lock when that one (a Prefect server) is unreachable:
    a broken version is not left champion for an outage of the lock (the compare-and-set still
    refuses to move a newer promotion)."""
    from prefect_lora.flows.locks import shared_alias_lock
    from prefect_lora.lora_tasks.errors import RegistryError
    from prefect_lora.lora_tasks.registry.aliases import rollback_champion

    move = lambda lock: rollback_champion(uri, r.name, r.previous, r.reason, actor, lock=lock, from_version=r.version,
                                          details=r.details)
    lock = shared_alias_lock()
    try:
        move(lock)
    except RegistryError:  # ChampionChanged, AliasConflict: the registry answered
        raise
    except Exception as exc:
        if lock is None:
            raise
        logger.warning("%s: the shared alias lock is unreachable (%s); rolling back under this machine's lock", r.name,
                       str(exc)[:200])
        move(None)
