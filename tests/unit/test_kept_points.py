"""The training curve through a tracking store outage: `MetricLogger` keeps every point in the run
folder, never raises into the loop, tries again with backoff, and sends each point once. A fake
store (a list, or a callable that fails while it is "down") stands in for MLflow: pure logic."""

from __future__ import annotations

import pickle
import threading

import pytest
from prefect_lora.lora_tasks.registry.kept_points import BATCH, PointFile, PointMemory, kept_points_path
from prefect_lora.lora_tasks.registry.tracking import MetricLogger


class FakeStore:
    """Takes batches of points while up; raises while down (as MLflow does in an outage)."""

    def __init__(self):
        self.up, self.batches, self.calls = True, [], 0

    def __call__(self, points):
        self.calls += 1
        if not self.up:
            raise ConnectionError("API request to http://user:secret@mlflow:5000/api/2.0/mlflow/runs/log-batch failed")
        self.batches.append(list(points))

    def steps(self, key="train/loss"):
        return [m.step for batch in self.batches for m in batch if m.key == key]


def logger(tmp_path, store, **kw) -> MetricLogger:
    kw = {"every_s": 0, "background": False, "backoff_s": (0,), **kw}
    return MetricLogger("sqlite:///unused.db", "run1", keep_dir=tmp_path, send=store, **kw)


def train(log, steps):
    for step in steps:
        log({"train_loss": 1.0 / step, "learning_rate": 0.1}, step)


def test_an_outage_never_reaches_the_loop_and_the_curve_catches_up_once_when_the_store_is_back(tmp_path, capsys):
    store = FakeStore()
    log = logger(tmp_path, store)
    train(log, range(1, 4))
    store.up = False
    train(log, range(4, 9))  # every flush fails: nothing raises
    log.flush()
    out = capsys.readouterr().out
    assert out.count("MLflow store unreachable") == 1, "one line for the whole outage"
    assert str(kept_points_path(tmp_path, "run1")) in out and "store unreachable (http://mlflow:5000: " in out
    assert "secret" not in out
    store.up = True
    train(log, range(9, 11))
    assert store.steps() == list(range(1, 11)), "every step once, in order, the kept ones first"
    assert "MLflow store reachable again" in capsys.readouterr().out
    log.close()
    assert store.steps() == list(range(1, 11)) and PointFile(kept_points_path(tmp_path, "run1")).unsent_count() == 0


def test_while_backing_off_the_store_is_not_tried_and_the_points_wait_in_the_file(tmp_path):
    store = FakeStore()
    store.up = False
    log = logger(tmp_path, store, backoff_s=(3600,))
    train(log, range(1, 6))
    assert store.calls == 1, "the first failure starts the backoff: no write is tried during it"
    assert PointFile(kept_points_path(tmp_path, "run1")).unsent_count() == 10
    store.up = True
    log.close()  # the last flush tries whatever the backoff
    assert store.steps() == [1, 2, 3, 4, 5]


def test_a_store_still_down_at_the_end_leaves_the_points_for_one_replay(tmp_path, capsys):
    store = FakeStore()
    store.up = False
    log = logger(tmp_path, store)
    train(log, range(1, 7))
    log.close()  # does not raise
    assert "still unreachable at the end of training: 12 point(s)" in capsys.readouterr().out
    later = FakeStore()
    kept = PointFile(kept_points_path(tmp_path, "run1"))
    assert kept.send_unsent(later) == 12 and later.steps() == list(range(1, 7))
    assert kept.send_unsent(later) == 0 and len(later.batches) == 1, "a second replay sends nothing: exactly once"


