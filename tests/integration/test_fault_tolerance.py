"""Failures that clusters have, on a real local Ray: a training worker SIGKILLed mid-run, and the
driver (the whole `prefect-lora run` process) killed mid-training and run again."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from prefect_lora.lora_tasks.registry.tracking import run_figures
from prefect_lora.lora_tasks.training.loop import read_trainer_state

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
STEPS = 80


def tiny_raw(workdir: Path, **training) -> dict:
    raw = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    raw["data"]["train_path"] = str(REPO / "configs" / "data" / "tiny_sums.jsonl")
    raw["evaluation"]["reference"]["path"] = str(REPO / "configs" / "data" / "reference_general.txt")
    raw["lora"]["dropout"] = 0.1  # dropout draws random numbers: resume must restore every rank's RNG
    raw["training"].update({"max_steps": STEPS, "checkpoint_every": 5, **training})
    raw["scaling"]["storage_path"] = str(workdir / "runs")
    raw["tracking"] = {"tracking_uri": f"sqlite:///{workdir}/mlflow.db", "artifact_location": str(workdir / "art")}
    return raw


def checkpoints(train_dir: Path) -> list[Path]:
    return sorted(train_dir.glob("checkpoint_*/trainer_state.pt"))


def registered_metrics(train_dir: Path) -> dict | None:
    """The metrics of the latest checkpoint Ray Train has registered (its snapshot in the storage
    path), which is what a restart resumes from. A checkpoint folder on disk is not enough: the
    controller registers a report on its next poll of all workers, and a worker killed before
    that poll takes its report with it."""
    import json

    try:
        snapshot = json.loads((train_dir / "checkpoint_manager_snapshot.json").read_text())
        latest = snapshot["latest_checkpoint_result"]
        return dict(latest["metrics"]) if latest else None
    except (OSError, ValueError, KeyError, TypeError):  # not written yet, or caught mid-write
        return None


def registered_step(train_dir: Path) -> int | None:
    metrics = registered_metrics(train_dir)
    return int(metrics["step"]) if metrics else None


def registered_worker_pids(train_dir: Path) -> list[int]:
    """The pids of the workers that reported the registered checkpoint (each report carries them)."""
    return [int(p) for p in registered_metrics(train_dir)["worker_pids"].split(",")]


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def final_state(checkpoint_path: str) -> dict:
    return read_trainer_state(Path(checkpoint_path) / "trainer_state.pt")


def optimizer_steps(state: dict) -> set[int]:
    """AdamW's own step counter of every trained tensor: how many updates really happened."""
    return {int(s["step"]) for s in state["optimizer"]["state"].values()}


@pytest.fixture(scope="module")
def ray_local():
    import ray

    ray.shutdown()
    yield
    ray.shutdown()


