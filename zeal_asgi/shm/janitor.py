"""Unlinks a server's shared-memory segments when its owner exits.

Started once per server by the first process that creates a segment, with a pidfd of the
server's owner (the single-process server, the launcher's master, or the supervisor of the
workers); it waits for that process to exit, then unlinks every segment of the server that no
process holds any more.  Usage: ``python -S janitor.py PIDFD PREFIX DIR`` (standard library only).
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import sys
import time


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
    """Entry point: daemonise, wait for the owner, unlink the server's segments."""
    pidfd, prefix, directory = int(argv[0]), argv[1], argv[2]
    if os.fork():
        os._exit(0)  # the caller waits for this first process only: no zombie is left behind
    select.select([pidfd], [], [])  # a pidfd becomes readable when its process exits
    while _unlink_unused(directory, prefix):
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
