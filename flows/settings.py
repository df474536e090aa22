"""Quiet, non-interactive defaults, applied before prefect, ray or transformers are imported.

Every value is only a default: a variable already set in the environment wins."""

from __future__ import annotations

import contextlib
import functools
import os

DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    # Prefect's temporary server and Serve's HTTP proxy start slowly on a busy host (two CPU hogs
    # beside a test run: 60 s of migrations were not enough, and Serve killed a proxy after 5 s):
    # a command waits for them rather than fail. Read by a Ray instance started after this.
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120",
    "RAY_SERVE_PROXY_READY_CHECK_TIMEOUT_S": "60",
    "DO_NOT_TRACK": "1",
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5",
    "TOKENIZERS_PARALLELISM": "false",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "MLFLOW_ENABLE_ASYNC_LOGGING": "false",
    "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
    "GIT_PYTHON_REFRESH": "quiet",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_DATASETS_DISABLE_PROGRESS_BARS": "1",
    # lora_tasks' progress lines (a remedy's trials) appear in the flow's log and the Prefect UI.
    "PREFECT_LOGGING_EXTRA_LOGGERS": "prefect_lora.lora_tasks",
    # Library deprecation chatter (also in Ray workers, which inherit this environment).
    "PYTHONWARNINGS": "ignore::FutureWarning,ignore::DeprecationWarning",
}

for key, value in DEFAULTS.items():
    os.environ.setdefault(key, value)

import sys

if not (sys.stderr.isatty() and sys.stdout.isatty()):  # scheduled runs under a worker: log lines, no progress bars
    os.environ.setdefault("TQDM_DISABLE", "1")

import logging
import warnings

logging.getLogger("prefect_lora.lora_tasks").setLevel(logging.INFO)  # its progress lines (INFO) reach the flow's log
logging.getLogger("mlflow.system_metrics").setLevel(logging.WARNING)  # no start/stop chatter around each run

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", category=DeprecationWarning)


_STOP_SIGNAL: int | None = None


@contextlib.contextmanager
def stop_cleanly_on_signals():
    """In the block, SIGTERM ends this process as Ctrl-C does: by an exception, so `finally`
    blocks run and the command can release what it started (`release_and_exit`). Without it,
    Python's default handler kills the process where it stands (Prefect re-sends the signal to
    that handler after marking the flow run crashed): the temporary Prefect server and the local
    Ray cluster are left running, the MLflow run stays RUNNING. Which signal stopped the process
    is kept (`stop_signal`). After the block, SIGTERM and SIGINT go to the handlers from before."""
    import signal

    def stop(signum, frame):
        global _STOP_SIGNAL
        _STOP_SIGNAL = signum
        raise KeyboardInterrupt if signum == signal.SIGINT else SystemExit(128 + signum)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            if handler is not None:  # None: set outside Python, cannot be put back from here
                signal.signal(sig, handler)


def note_interrupted() -> None:
    """Keep that this process is stopping, once a stop reached a thread waiting on others (the
    fleet's, on its members): a Ctrl-C no handler of ours saw (KeyboardInterrupt: SIGINT), or a
    signal `stop_cleanly_on_signals` kept already. The members still running then retry nothing
    and start no Ray instance."""
    import signal

    global _STOP_SIGNAL
    _STOP_SIGNAL = _STOP_SIGNAL or signal.SIGINT
    distributed = sys.modules.get("prefect_lora.lora_tasks.training.distributed")
    if distributed is not None and distributed.STOPPED_BY is None:
        distributed.STOPPED_BY = _STOP_SIGNAL  # and no member starts a new Ray instance after it


def stop_signal() -> int | None:
    """The signal that stopped this command, if one did (here, or while it waited on Ray)."""
    return _STOP_SIGNAL or getattr(sys.modules.get("prefect_lora.lora_tasks.training.distributed"), "STOPPED_BY", None)


def shutdown_ray() -> None:
    """Shut down the Ray instance this process uses, if any; a local one's processes, its agents
    included, have ended when it returns where Ray can wait for them (2.60+: before, its dashboard
    and runtime-env agents outlived a stopped command by up to a minute)."""
    if "ray" not in sys.modules:
        return
    import inspect

    import ray

    if ray.is_initialized():
        ray.shutdown(**({"wait_for_processes": True} if "wait_for_processes" in inspect.signature(ray.shutdown).parameters else {}))


