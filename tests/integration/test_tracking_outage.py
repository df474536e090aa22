"""A tracking server that goes down mid-training, on a real `mlflow server` (SQLite behind it),
stopped and started again as an operator or a crash would: training goes on and completes with
every checkpoint, and the run's loss curve ends with every step exactly once, whether the server
comes back during training (the logger catches up) or only after it (the flow's first write
replays what the run folder kept)."""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path

import pytest
from prefect_lora.deploy.testing import free_port
from prefect_lora.lora_tasks.registry import tracking
from prefect_lora.lora_tasks.registry.kept_points import PointFile, kept_points_path
from services import Service, healthy, wait_for
from test_fault_tolerance import final_state, optimizer_steps, tiny_raw

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent
STEPS = 30


class Held:
    """The run's step logger, with the loop held at some steps until the test lets it go (a file
    in `gates` appears): the outage then falls where the test wants it, on any machine. `after_outage`
    steps first wait until the logger has met the outage. Picklable: Ray's rank 0 gets it."""

    def __init__(self, inner, gates: Path, hold: dict[int, str], after_outage: tuple[int, ...] = ()):
        self.inner, self.gates, self.hold, self.after_outage = inner, gates, hold, after_outage

    def __call__(self, metrics: dict, step: int) -> None:
        self.inner(metrics, step)
        if step in self.hold:
            if step in self.after_outage:
                self._until(lambda: self.inner.unreachable, "the logger to meet the outage")
            (self.gates / f"at-{step}").touch()
            self._until((self.gates / self.hold[step]).exists, f"the test to let step {step} go")

    @staticmethod
    def _until(event, what: str) -> None:
        deadline = time.monotonic() + 300
        while not event():
            if time.monotonic() > deadline:
                raise AssertionError(f"held training timed out waiting for {what}")
            time.sleep(0.05)

    def flush(self) -> None:
        self.inner.flush()

    def close(self) -> None:
        self.inner.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    work = tmp_path_factory.mktemp("outage-mlflow")
    port = free_port()
    mlflow = Service("mlflow", [str(BIN / "mlflow"), "server", "--backend-store-uri", f"sqlite:///{work}/mlflow.db",
                                "--default-artifact-root", str(work / "art"), "--host", "127.0.0.1", "--port", str(port),
                                "--workers", "1"], dict(os.environ), work, cwd=work)
    mlflow.url = f"http://127.0.0.1:{port}"
    mlflow.start()
    try:
        mlflow.wait_healthy(f"{mlflow.url}/health")
        yield mlflow
    finally:
        mlflow.stop()


def back_up(server) -> None:
    if not healthy(f"{server.url}/health"):
        server.start()
        server.wait_healthy(f"{server.url}/health")


