"""Unlinks a server's shared-memory segments when its supervisor exits.

Started once per server by the first process that creates a segment; it waits for the server's
owner (the single-process server, the launcher's master, or the supervisor of the workers) to
exit, then unlinks every segment of the server that no process holds any more.
Usage: ``python -S _janitor.py PID START PREFIX DIR`` (standard library only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import sys
import time


def _start_time(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    return int(raw[raw.rindex(")") + 2 :].split()[19])


def _wait_for_exit(pid: int, start: int | None) -> None:
    try:
        pidfd = os.pidfd_open(pid)
    except OSError:
        return  # already gone
    try:
        # pid reuse: make sure the process behind the pidfd is the one we were told about
        if start is not None and _start_time(pid) != start:
            return
        poller = select.poll()
        poller.register(pidfd, select.POLLIN)
        while not poller.poll(60_000):
            pass
    finally:
        os.close(pidfd)


def _unlink_unused(directory: str, prefix: str) -> int:
    """Unlink every segment of the server that no process holds any more; the number left."""
    left = 0
    for name in os.listdir(directory):
        if not name.startswith(prefix):
            continue
        path = os.path.join(directory, name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            continue
        try:
            # Workers hold a shared lock while they use a segment: an orphaned worker that
            # outlives its supervisor keeps its memory; we wait for it.
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            left += 1
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        finally:
            os.close(fd)
    return left


def main(argv: list[str]) -> int:
    """Entry point: daemonise, wait for the supervisor, unlink the server's segments."""
    pid, start_raw, prefix, directory = argv
    start = None if start_raw == "None" else int(start_raw)
    if os.fork():
        os._exit(0)  # the caller waits for this first process only: no zombie is left behind
    _wait_for_exit(int(pid), start)
    while _unlink_unused(directory, prefix):
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
