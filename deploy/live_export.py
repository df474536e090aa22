"""The gateway's live signals: the store it counts requests into (`live_signals`), each
version's answer contract read from the registry, and the summaries it writes every
`signals_interval_s` to MLflow and, when a Prefect API is configured, to Prefect as events.

Where a summary goes, and why there:
- MLflow: metrics `live/...` on the version's own run (the run that trained and registered it),
  one point per interval: the run page charts them over time and the compare view sets two
  versions' charts side by side; the tag `live.signals` on the model version holds the latest
  summary as one line, which the version page shows among its tags (the page shows no metrics).
- Prefect: one event `prefect-lora.model.live-signals` per version and interval, resource
  `prefect-lora.model.NAME.VERSION`, the figures as its payload: an automation can trigger on it.

A sink that is down never fails serving: each failed write is counted
(`prefect_lora_signals_export_failures_total{sink}` on `/metrics`) and logged once per outage,
and once more when the sink is back."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from types import SimpleNamespace

from prefect_lora.deploy.live_signals import (
    AnswerContract,
    SignalStore,
    answered,
    exposition,
    failed,
    figures,
    summary_line,
)

logger = logging.getLogger("ray.serve")
EVENT = "prefect-lora.model.live-signals"
"""The event each summary emits per served version (resource `prefect-lora.model.NAME.VERSION`)."""
SUMMARY_TAG = "live.signals"
"""The model-version tag holding the latest summary line."""
PROMETHEUS_TEXT = "text/plain; version=0.0.4; charset=utf-8"
MAX_UNSENT = 1000
"""Events kept for a later send while Prefect cannot be reached (the oldest dropped past it)."""
"""The media type of Prometheus' text exposition format (`/metrics`)."""


def resource_id(name: str, version: str) -> str:
    return f"prefect-lora.model.{name}.{version}"


def event(name: str, model: str, version: str, payload: dict, related: list[dict] | None = None) -> dict:
    """A Prefect event about one served version (its resource `prefect-lora.model.NAME.VERSION`),
    its id and time set now: sent again later, it is the same event (Prefect keeps one per id)."""
    return {"id": str(uuid.uuid4()), "occurred": datetime.now(timezone.utc).isoformat(),
            "event": name, "payload": payload, "related": related or [], "resource": {
        "prefect.resource.id": resource_id(model, version), "prefect.resource.name": f"{model}/{version}",
        "prefect-lora.model": model, "prefect-lora.version": version}}


