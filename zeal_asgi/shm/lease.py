"""A host-wide lease in shared memory: one 64-bit word holding (deadline, holder pid).

The word lives in an INT(8) column of a shared table row and changes only by compare-and-set,
so taking, renewing and releasing are each one atomic step, and a worker killed at any point
leaves either its whole word or none.  A lease is free when the row holds 0, when its deadline
has passed, or when its holder is dead; a live holder keeps it until its deadline.  Deadlines
are ``CLOCK_MONOTONIC`` milliseconds: one clock for every process of the host.
"""

from __future__ import annotations

import os
import time
from typing import TYPE_CHECKING

from zeal_asgi.shm.process import process_alive

if TYPE_CHECKING:
    from zeal_asgi.shm.ext import Table

__all__ = ["Lease", "pack", "unpack"]

TAG_BITS = 22  # Linux pids are < 2**22 (the pid_max limit)
_TAG_MASK = (1 << TAG_BITS) - 1


def pack(deadline_ms: int, tag: int) -> int:
    """One positive int64 holding a deadline (ms) and a 22-bit tag (a pid, or random)."""
    return (max(deadline_ms, 1) << TAG_BITS) | (tag & _TAG_MASK)


def unpack(word: int) -> tuple[int, int]:
    """``(deadline_ms, tag)`` of a packed word."""
    return word >> TAG_BITS, word & _TAG_MASK


def _now_ms() -> int:
    return int(time.monotonic() * 1000)


class Lease:
    """Leases named by the row keys of ``table``, each in its INT(8) ``column``.

    ``acquire`` returns a token (the word written) that ``renew`` and ``release`` compare
    against, so a holder can only renew or release what it still holds.
    """

    def __init__(self, table: Table, seconds: float, column: str = "owner") -> None:
        self.table = table
        self.column = column
        self.ms = max(1, int(seconds * 1000))

    def _cas(self, key: str | bytes, expected: int, new: int) -> bool:
        return bool(self.table.compare_and_set(key, self.column, expected, new))

    @staticmethod
    def stale(word: int, now_ms: int | None = None) -> bool:
        """True when ``word`` holds no lease: empty, past its deadline, or its holder dead."""
        deadline, pid = unpack(word)
        now = _now_ms() if now_ms is None else now_ms
        return not word or deadline < now or not process_alive(pid)

    def holder(self, key: str | bytes) -> int | None:
        """Pid of the process holding ``key``, or ``None`` when nobody does."""
        word = self.table.get(key, self.column) or 0
        return None if self.stale(word) else unpack(word)[1]

    def acquire(self, key: str | bytes) -> int | None:
        """Take ``key`` if it is free; the token, or ``None`` when a live holder has it (this
        process included: a lease is not re-entrant)."""
        token = pack(_now_ms() + self.ms, os.getpid())
        if self._cas(key, 0, token):
            return token
        current = self.table.get(key, self.column) or 0
        if self.stale(current) and self._cas(key, current, token):
            return token
        return None

    def renew(self, key: str | bytes, token: int) -> int | None:
        """Move the deadline forward; the new token, or ``None`` if the lease was lost.  A forked
        child does not renew its parent's lease."""
        if unpack(token)[1] != os.getpid() & _TAG_MASK:
            return None
        new = pack(_now_ms() + self.ms, os.getpid())
        return new if self._cas(key, token, new) else None

    def release(self, key: str | bytes, token: int, *, delete: bool = False) -> bool:
        """Give the lease up if ``token`` still holds it (``delete``: remove the row too).  A
        forked child does not release its parent's lease."""
        if unpack(token)[1] != os.getpid() & _TAG_MASK:
            return False
        if delete:
            return bool(self.table.delete_if(key, self.column, token))
        return self._cas(key, token, 0)
