"""The guard of Prefect's temporary server (`flows/server_guard.py`) on real processes: a `sleep`
stands in for the server, a pipe's write end held here for the process that started it."""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(not hasattr(os, "pidfd_open"), reason="pidfds are Linux's (>= 5.3)")


def start_guarded(command: list[str], *grace_s: str):
    from prefect_lora.flows import server_guard

    server = subprocess.Popen(command)
    read_end, write_end = os.pipe()
    pidfd = os.pidfd_open(server.pid)
    guard = subprocess.Popen([sys.executable, "-I", "-S", server_guard.__file__, str(read_end), str(pidfd), *grace_s],
                             pass_fds=(read_end, pidfd))
    os.close(read_end)
    os.close(pidfd)
    return server, guard, write_end


def test_the_server_is_stopped_when_the_process_that_started_it_is_gone():
    server, guard, write_end = start_guarded(["sleep", "600"])
    try:
        os.close(write_end)  # what the kernel does for a process that dies, however it dies
        assert server.wait(timeout=60) == -signal.SIGTERM
        assert guard.wait(timeout=60) == 0
    finally:
        server.kill()
        guard.kill()


def test_the_guard_leaves_when_the_server_ends_first():
    server, guard, write_end = start_guarded(["sleep", "600"])
    try:
        server.terminate()  # Prefect's own stop, at exit
        server.wait(timeout=60)
        assert guard.wait(timeout=60) == 0
    finally:
        os.close(write_end)
        server.kill()
        guard.kill()


def test_a_server_deaf_to_sigterm_is_killed():
    import time

    import psutil

    server, guard, write_end = start_guarded(["sh", "-c", "trap '' TERM; exec sleep 600"], "0.5")
    try:
        while psutil.Process(server.pid).name() != "sleep":  # SIGTERM ignored from here on
            time.sleep(0.01)
        os.close(write_end)
        assert server.wait(timeout=120) == -signal.SIGKILL
        assert guard.wait(timeout=60) == 0
    finally:
        server.kill()
        guard.kill()
