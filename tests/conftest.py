"""Shared fixtures: isolated homes for Prefect, MLflow, Ray and the model cache per test session."""

from __future__ import annotations

import os
import signal
import tempfile
import threading
from pathlib import Path

import pytest

# Set before prefect, ray or transformers are imported by any test module.
# One intra-op thread per process, inherited by the commands and servers the tests start: the
# tests' models are tiny, where a second thread only costs, and on a machine shared with other
# work torch's thread pool waits on a descheduled thread at every operation (a tiny-model forward
# pass took 395 ms with two threads beside a busy neighbour, 9 ms with one). Export another value
# to try the suite with more.
os.environ.setdefault("OMP_NUM_THREADS", "1")
_SESSION_HOME = Path(tempfile.mkdtemp(prefix="pl-test-"))
os.environ["PREFECT_HOME"] = str(_SESSION_HOME / "prefect")
# Export another to keep parallel checkouts apart; each pytest-xdist worker (`make test`: two) has its own.
os.environ["PREFECT_LORA_RAY_TMP"] = os.environ.get("PREFECT_LORA_RAY_TMP", "/tmp/plray-test") + (
    f"-{os.environ['PYTEST_XDIST_WORKER']}" if "PYTEST_XDIST_WORKER" in os.environ else "")
# A cache of this session's own: scores, spreads, forgetting blocks, baselines computed by this
# checkout's code in this session. Sessions of other checkouts run beside it on a shared host,
# and the cache keys name the package version, not the code: one cache shared by all of them
# let a session read another branch's scores (and each session's start wiped the others'). The
# built-in models (versioned folders, built the same way by every checkout) stay shared, under
# PREFECT_LORA_CACHE (default: /tmp/prefect-lora-test-cache/models), so none is rebuilt per session.
# (`.resolve()`: a pytest-xdist worker inherits its controller's session cache, whose models are that link.)
_SHARED_MODELS = (Path(os.environ.get("PREFECT_LORA_CACHE", Path(tempfile.gettempdir()) / "prefect-lora-test-cache")) / "models").resolve()
_SHARED_MODELS.mkdir(parents=True, exist_ok=True)
(_SESSION_HOME / "cache").mkdir()
(_SESSION_HOME / "cache" / "models").symlink_to(_SHARED_MODELS, target_is_directory=True)
os.environ["PREFECT_LORA_CACHE"] = str(_SESSION_HOME / "cache")

import prefect_lora.flows.settings  # noqa: E402,F401  (quiet defaults for the whole session)


_STOPPED_BY_SIGNAL = threading.Event()


def _interrupt(signum, frame):
    _STOPPED_BY_SIGNAL.set()
    raise KeyboardInterrupt(f"signal {signum}")


# A test run stopped with SIGTERM (a CI timeout, a closed terminal) ends as Ctrl-C does: fixtures
# are torn down and atexit runs, so no local Ray cluster or Prefect server outlives it. Ctrl-C
# raises KeyboardInterrupt as Python's own handler does, and is kept (below).
signal.signal(signal.SIGTERM, _interrupt)
signal.signal(signal.SIGINT, _interrupt)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item, nextitem):
    """A stop that a test swallowed still stops the session after that test: a command run in
    process (click turns a KeyboardInterrupt into "Aborted!" and exit 1; ours into exit 130), and
    the test process went on with its next tests for 10 s until pytest-xdist killed it. (A test
    that signals itself on purpose sets its own handler, and forgets what it set at its end.)"""
    from prefect_lora.flows.settings import stop_signal

    result = yield
    if _STOPPED_BY_SIGNAL.is_set() or stop_signal():
        raise KeyboardInterrupt("stopped during a test that caught the stop")
    return result


def pytest_keyboard_interrupt(excinfo):
    """A stopped session tears its fixtures down next, where a server's graceful stop (Serve
    draining its replicas) took ~10 s: the local Ray instance goes first, at once, and those
    teardowns find nothing left to drain."""
    from prefect_lora.flows.settings import shutdown_ray

    shutdown_ray()


def pytest_sessionfinish(session, exitstatus):
    session.config.stash[_STOPPED] = exitstatus == pytest.ExitCode.INTERRUPTED


@pytest.hookimpl(tryfirst=True)
def pytest_unconfigure(config):
    """A stopped session (Ctrl-C, SIGTERM) ends once its fixtures are torn down and its summary is
    printed, as a stopped command does: Ray and Prefect's servers shut down, then exit at once.
    What a test left running (a fleet's member threads) otherwise held the exit for 10-25 s:
    pytest's garbage collection passes, and Prefect's exit flushing events to a server already
    stopped."""
    if config.stash.get(_STOPPED, False):
        from prefect_lora.flows.settings import release_and_exit

        release_and_exit(pytest.ExitCode.INTERRUPTED)


_STOPPED = pytest.StashKey[bool]()

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """The real data sets beside the checkout; tests that need them skip when they are absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real data sets not found at {SHARED_DATA} (they sit beside the checkout in CI)")
    return SHARED_DATA


@pytest.fixture
def changed_tiny(tiny_model_dir):
    """`changed_tiny(seed, std)`: the tiny Llama under a fresh LoRA adapter (r 4, all linear
    layers, drawn after `torch.manual_seed(seed)`) whose B is drawn from N(0, std): a PeftModel
    in eval mode that differs from its base, as a trained adapter does."""

    def make(seed: int = 0, std: float = 0.05):
        import torch
        from prefect_lora.lora_tasks.modeling import apply_lora, load_base_model

        torch.manual_seed(seed)
        model = apply_lora(load_base_model(tiny_model_dir, "causal_lm"), "causal_lm", r=4, alpha=8, dropout=0.0,
                           target_modules="all-linear")
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.data.normal_(0, std)
        return model.eval()

    return make


@pytest.fixture(scope="session")
def tiny_model_dir() -> str:
    """The built-in 2-layer Llama (hidden 64) with a byte tokenizer, materialised once."""
    from prefect_lora.lora_tasks.modeling import TINY_LLAMA, resolve_base_model

    return resolve_base_model(TINY_LLAMA)