def test_sigkill_of_a_worker_resumes_exactly_from_the_latest_checkpoint(tmp_path, ray_local):
    """Ray Train restarts the worker group from the latest checkpoint: the run completes with
    exactly `steps` optimizer updates, and loss and weights equal an uninterrupted run's."""
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.training.distributed import train_adapter
    from prefect_lora.lora_tasks.training.launcher import prepare_data
    from safetensors.torch import load_file

    class HoldUntil:
        """Rank 0's step log, holding the loop at `step` until the file `gate` exists (the test makes
        it once a worker is killed): the kill lands mid-run however fast or loaded the machine is.
        The restarted workers pass the step at once. Defined here, not at module level: cloudpickle
        sends it to Ray's rank 0 by value (workers cannot import test modules)."""

        def __init__(self, step: int, gate: Path):
            self.step, self.gate = step, gate

        def __call__(self, metrics: dict, step: int) -> None:
            deadline = time.monotonic() + 900
            while step == self.step and not self.gate.exists():
                assert time.monotonic() < deadline, f"step {step} held for 900 s: the worker was never killed"
                time.sleep(0.05)

        def flush(self) -> None:
            pass

    steps, held_at = 20, 12  # checkpoints every 5 steps: the one of step 10 is the latest when a worker dies
    cfg = config_from_dict(tiny_raw(tmp_path, max_steps=steps))
    rows = prepare_data(cfg, tmp_path / "data").train_rows
    straight = train_adapter(cfg, rows, tmp_path / "straight", max_failures=0)

    killed: list[tuple[int, int]] = []
    gate = tmp_path / "killed"

    def kill_a_worker_at_the_held_step():
        # Bounds for a machine shared with other jobs: the event, not the time, ends the wait.
        train_dir = tmp_path / "killed" / "train"
        wait_for(lambda: (registered_step(train_dir) or 0) >= 10, 900, "the checkpoint of step 10 registered by Ray")
        step = registered_step(train_dir)  # the held loop writes the next one at step 15
        pid = registered_worker_pids(train_dir)[-1]  # this run's, not another Ray's on the host
        os.kill(pid, signal.SIGKILL)
        killed.append((pid, step))
        gate.touch()

    killer = threading.Thread(target=kill_a_worker_at_the_held_step, daemon=True)
    killer.start()
    resumed = train_adapter(cfg, rows, tmp_path / "killed", max_failures=1, step_log=HoldUntil(held_at, gate))
    killer.join(timeout=60)

    assert killed, "no worker was killed"
    pid, step_at_kill = killed[0]
    m, s = resumed.metrics, straight.metrics
    print(f"\nkilled worker pid {pid} after Ray registered the checkpoint of step {step_at_kill}; resumed from step "
          f"{m['start_step']}; final step {m['step']}, loss {m['train_loss']:.6f} vs uninterrupted {s['train_loss']:.6f}")
    assert m["start_step"] == step_at_kill == 10, "the restarted workers did not resume from the latest checkpoint"
    assert m["step"] == steps == s["step"]
    state = final_state(resumed.checkpoint_path)
    assert state["step"] == steps
    assert optimizer_steps(state) == {steps}, "some optimizer step was lost or counted twice"
    assert m["train_loss"] == pytest.approx(s["train_loss"], rel=1e-4, abs=1e-5)
    a = load_file(str(Path(resumed.adapter_dir) / "adapter_model.safetensors"))
    b = load_file(str(Path(straight.adapter_dir) / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)


def saved_step(train_dir: Path, launcher: str) -> int | None:
    """The step a new attempt would continue from: Ray's registered checkpoint, or the newest
    complete checkpoint of the in-process launcher."""
    from prefect_lora.lora_tasks.training.launcher import latest_checkpoint

    if launcher == "ray":
        return registered_step(train_dir)
    latest = latest_checkpoint(train_dir) if train_dir.is_dir() else None
    return int(latest.name.rsplit("_", 1)[1]) if latest else None


# Each launcher meets a hard kill and a clean stop; SIGTERM and SIGINT take the same path (one
# handler), so each launcher gets one of them: a third stopped attempt took ~40 s more.
@pytest.mark.parametrize("launcher, stops", [("ray", [signal.SIGKILL, signal.SIGINT]), ("local", [signal.SIGKILL, signal.SIGTERM])],
                         ids=["ray-sigkill-sigint", "local-sigkill-sigterm"])
def test_stopped_driver_rerun_continues_training_from_the_latest_checkpoint(tmp_path, launcher, stops):
    """`prefect-lora run` stopped mid-training by each signal of `stops` in turn, each attempt
    after a checkpoint later than the one before; the same command again finds the run folder by
    config and data, continues from the latest checkpoint and completes the same MLflow run.

    SIGKILL goes to the driver alone (`kill -9` of its pid, the OOM killer: not its process group):
    the processes it started, Prefect's temporary server and the local Ray's, end by themselves,
    and its Ray workers write no checkpoint once it is gone (beyond one being written at that
    instant). SIGTERM to the driver alone (a scheduler stopping it) and SIGINT to its whole process
    group (Ctrl-C in a terminal: it reached Prefect's temporary server too, and the run then hung
    on recording its crash there) are clean stops: it exits by itself (143, 130), leaves no
    process behind and marks the MLflow run KILLED.
    The Ray case's re-run runs beside another local Ray instance (`ray start --head`, another
    user's job), which is none of its business: no traceback (Ray Train's placement-group cleaner
    went looking for it and printed "Found multiple active Ray instances")."""
    from mlflow import MlflowClient

    raw = tiny_raw(tmp_path, max_steps=60)
    if launcher == "local":  # one worker: `scaling.launcher: auto` trains it in the flow's process
        raw["scaling"]["num_workers"] = 1
    cfg_path = tmp_path / "tiny.yaml"
    cfg_path.write_text(yaml.safe_dump(raw))
    ray_tmp = tempfile.mkdtemp(prefix="pldk-", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "PREFECT_HOME": str(tmp_path / "prefect"), "PREFECT_LORA_RAY_TMP": ray_tmp}
    cli = [str(Path(sys.executable).with_name("prefect-lora")), "run", str(cfg_path)]
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    c = MlflowClient(uri, registry_uri=uri)
    train_dirs = lambda: sorted((tmp_path / "runs").glob("tiny-sums/run-*/train"))
    steps_before = 0
    for attempt, sig in enumerate(stops, 1):
        log = tmp_path / f"attempt-{attempt}.log"
        stopped = subprocess.Popen(cli, env=env, cwd=tmp_path, start_new_session=True, stdout=open(log, "w"),
                                   stderr=subprocess.STDOUT)
        try:
            wait_for(lambda after=steps_before: train_dirs() and (saved_step(train_dirs()[0], launcher) or 0) > after, 900,
                     f"a checkpoint of attempt {attempt} past step {steps_before}")
            if sig == signal.SIGKILL:
                _kill_driver_alone(stopped, train_dirs()[0])
            else:  # Ctrl-C in a terminal reaches the whole foreground group; a scheduler's SIGTERM the driver
                os.killpg(stopped.pid, sig) if sig == signal.SIGINT else stopped.send_signal(sig)
                assert stopped.wait(timeout=120) == 128 + sig, log.read_text()[-3000:]  # a clean stop takes seconds
                assert f"stopped by {sig.name}" in log.read_text() and "the same command resumes" in log.read_text()
                wait_for(lambda: not _leftovers(ray_tmp), 120, "the stopped run's processes to end by themselves")
        finally:
            with contextlib.suppress(ProcessLookupError):  # SIGKILL to the whole group (gone already after a clean stop)
                os.killpg(stopped.pid, signal.SIGKILL)
            stopped.wait()
            _kill_leftovers(ray_tmp)
        if sig != signal.SIGKILL:
            runs = c.search_runs([c.get_experiment_by_name(raw["model_name"]).experiment_id])
            assert [r.info.status for r in runs] == ["KILLED"], "one MLflow run, marked killed by the clean stop"
        saved = saved_step(train_dirs()[0], launcher)  # what the stopped attempt left for the next one
        assert steps_before < saved < 60
        steps_before = saved
    run_dir = train_dirs()[0].parent

    with _another_ray_instance() if launcher == "ray" else contextlib.nullcontext():
        second = subprocess.run(cli, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=1800)
        _kill_leftovers(ray_tmp)
    out = second.stdout + second.stderr
    assert second.returncode == 0, out[-6000:]
    assert "Traceback" not in out and "Found multiple active Ray instances" not in out, out[-5000:]

    runs = c.search_runs([c.get_experiment_by_name(raw["model_name"]).experiment_id],  # not the alias-audit one
                         filter_string="tags.`lora.run_key` != ''")
    assert len(runs) == 1, "the re-run must continue the stopped attempts' MLflow run, not start another"
    metrics = run_figures(uri, runs[0].info.run_id)
    print(f"\n[{launcher}] stopped by {[signal.Signals(s).name for s in stops]}, the last with the checkpoint of step "
          f"{steps_before} saved; re-run resumed from step {metrics['train_start_step']:.0f}, ended at "
          f"{metrics['train_step']:.0f}; MLflow run {runs[0].info.run_id} {runs[0].info.status}")
    assert runs[0].info.status == "FINISHED"
    assert metrics["train_start_step"] == steps_before, "the re-run must continue from the latest saved checkpoint"
    assert f"resuming from the checkpoint of step {steps_before}/60" in out
    assert metrics["train_step"] == 60
    state = final_state(str(checkpoints(run_dir / "train")[-1].parent))
    assert optimizer_steps(state) == {60}
    logged = {m.step for m in c.get_metric_history(runs[0].info.run_id, "train/loss")}
    assert logged == set(range(1, 61)), "every step's loss is in the run's history, from every attempt"


def _kill_leftovers(ray_tmp: str) -> None:
    """Kill every process of the driver's Ray instance and wait until they are gone.

    Ray's daemons and workers run in sessions of their own, and a worker can live on for a
    moment after its raylet: they are found by the PREFECT_LORA_RAY_TMP value they inherited."""
    alive = lambda: _leftovers(ray_tmp)
    deadline = time.monotonic() + 60
    while (pids := alive()) and time.monotonic() < deadline:
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not alive(), f"processes of the Ray instance in {ray_tmp} survived SIGKILL"


def _leftovers(ray_tmp: str) -> list[int]:
    """Processes started under the run with this PREFECT_LORA_RAY_TMP (the driver's children:
    Ray's daemons and workers, Prefect's temporary server), found by the value they inherited."""
    marker = f"PREFECT_LORA_RAY_TMP={ray_tmp}".encode()
    pids = []
    for environ in Path("/proc").glob("[0-9]*/environ"):
        try:
            if marker in environ.read_bytes().split(b"\0") and int(environ.parent.name) != os.getpid():
                pids.append(int(environ.parent.name))
        except OSError:  # gone already, or not ours to read
            pass
    return pids


def test_checkpoints_go_to_a_storage_uri_and_reports_stay_local(tmp_path, ray_local, monkeypatch):
    """A URI storage path (here file://, read through pyarrow like s3:// or gs://): checkpoints
    land under it, the run's local folder keeps the final adapter."""
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.data.prepare import run_dir_for
    from prefect_lora.lora_tasks.training.distributed import train_adapter
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    monkeypatch.chdir(tmp_path)
    raw = tiny_raw(tmp_path, max_steps=6)
    raw["scaling"]["storage_path"] = f"file://{tmp_path}/bucket/prefix"
    cfg = config_from_dict(raw)
    run_dir = run_dir_for(cfg)
    assert run_dir.is_relative_to(tmp_path / ".prefect-lora" / "runs")
    handlers = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    result = train_adapter(cfg, prepare_data(cfg, run_dir).train_rows, run_dir, max_failures=0)
    # Ray Train's fit installs a SIGINT handler, ray.init one for SIGTERM: neither outlives the run.
    assert {sig: signal.getsignal(sig) for sig in handlers} == handlers
    remote = tmp_path / "bucket" / "prefix" / "tiny-sums" / run_dir.name / "train"
    assert checkpoints(remote), f"no checkpoint under {remote}"
    assert (Path(result.adapter_dir) / "adapter_model.safetensors").is_file()
    assert Path(result.adapter_dir).is_relative_to(run_dir)


def _descendants(pid: int) -> list:
    import psutil

    return psutil.Process(pid).children(recursive=True)


def _running(process) -> bool:
    """Still running: a zombie (ended, not yet reaped by whoever adopted it) has ended."""
    import psutil

    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _command_line(process) -> str:
    import psutil

    try:
        return " ".join(process.cmdline())
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return ""


def _kill_driver_alone(driver: subprocess.Popen, train_dir: Path) -> None:
    """SIGKILL to the driver's pid alone, then wait until every process it started has ended by
    itself (Ray's node agents, which end a minute after their raylet, are not waited for) and check
    that no checkpoint was written after it died, beyond one being written at that instant."""
    started = _descendants(driver.pid)
    servers = [p for p in started if "prefect.server.api.server:create_app" in _command_line(p)]
    assert servers, f"no temporary Prefect server among the run's processes: {[_command_line(p) for p in started]}"
    watched = [p for p in started if not any(f"ray::{a}" in _command_line(p) for a in ("DashboardAgent", "RuntimeEnvAgent"))]
    driver.kill()
    driver.wait()
    written = set(train_dir.glob("checkpoint_*"))
    wait_for(lambda: not [p for p in watched if _running(p)], 300, "the processes the killed run started to end")
    late = set(train_dir.glob("checkpoint_*")) - written
    assert len(late) <= 1, f"checkpoints written after the driver died: {sorted(p.name for p in late)}"


@contextlib.contextmanager
def _another_ray_instance():
    """Another user's local Ray instance on the host, for the length of the block."""
    import socket

    other_tmp = tempfile.mkdtemp(prefix="plot-", dir="/tmp")
    with socket.socket() as s:  # a free port for its GCS (6379 may be taken on a shared host)
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    try:
        subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}",
                        f"--temp-dir={other_tmp}", "--num-cpus=1", "--include-dashboard=false", "--disable-usage-stats"],
                       env={**os.environ, "PREFECT_LORA_RAY_TMP": other_tmp},  # how `_kill_leftovers` finds its processes
                       check=True, capture_output=True, timeout=600)
        yield
    finally:
        _kill_leftovers(other_tmp)


