"""Signal handlers installed for a run end with it: the caller's Ctrl-C and SIGTERM work again."""

from __future__ import annotations

import shutil
import signal
from pathlib import Path

import pytest


def _handlers() -> dict:
    return {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}


@pytest.fixture
def own_handlers():
    """Handlers of this test's own, so that "put back" is told apart from "left at the default"."""
    before = _handlers()
    mine = {sig: (lambda signum, frame: None) for sig in before}
    for sig, handler in mine.items():
        signal.signal(sig, handler)
    yield mine
    for sig, handler in before.items():
        signal.signal(sig, handler)


def test_a_command_stops_cleanly_on_signals_only_while_it_runs(own_handlers, monkeypatch):
    from prefect_lora.flows import settings
    from prefect_lora.flows.settings import stop_cleanly_on_signals

    monkeypatch.setattr(settings, "_STOP_SIGNAL", None)  # the signal raised here is forgotten after the test
    with stop_cleanly_on_signals():
        assert all(signal.getsignal(sig) is not handler for sig, handler in own_handlers.items())
        with pytest.raises(SystemExit) as stopped:
            signal.raise_signal(signal.SIGTERM)
        assert stopped.value.code == 128 + signal.SIGTERM
    assert _handlers() == own_handlers


def test_what_ray_installs_while_the_driver_waits_on_it_ends_with_the_wait(own_handlers, monkeypatch):
    """In the block SIGTERM and SIGINT stop the driver (a KeyboardInterrupt, which Ray's waits pass
    on); what Ray installs meanwhile (ray.init: SIGTERM; Tune: SIGINT, SIGUSR1) ends with it."""
    from prefect_lora.lora_tasks.training import distributed
    from prefect_lora.lora_tasks.training.distributed import interruptible

    monkeypatch.setattr(distributed, "STOPPED_BY", None)
    with interruptible():
        for sig in (signal.SIGTERM, signal.SIGINT):
            with pytest.raises(KeyboardInterrupt):
                signal.raise_signal(sig)
            assert distributed.STOPPED_BY == sig
        signal.signal(signal.SIGINT, lambda signum, frame: None)  # as Tune's fit does
        signal.signal(signal.SIGTERM, signal.SIG_DFL)  # as ray.init does
    assert _handlers() == own_handlers


@pytest.mark.parametrize("address, cleaner", [(None, False), ("ray://10.0.0.1:10001", True)])
def test_a_local_run_starts_no_placement_group_cleaner(address, cleaner, tmp_path):
    """Ray Train's placement-group cleaner asks the state API, which a local Ray here does not
    serve: a local run goes without it (its stop timed out on a busy host and printed a traceback
    after a run that succeeded); a run on a cluster keeps it."""
    import yaml
    from prefect_lora.lora_tasks.config import config_from_dict
    from prefect_lora.lora_tasks.training.distributed import _trainer

    raw = yaml.safe_load((Path(__file__).resolve().parents[2] / "configs" / "tiny.yaml").read_text())
    raw["scaling"]["address"] = address
    trainer = _trainer(config_from_dict(raw), [], str(tmp_path), None, 0, None, None)
    names = [type(c).__name__ for c in trainer._create_default_callbacks()]
    assert ("PlacementGroupCleanerCallback" in names) == cleaner, names
    assert "BackendSetupCallback" in names, "the other callbacks stay"


def test_a_ctrl_c_in_the_fleet_stops_it_without_waiting_for_its_members(monkeypatch):
    """A Ctrl-C reaches the fleet's waiting thread while members train in threads of their own:
    it raises at once, starts no further member, leaves the running ones to end with the process
    (daemon threads) and is kept as a stop, so a member whose training then fails (its Ray
    instance shut down by the stop) is not retried. Before, the interpreter's exit waited for
    the members: they trained again on a fresh Ray and logged into a Prefect server already
    gone; the test process was still there 150 s after the Ctrl-C. Nor does a member start a new
    Ray instance after the stop (one did, and the interpreter's exit met it half started)."""
    import logging
    import os
    import threading

    from prefect.states import Failed
    from prefect_lora.flows import fleet as fleet_flow
    from prefect_lora.flows import settings
    from prefect_lora.flows.retrain import _worth_retrying
    from prefect_lora.lora_tasks.errors import TrainingError
    from prefect_lora.lora_tasks.fleet import Fleet, Member
    from prefect_lora.lora_tasks.training import distributed

    monkeypatch.setattr(settings, "_STOP_SIGNAL", None)
    monkeypatch.setattr(distributed, "STOPPED_BY", None)  # both are forgotten after the test
    monkeypatch.setattr(fleet_flow, "get_run_logger", lambda: logging.getLogger("test-fleet"))
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # a terminal's Ctrl-C, as Python handles it
    lost_ray = Failed(data=TrainingError("training failed on Ray: the Ray instance is gone"))
    assert _worth_retrying(None, None, lost_ray), "a lost Ray instance is worth a retry while nothing stopped us"
    training, release, started = threading.Event(), threading.Event(), []

    def member(name):  # stands for `retrain.with_options(...)`: "a" trains on, "b" sees the Ctrl-C
        def run(*args, **kwargs):
            started.append(name)
            if name == "a":
                training.set()
                release.wait(60)
            else:
                assert training.wait(30)
                os.kill(os.getpid(), signal.SIGINT)  # to the process, as a terminal sends it: the waiting main thread takes it
                release.wait(60)

        return run

    monkeypatch.setattr(fleet_flow, "retrain", type("R", (), {"with_options": staticmethod(lambda flow_run_name: member(flow_run_name))}))
    fleet = Fleet(path="fleet.yaml", config="shared.yaml", members=[Member(n, []) for n in "abc"], concurrency=2)
    try:
        with pytest.raises(KeyboardInterrupt):
            fleet_flow._run_members(fleet, force=False)
        members = [t for t in threading.enumerate() if t.name.startswith("member-")]
        assert members and all(t.daemon and t.is_alive() for t in members), "the running members do not hold the exit"
        assert settings.stop_signal() == signal.SIGINT
        assert not _worth_retrying(None, None, lost_ray), "nothing is retried once the process is stopping"
        with pytest.raises(TrainingError, match="no new Ray instance"):
            distributed.ensure_ray(None)
    finally:
        signal.signal(signal.SIGINT, previous)
        release.set()
    for t in members:
        t.join(30)
    assert sorted(started) == ["a", "b"], "no member starts after the stop"


_SWALLOWS_A_CTRL_C = '''
import os, signal

import click
from click.testing import CliRunner


@click.command()
def command():
    os.kill(os.getpid(), signal.SIGINT)  # a terminal's Ctrl-C while a command runs in the test process


def test_a_command_in_process():
    assert CliRunner().invoke(command).exit_code == 1  # click: "Aborted!", the KeyboardInterrupt swallowed


def test_the_next_one(tmp_path_factory):
    (tmp_path_factory.getbasetemp().parent / "the-next-test-ran").touch()
'''


def test_a_ctrl_c_that_a_test_swallowed_still_stops_the_session(tmp_path):
    import subprocess
    import sys

    shutil.copy(Path(__file__).parents[1] / "conftest.py", tmp_path / "conftest.py")  # the suite's hooks
    (tmp_path / "test_swallowed.py").write_text(_SWALLOWS_A_CTRL_C)
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--basetemp", str(tmp_path / "t"),
                           "test_swallowed.py"], cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert done.returncode == pytest.ExitCode.INTERRUPTED, done.stdout[-3000:] + done.stderr[-3000:]
    assert not (tmp_path / "the-next-test-ran").exists(), "the session went on after the Ctrl-C"