def test_a_store_failing_mid_replay_is_resumed_where_it_stopped(tmp_path):
    kept = PointFile(kept_points_path(tmp_path, "run1"))
    log = logger(tmp_path, None, backoff_s=(3600,))
    log.send = FakeStore()
    log.send.up = False
    train(log, range(1, BATCH + 301))  # 2 points a step: three batches
    flaky, seen = FakeStore(), []

    def fails_on_the_second_batch(points):
        seen.append(len(points))
        if len(seen) == 2:
            raise TimeoutError("store gone again")
        flaky(points)

    with pytest.raises(TimeoutError):
        kept.send_unsent(fails_on_the_second_batch)
    kept.send_unsent(flaky)
    assert flaky.steps() == list(range(1, BATCH + 301)), "the first batch is not sent twice, the rest not lost"


def test_a_new_process_with_the_same_run_folder_sends_what_the_dead_one_kept_first(tmp_path):
    store = FakeStore()
    store.up = False
    dead = logger(tmp_path, store)
    train(dead, range(1, 5))  # the process dies here: no close
    store.up = True
    again = pickle.loads(pickle.dumps(logger(tmp_path, None)))  # as Ray's restarted rank 0 gets it
    again.send = store
    train(again, range(3, 7))  # resumed from the checkpoint of step 2
    again.close()
    assert store.steps() == [1, 2, 3, 4, 3, 4, 5, 6]


def test_the_file_holds_the_points_as_logged_with_their_time_stamps(tmp_path):
    store = FakeStore()
    log = logger(tmp_path, store)
    train(log, [1])
    (first,) = [m for m in store.batches[0] if m.key == "train/loss"]
    replayed = FakeStore()
    PointFile(kept_points_path(tmp_path, "run1")).marker.unlink()  # as if never sent
    PointFile(kept_points_path(tmp_path, "run1")).send_unsent(replayed)
    (again,) = [m for m in replayed.batches[0] if m.key == "train/loss"]
    assert (again.key, again.value, again.timestamp, again.step) == (first.key, first.value, first.timestamp, first.step)


def test_a_run_folder_that_cannot_be_written_keeps_the_points_in_bounded_memory(tmp_path, capsys):
    (tmp_path / "metrics").write_text("a file where the folder should be")
    store = FakeStore()
    store.up = False
    log = logger(tmp_path, store)
    train(log, range(1, 4))
    assert "keeping it in memory" in capsys.readouterr().out
    store.up = True
    log.close()
    assert store.steps() == [1, 2, 3]
    memory = PointMemory(limit=3)
    memory.append(store.batches[0][:5])
    assert memory.unsent_count() == 3 and memory.dropped == 2, "the oldest make room"


def test_a_cut_short_last_line_waits_and_a_corrupt_one_is_skipped(tmp_path):
    kept = PointFile(kept_points_path(tmp_path, "run1"))
    kept.path.parent.mkdir(parents=True)
    kept.path.write_text('["train/loss", 0.5, 1, 1]\nnot json\n["train/loss", 0.4, 2, 2]\n["train/loss", 0.3, 3')
    store = FakeStore()
    assert kept.send_unsent(store) == 2 and store.steps() == [1, 2]
    with open(kept.path, "a") as f:
        f.write(', 3]\n')  # the writer finishes the line
    assert kept.send_unsent(store) == 1 and store.steps() == [1, 2, 3]


def test_in_the_background_the_loop_never_waits_on_the_store(tmp_path):
    release, waited_on = threading.Event(), []
    store = FakeStore()

    def slow(points):  # a store that hangs until the loop has moved on
        if not release.wait(timeout=60):
            waited_on.append("the loop waited on the store")
        store(points)

    log = MetricLogger("sqlite:///unused.db", "run1", every_s=0, keep_dir=tmp_path, send=slow)
    train(log, range(1, 4))
    log.flush()  # returns while the store still hangs on the first write
    release.set()
    log.close()
    assert not waited_on and store.steps() == [1, 2, 3]
    log.send = None  # MLflow's client, as in a run: a logger whose thread ran still travels to Ray by pickle
    assert pickle.loads(pickle.dumps(log)).keep_path == kept_points_path(tmp_path, "run1")