@pytest.fixture
def fast_failing_client(monkeypatch):
    """A down server answers at once (connection refused) instead of after MLflow's 7 retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "20")


def start(tmp_path: Path, server, launcher: str, workers: int):
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    raw = tiny_raw(tmp_path, max_steps=STEPS)
    raw["scaling"].update(launcher=launcher, num_workers=workers)
    raw["tracking"] = {"tracking_uri": server.url, "artifact_location": str(tmp_path / "art")}
    cfg = config_from_dict(raw)
    rows = prepare_data(cfg, tmp_path / "data").train_rows
    run_id = tracking.start_run(cfg, "outage", tags={})
    (tmp_path / "gates").mkdir()
    return cfg, rows, run_id


def in_background(fn) -> list:
    """`fn()` in a thread; its exception, if any, lands in the returned list."""
    errors: list = []

    def run():
        try:
            fn()
        except BaseException as exc:  # noqa: BLE001
            errors.append(exc)

    threading.Thread(target=run, daemon=True).start()
    return errors


def steps_logged(uri: str, run_id: str) -> list[int]:
    return sorted(step for step, _ in tracking.metric_history(uri, run_id)["train_loss"])


def test_training_goes_on_through_an_outage_and_the_curve_catches_up_when_the_server_is_back(
        tmp_path, server, fast_failing_client, capfd):
    from prefect_lora.lora_tasks.training.launcher import latest_checkpoint, train_adapter

    cfg, rows, run_id = start(tmp_path, server, "local", 1)
    gates, run_dir = tmp_path / "gates", tmp_path / "run"
    kept = PointFile(kept_points_path(run_dir, run_id))

    def operator():
        wait_for((gates / "at-10").exists, 300, "training to reach step 10")
        server.stop()
        (gates / "down").touch()
        wait_for((gates / "at-20").exists, 300, "training to reach step 20 with the server down")
        assert kept.unsent_count() > 0, "points the store lacks are kept in the run folder"
        back_up(server)
        (gates / "up").touch()

    errors = in_background(operator)
    try:
        log = Held(tracking.metric_logger(server.url, run_id, run_dir), gates, {10: "down", 20: "up"}, after_outage=(20,))
        result = train_adapter(cfg, rows, run_dir, step_log=log)
    finally:
        back_up(server)
    out = capfd.readouterr().out
    assert not errors, errors
    print(out[-2000:])
    assert out.count("MLflow store unreachable") == 1 and "MLflow store reachable again" in out
    assert "Traceback" not in out
    assert result.metrics["step"] == STEPS and not result.metrics.get("start_step"), "one attempt, never restarted"
    assert latest_checkpoint(run_dir / "train").name == f"checkpoint_step_{STEPS:06d}"
    assert optimizer_steps(final_state(result.checkpoint_path)) == {STEPS}
    assert steps_logged(server.url, run_id) == list(range(1, STEPS + 1)), "every step exactly once"
    assert kept.unsent_count() == 0 and tracking.replay_kept_points(server.url, run_id, run_dir) == 0


@pytest.mark.parametrize("launcher,workers", [("local", 1), ("ray", 2)])
def test_a_server_back_only_after_training_gets_the_kept_curve_once_from_the_run_folder(
        tmp_path, server, fast_failing_client, capfd, launcher, workers):
    import ray
    from prefect_lora.lora_tasks.training.launcher import train_adapter

    if launcher == "ray":
        import ray.cloudpickle

        ray.shutdown()  # a fresh local Ray: its workers inherit the fast-failing client settings
        ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # `Held` travels to rank 0 by value
    cfg, rows, run_id = start(tmp_path, server, launcher, workers)
    gates, run_dir = tmp_path / "gates", tmp_path / "run"

    def operator():
        wait_for((gates / "at-10").exists, 300, "training to reach step 10")
        server.stop()
        (gates / "down").touch()

    errors = in_background(operator)
    try:
        log = Held(tracking.metric_logger(server.url, run_id, run_dir), gates, {10: "down"})
        result = train_adapter(cfg, rows, run_dir, step_log=log)
        assert not errors, errors
        kept = PointFile(kept_points_path(run_dir, run_id))
        assert kept.unsent_count() > 0, "what the store lacked at the end is kept in the run folder"
        back_up(server)
        replayed = tracking.replay_kept_points(server.url, run_id, run_dir)  # what log_results does first
    finally:
        back_up(server)
        if launcher == "ray":
            ray.shutdown()
    out = capfd.readouterr().out
    print(out[-2000:])
    assert result.metrics["step"] == STEPS and not result.metrics.get("start_step"), "one attempt, never restarted"
    assert optimizer_steps(final_state(result.checkpoint_path)) == {STEPS}
    if launcher == "local":  # a Ray worker's lines reach this process's output whenever Ray forwards them
        assert out.count("MLflow store unreachable") == 1 and "still unreachable at the end of training" in out
    assert replayed > 0 and kept.unsent_count() == 0
    assert tracking.replay_kept_points(server.url, run_id, run_dir) == 0, "a second replay logs nothing"
    assert steps_logged(server.url, run_id) == list(range(1, STEPS + 1)), "every step exactly once"