class LiveSignals:
    """What the gateway counts and where it writes it: `answered`/`failed` per request,
    `metrics_text` for `/metrics`, `run` for the summaries at an interval."""

    def __init__(self, tracking_uri: str, window_s: float, interval_s: float | None, clock=time.monotonic):
        self.tracking_uri, self.interval_s = tracking_uri, interval_s
        self.store = SignalStore(window_s, clock=clock)
        self.contracts: dict[str, AnswerContract] = {}
        self.failures: Counter = Counter()
        """Failed writes (reads, for `contract`) per sink."""
        self._down: set[str] = set()
        self._reading: set[str] = set()
        self._tasks: set[asyncio.Task] = set()  # background reads, held until done
        self._started = (self.store.mark(), clock())
        self._marks: dict[str, tuple[dict, float]] = {}  # sink -> counts and time of its last written summary
        self._runs: dict[str, str] = {}  # NAME/VERSION -> its run
        self._unsent: list[dict] = []  # events `emit` could not send: they go first with its next send

    # -- counting

    @contextlib.contextmanager
    def request(self):
        """Count the request handled within: set `.key` once it names a version, `.result` (and
        `.prompts`, the user's text of each answer) once answered. An exception is its status (a
        500 without one); a cancelled request (the client went away) is not counted."""
        seen, started = SimpleNamespace(key=None, result=None, prompts=None), self.store.clock()
        try:
            yield seen
        except Exception as exc:
            self.failed(seen.key, getattr(exc, "status", 500), self.store.clock() - started)
            raise
        self.answered(seen.key, self.store.clock() - started, seen.result, seen.prompts)

    def answered(self, key: str, latency_s: float, result: dict, prompts: list[str] | None = None) -> None:
        """Count an answered request (`prompts`: the user's text of each answer, where known); a
        version whose contract is not read yet is counted without JSON checks while it is read
        in the background."""
        if key not in self.contracts:
            self._read_soon(key)
        self.store.add(key, answered(result, latency_s, self.contracts.get(key, AnswerContract()), prompts))

    def failed(self, key: str | None, status: int, latency_s: float) -> None:
        self.store.add(key, failed(status, latency_s), status)

    def metrics_text(self) -> str:
        return exposition(self.store, dict(self.failures))

    # -- answer contracts

    async def prepare(self, key: str) -> None:
        """Read the version's answer contract now (a swap calls it before traffic reaches it)."""
        if key in self.contracts or key in self._reading:
            return
        self._reading.add(key)
        try:
            from prefect_lora.deploy.serve_core import split_key
            from prefect_lora.lora_tasks.registry import registry

            settings = await asyncio.to_thread(registry.version_settings, self.tracking_uri, *split_key(key))
            self.contracts[key] = AnswerContract.from_settings(settings)
            self.sink_ok("contract")
        except Exception as exc:  # noqa: BLE001  (counted without checks until a later read works)
            self.sink_failed("contract", exc)
        finally:
            self._reading.discard(key)

    def _read_soon(self, key: str) -> None:
        if key not in self._reading:
            task = asyncio.get_running_loop().create_task(self.prepare(key))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    # -- summaries

    async def run(self) -> None:
        """Summarise every `interval_s` until cancelled."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.summarise()
            except Exception:  # (a fault of ours: the next summary tries again)
                logger.exception("live signals: the summary failed")

    async def summarise(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per sink, each version's figures since the sink's last written summary (versions with
        no request left out): a failed write's requests go into the next one, none is lost.
        Returns what was written, by sink."""
        sinks = {"mlflow": lambda s, seconds: asyncio.to_thread(self._to_mlflow, s, seconds)}
        if prefect_api_configured():
            sinks["prefect"] = self._to_prefect
        written = {}
        for sink, write in sinks.items():
            (mark, at), now = self._marks.get(sink, self._started), self.store.clock()
            summaries, new_mark = {key: figures(t) for key, t in self.store.since(mark).items()}, self.store.mark()
            if not summaries or await self.send(sink, write(summaries, now - at)):
                self._marks[sink] = (new_mark, now)
                written[sink] = summaries
        if self._unsent:
            await self.emit([])
        return written

    async def send(self, sink: str, write) -> bool:
        """Await `write` (a write to `sink`): True when it worked; a failure is counted and logged
        once per outage, never raised."""
        try:
            await write
        except Exception as exc:  # noqa: BLE001  (never fail serving for a summary)
            self.sink_failed(sink, exc)
            return False
        self.sink_ok(sink)
        return True

    def _to_mlflow(self, summaries: dict[str, dict[str, float]], seconds: float) -> None:
        from mlflow.entities import Metric
        from mlflow.exceptions import MlflowException
        from prefect_lora.deploy.serve_core import split_key
        from prefect_lora.lora_tasks.registry import tracking

        c = tracking.client(self.tracking_uri)
        now_ms, at = int(time.time() * 1000), time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
        for key, f in summaries.items():
            name, version = split_key(key)
            try:
                if key not in self._runs:
                    self._runs[key] = c.get_model_version(name, version).run_id
                if self._runs[key]:  # step: the wall-clock second, so restarts keep one increasing axis
                    c.log_batch(self._runs[key], metrics=[Metric(f"live/{k}", float(v), now_ms, now_ms // 1000)
                                                          for k, v in f.items()])
                c.set_model_version_tag(name, version, SUMMARY_TAG, f"{summary_line(f, seconds)} (at {at})")
            except MlflowException as exc:  # a version deleted since it answered: nowhere to write, the others go on
                if exc.error_code != "RESOURCE_DOES_NOT_EXIST":
                    raise

    async def _to_prefect(self, summaries: dict[str, dict[str, float]], seconds: float) -> None:
        from prefect_lora.deploy.serve_core import split_key

        await self._emit([event(EVENT, *split_key(key), {"window_s": round(seconds, 3), **f})
                          for key, f in summaries.items()])

    async def emit(self, events: list[dict]) -> bool:
        """Send events (`event(...)`) to Prefect when a Prefect API is configured: True when sent.
        Those that could not be sent (the newest `MAX_UNSENT`) are sent again, first, by the next
        `emit` or summary: an outage delays a rollout's events, it does not lose them."""
        if not prefect_api_configured():
            return False
        pending, self._unsent = [*self._unsent, *events], []
        if await self.send("prefect", self._emit(pending)):
            return True
        self._unsent = [*pending, *self._unsent][-MAX_UNSENT:]
        return False

    async def _emit(self, events: list[dict]) -> None:
        from prefect.events import Event
        from prefect.events.clients import get_events_client

        # The client, not `emit_event`: its background worker would hide a failed send from us
        # (and log every one), where a summary counts it and says so once; the client's own
        # warning of a refused connection is silenced while the outage is known.
        logging.getLogger("prefect.events.clients").disabled = "prefect" in self._down
        async with get_events_client(reconnection_attempts=0) as client:
            for e in events:
                await client.emit(Event(**e))

    def sink_failed(self, sink: str, exc: BaseException) -> None:
        self.failures[sink] += 1
        if sink not in self._down:
            self._down.add(sink)
            from prefect_lora.lora_tasks.registry.tracking import unreachable_server

            logger.warning("live signals: %s failed (%s); serving goes on, failures are counted on /metrics "
                           "(prefect_lora_signals_export_failures_total)", _WHAT[sink],
                           unreachable_server(exc) or f"{exc.__class__.__name__}: {str(exc)[:200]}")

    def sink_ok(self, sink: str) -> None:
        if sink in self._down:
            self._down.discard(sink)
            logger.info("live signals: %s works again", _WHAT[sink])


_WHAT = {"mlflow": "writing the summary (or a rollout's state) to MLflow",
         "prefect": "sending the summary (or a rollout's step) to Prefect as events",
         "contract": "reading a version's answer contract from the registry"}


def prefect_api_configured() -> bool:
    """Whether this process has a Prefect API to send events to (never Prefect's temporary server)."""
    try:
        from prefect.settings import PREFECT_API_URL
    except ImportError:
        return False
    return bool(PREFECT_API_URL.value())


