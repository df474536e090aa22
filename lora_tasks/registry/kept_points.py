"""The training curve's points on their way to the tracking store, kept where a store outage or a
dead process cannot lose them: a JSONL file in the run folder (`PointFile`), written before each
write to the store, with a marker saying how far the store has them; or, where no file can be
written, a bounded buffer in memory (`PointMemory`). Sending what is unsent is exactly-once: one
sender at a time (a file lock), the marker moved after each batch the store took. No MLflow here:
the sender is any callable that takes a list of points and raises when the store did not."""

from __future__ import annotations

import collections
import fcntl
import json
import os
import threading
from itertools import islice
from pathlib import Path

from mlflow.entities import Metric

BATCH = 1000
"""Points per write: what MLflow's `log_batch` takes at most."""

KEPT_DIR = "metrics"
"""Under the run folder: `<run id>.jsonl` (every point of that MLflow run's curve logged from
there), `<run id>.sent` (the byte offset up to which the store has them)."""


def kept_points_path(run_dir: str | Path, run_id: str) -> Path:
    """The file that keeps run `run_id`'s curve in run folder `run_dir`."""
    return Path(run_dir) / KEPT_DIR / f"{run_id}.jsonl"


class PointFile:
    """Points appended to a JSONL file (`[key, value, timestamp, step]` a line) and a marker file
    with the byte offset up to which the store has them. Appends come from one writer; `send_unsent`
    from any thread or process, one at a time (`flock`)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.marker = self.path.with_suffix(".sent")
        self.lock = self.path.with_suffix(".lock")

    def append(self, points: list[Metric]) -> None:
        """Add `points` at the end of the file (raises OSError where it cannot be written)."""
        if not points:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lines = "".join(json.dumps([m.key, m.value, m.timestamp, m.step]) + "\n" for m in points)
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(lines)

    def sent_offset(self) -> int:
        try:
            return int(self.marker.read_text().strip() or 0)
        except (OSError, ValueError):
            return 0

    def unsent_count(self) -> int:
        """How many points the store does not have yet (complete lines after the marker)."""
        try:
            with open(self.path, "rb") as f:
                f.seek(self.sent_offset())
                return sum(1 for line in f if line.endswith(b"\n"))
        except OSError:
            return 0

    def send_unsent(self, send) -> int:
        """`send(points)` for every complete line after the marker, in batches of `BATCH`, moving
        the marker after each; what `send` raises comes out (the marker stays where the store got
        to). Returns the points sent."""
        if not self.path.exists():
            return 0
        total = 0
        with open(self.lock, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # one sender: a point goes to the store once
            offset = self.sent_offset()
            with open(self.path, "rb") as f:
                f.seek(offset)
                while True:
                    lines = list(islice(f, BATCH))
                    complete = [line for line in lines if line.endswith(b"\n")]  # a line still being written waits
                    if not complete:
                        return total
                    points = [p for p in map(_point, complete) if p is not None]
                    if points:
                        send(points)
                    offset += sum(len(line) for line in complete)
                    _write_marker(self.marker, offset)
                    total += len(points)
                    if len(complete) < BATCH:
                        return total


def _point(line: bytes) -> Metric | None:
    """The point of one line; None for a line a crash cut short (nothing to send)."""
    try:
        key, value, timestamp, step = json.loads(line)
        return Metric(str(key), float(value), int(timestamp), int(step))
    except (ValueError, TypeError):
        return None


def _write_marker(marker: Path, offset: int) -> None:
    tmp = marker.with_suffix(f".sent.{os.getpid()}.{threading.get_ident()}")
    tmp.write_text(str(offset))
    os.replace(tmp, marker)  # whole or not at all


class PointMemory:
    """The fallback where the run folder cannot be written: unsent points in memory, the newest
    `limit` of them (`dropped` counts the oldest that made room)."""

    def __init__(self, limit: int = 100_000):
        self.limit, self.dropped = limit, 0
        self._points: collections.deque[Metric] = collections.deque()
        self._lock = threading.Lock()

    def append(self, points: list[Metric]) -> None:
        with self._lock:
            self._points.extend(points)
            while len(self._points) > self.limit:
                self._points.popleft()
                self.dropped += 1

    def unsent_count(self) -> int:
        return len(self._points)

    def send_unsent(self, send) -> int:
        total = 0
        while True:
            with self._lock:
                chunk = list(islice(self._points, BATCH))
            if not chunk:
                return total
            send(chunk)
            sent = {id(m) for m in chunk}
            with self._lock:  # only the oldest are ever dropped: what is left of `chunk` is at the front
                while self._points and id(self._points[0]) in sent:
                    self._points.popleft()
            total += len(chunk)