def release_and_exit(code: int) -> None:
    """End a stopped command: shut down the local Ray instance this process started (its workers
    with it) and Prefect's temporary server, then exit at once with `code`. Exiting at once
    matters: Ray's native threads can abort an interpreter that tears down around them."""
    shutdown_ray()
    if "prefect.server.api.server" in sys.modules:
        from prefect.server.api.server import SubprocessASGIServer

        for server in list(SubprocessASGIServer._instances.values()):
            server.stop()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def hide_expected_tracebacks() -> None:
    """Log expected errors (LoraTaskError: bad config, bad data...) as one line, not a traceback.

    Prefect logs every failed task and flow with its traceback; for errors that are the user's
    to fix, the message already says what and where, so the stack only hides it."""
    import logging

    from prefect_lora.lora_tasks.errors import LoraTaskError

    def expected(exc: BaseException | None) -> bool:
        while exc is not None:
            if isinstance(exc, LoraTaskError):
                return True
            exc = exc.__cause__ or exc.__context__
        return False

    class _Filter(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.exc_info and expected(record.exc_info[1]):
                record.exc_info, record.exc_text = None, None
            return True

    for name in ("prefect", "prefect.flow_runs", "prefect.task_runs", ""):
        for handler in logging.getLogger(name).handlers:
            handler.addFilter(_Filter())


def create_prefect_database_early():
    """Without a Prefect server (no PREFECT_API_URL set), create Prefect's local database and run
    its migrations in a thread now, beside other work: otherwise the first flow run's temporary
    server does it (a fresh machine's first run started its flow after 11 s, later runs after 6 s).
    Return a function that waits for it. No server is started, so nothing is left to stop."""
    import threading

    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return lambda: None

    def create() -> None:
        import asyncio

        from prefect.server.database import provide_database_interface

        try:
            asyncio.run(provide_database_interface().create_db())
        except Exception:  # noqa: BLE001  (the first run's server creates it then, and says why if it cannot)
            pass

    thread = threading.Thread(target=create, name="prefect-db-create", daemon=True)
    thread.start()
    return thread.join


def start_prefect_api_early():
    """Start Prefect's ephemeral API server (what runs when no PREFECT_API_URL is set) in a
    thread now, so its 3-8 s boot overlaps the ~4 s of importing torch, transformers, MLflow and
    the flows; return a function that waits for it. Call it after `import prefect`, before the
    flows are imported. With a Prefect server configured, it does nothing."""
    import threading

    server = bind_prefect_server()
    if server is None:
        return lambda: None

    def boot() -> None:
        try:
            server.start()
        except Exception:  # noqa: BLE001  (the flow's own client tries again, and says why if it fails)
            pass

    thread = threading.Thread(target=boot, name="prefect-api-boot", daemon=True)
    thread.start()
    return thread.join


def bind_prefect_server():
    """Without a Prefect server (no PREFECT_API_URL set), make the temporary server Prefect's
    client starts in this process one that ends with this process, however it ends, and return it
    (not started yet); with a server configured, None. Prefect stops its temporary server at
    exit, but a process killed by SIGKILL (or the OOM killer) runs no exit code: its server, ~200
    MB, was left serving nobody until someone found and killed it. Call it before any flow runs."""
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value():
        return None
    return _bound_server_class()()  # the client asks for the same instance: one per port, None here


class _OwnSession:
    """Stands in for the `subprocess` module inside Prefect's server module: the same module,
    with `Popen` starting a session of its own."""

    def __init__(self, module):
        self._module = module

    def __getattr__(self, name):
        return getattr(self._module, name)

    def Popen(self, *args, **kwargs):  # the name it stands in for
        return self._module.Popen(*args, start_new_session=True, **kwargs)


def servers_out_of_the_terminal_group() -> None:
    """Prefect's temporary servers started in this process from now on run in sessions of their
    own. Prefect starts them in this process's group, where the terminal's Ctrl-C reaches them
    too: the server died at once, and the interrupted flow run then waited on its client's
    retries to record the crash on it (a fleet with two members running was still there 120 s
    after Ctrl-C). Out of the group the server takes the last states and logs, and is stopped as
    usual: by this process at its end, or by its guard (`ParentBoundServer`) when this process
    is killed."""
    from prefect.server.api import server

    if not isinstance(server.subprocess, _OwnSession):
        server.subprocess = _OwnSession(server.subprocess)


@functools.cache
def _bound_server_class():
    import threading

    from prefect.server.api.server import SubprocessASGIServer  # the client imports it anyway in this mode

    servers_out_of_the_terminal_group()

    class ParentBoundServer(SubprocessASGIServer):
        """Prefect's temporary server, with a guard process (`server_guard`) that stops it when
        the process that started it is gone."""

        guard: _Guard | None = None
        guard_lock = threading.Lock()  # the early boot thread and a flow's client may start it together

        def start(self, timeout: int | None = None) -> None:
            super().start(timeout)
            with self.guard_lock:
                if self.guard is None and self.server_process is not None:
                    self.guard = _Guard.start(self.server_process.pid)

        def stop(self) -> None:
            super().stop()
            with self.guard_lock:
                if self.guard is not None:
                    self.guard.close()
                    self.guard = None

    return ParentBoundServer


class _Guard:
    """A `server_guard` process watching a server: it holds the read end of a pipe whose write end
    only this process holds (not inherited by any child: Python's descriptors are close-on-exec),
    so the kernel closes it when this process ends, and a pidfd of the server."""

    def __init__(self, process, write_end: int) -> None:
        self.process, self.write_end = process, write_end

    @classmethod
    def start(cls, pid: int) -> _Guard | None:
        import subprocess

        from prefect_lora.flows import server_guard

        try:
            pidfd = os.pidfd_open(pid)
        except (AttributeError, OSError):  # not Linux >= 5.3: Prefect's own stop at exit only
            return None
        read_end, write_end = os.pipe()
        try:
            process = subprocess.Popen([sys.executable, "-I", "-S", server_guard.__file__, str(read_end), str(pidfd)],
                                       pass_fds=(read_end, pidfd), stdin=subprocess.DEVNULL)
        except OSError:
            os.close(write_end)
            return None
        finally:
            os.close(read_end)
            os.close(pidfd)
        return cls(process, write_end)

    def close(self) -> None:
        """After the server stopped: the guard sees it and exits; reap it."""
        import subprocess

        os.close(self.write_end)
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
