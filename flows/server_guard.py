"""Ends Prefect's temporary server when the process that started it is gone, however it went.

Run as a script (`python -I -S server_guard.py PIPE PIDFD [GRACE_S]`, by `settings.bind_prefect_server`),
it imports nothing of the project: it waits on two file descriptors it inherited, the read end of
a pipe whose only write end the starting process holds, and a pidfd of the server.

- The server ends first (stopped at exit, or by `release_and_exit`): the guard exits.
- The pipe reads end-of-file first: the starting process died without stopping its server
  (SIGKILL, the OOM killer, a crash in native code), as the kernel closed its write end. The guard
  sends the server SIGTERM, as Prefect's own `stop()` does, and SIGKILL after a grace period.

A pidfd names the process itself, not a number the system may hand out again: a server that
ended long before is never mistaken for a newer process with its pid."""

from __future__ import annotations

import select
import signal
import sys

GRACE_S = 10.0


def guard(pipe: int, pidfd: int, grace_s: float = GRACE_S) -> None:
    ready, _, _ = select.select([pipe, pidfd], [], [])
    if pidfd in ready:  # the server ended: nothing to do
        return
    try:
        signal.pidfd_send_signal(pidfd, signal.SIGTERM)
        if not select.select([pidfd], [], [], grace_s)[0]:
            signal.pidfd_send_signal(pidfd, signal.SIGKILL)
    except ProcessLookupError:  # ended meanwhile
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C reaches the whole terminal group: the server stops by it
    guard(int(sys.argv[1]), int(sys.argv[2]), *map(float, sys.argv[3:4]))
