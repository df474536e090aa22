"""Signal handlers installed for a run end with it: the caller's Ctrl-C and SIGTERM work again."""

from __future__ import annotations

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
