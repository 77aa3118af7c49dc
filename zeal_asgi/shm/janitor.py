"""Unlinks a server's shared-memory segments when its owner exits.

Started once per server by the first process that creates a segment, with a pidfd of the
server's owner (the single-process server, the launcher's master, or the supervisor of the
workers); it waits for that process to exit, then unlinks every segment of the server that no
process holds any more.  Usage: ``python -S janitor.py PIDFD PREFIX DIR`` (standard library only).
"""

from __future__ import annotations

import fcntl
import os
import select
import sys
import time


def unlink_if_unused(path: str) -> bool:
    """Unlink the segment at ``path`` if it is ours and no process holds it (workers keep a
    shared lock on every segment they use); True when it is gone."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        if os.fstat(fd).st_uid != os.geteuid():
            return False
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.unlink(path)
        return True
    except OSError:
        return False  # held (an orphaned worker may outlive its supervisor: we wait for it)
    finally:
        os.close(fd)


def main(argv: list[str]) -> int:
    """Entry point: daemonise, wait for the owner, unlink the server's segments."""
    pidfd, prefix, directory = int(argv[0]), argv[1], argv[2]
    if os.fork():
        os._exit(0)  # the caller waits for this first process only: no zombie is left behind
    select.select([pidfd], [], [])  # a pidfd becomes readable when its process exits
    mine = [os.path.join(directory, n) for n in os.listdir(directory) if n.startswith(prefix)]
    while mine := [path for path in mine if not unlink_if_unused(path)]:
        time.sleep(0.2)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