@pytest.mark.parametrize("during", [False, True], ids=["after-training", "during-training"])
def test_ctrl_c_stops_a_test_session_that_trains_in_its_own_process(tmp_path, during):
    """Ctrl-C stops a pytest session that trains in its own process, during a training run or
    after one (exit code 2, "Interrupted"). Ray Train's `fit` sets a SIGINT handler of its own
    and keeps it: it swallowed Ctrl-C after the run, and during it turned it into a failed test
    (the session went on)."""
    raw = tiny_raw(tmp_path, max_steps=2000 if during else 6)
    waiting, train_dir = tmp_path / "waiting", tmp_path / "run" / "train"
    (tmp_path / "test_session.py").write_text(f"""
import threading
from pathlib import Path


def test_train():
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.training.distributed import train_adapter
    from prefect_lora.lora_tasks.training.launcher import prepare_data

    cfg = config_from_dict({raw!r})
    train_adapter(cfg, prepare_data(cfg, {str(tmp_path / "data")!r}).train_rows, {str(tmp_path / "run")!r}, max_failures=0)


def test_wait_for_ctrl_c():
    Path({str(waiting)!r}).touch()
    threading.Event().wait(1800)
""")
    ray_tmp = tempfile.mkdtemp(prefix="pldk-", dir="/tmp")
    env = {**os.environ, "PREFECT_LORA_RAY_TMP": ray_tmp, "PREFECT_HOME": str(tmp_path / "prefect")}
    log = tmp_path / "session.log"
    session = subprocess.Popen([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path / "test_session.py")],
                               cwd=tmp_path, env=env, start_new_session=True, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    ready = (lambda: registered_step(train_dir)) if during else waiting.exists
    try:
        wait_for(lambda: ready() or session.poll() is not None, 900, "the session to train" + ("" if during else " and wait"))
        assert session.poll() is None, log.read_text()[-3000:]
        session.send_signal(signal.SIGINT)
        code = session.wait(timeout=120)
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(session.pid, signal.SIGKILL)
        session.wait()
        _kill_leftovers(ray_tmp)
    out = log.read_text()
    assert code == 2 and "KeyboardInterrupt" in out, out[-3000:]
    assert ("no tests ran" in out) if during else ("1 passed" in out), out[-3000:]  # stopped in the test it was in
