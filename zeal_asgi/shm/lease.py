"""A host-wide lease in shared memory: one 64-bit word holding (deadline, holder pid).

The word lives in an INT(8) column of a shared table row.  Taking a lease is one compiled call
(``LeaseColumns.take``: the checks and the writes under the row's lock), giving it back another
(``LeaseColumns.give``), and renewing is a compare-and-set, so a worker killed at any point
leaves either its whole word or none.  A lease is free when the row holds 0, when its deadline
has passed, or when its holder is dead; a live holder keeps it until its deadline.  Deadlines
are ``CLOCK_MONOTONIC`` milliseconds: one clock for every process of the host.

The holder is this process's pid, read once and again in a forked child (a child never holds,
renews or releases its parent's lease).
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

from zeal_asgi.shm import _shmtable
from zeal_asgi.shm.process import current_pid, process_alive

if TYPE_CHECKING:
    from zeal_asgi.shm.ext import Table

TAG_BITS = 22  # Linux pids are < 2**22 (the pid_max limit)
_TAG_MASK = (1 << TAG_BITS) - 1
BUSY_OWNER: int = _shmtable.LEASE_BUSY_OWNER
"""``Lease.take``'s first item when a holder has the lease."""
BUSY_TURN: int = _shmtable.LEASE_BUSY_TURN
"""``Lease.take``'s first item when another process waits for its turn to take it."""
LeaseColumns = _shmtable.LeaseColumns
"""A table's lease columns found once: ``take`` and ``give``, the hot path of host locks."""


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
    against, so a holder can only renew or release what it still holds.  With ``fence`` (an
    INT(8) column), each acquisition adds one to it in the same step: a fencing token, which a
    new row starts at the wall clock in µs so that it keeps rising in a table made again.  With
    ``turn`` (an INT(8) column), a process that finds the lease held queues for it for
    ``turn_seconds``, and no other process takes it meanwhile (:meth:`take`).
    """

    def __init__(
        self,
        table: Table,
        seconds: float,
        column: str = "owner",
        *,
        fence: str | None = None,
        turn: str | None = None,
        turn_seconds: float = 0.0,
    ) -> None:
        self.table = table
        self.column = column
        self.ms = max(1, int(seconds * 1000))
        turn_ms = max(1, int(turn_seconds * 1000)) if turn else 0
        self._columns = LeaseColumns(table, column, fence, turn, turn_ms)

    @staticmethod
    def stale(word: int) -> bool:
        """True when ``word`` holds no lease: empty, past its deadline, or its holder dead."""
        deadline, holder = unpack(word)
        return not word or deadline < _now_ms() or not process_alive(holder)

    def holder(self, key: str | bytes) -> int | None:
        """Pid of the process holding ``key``, or ``None`` when nobody does."""
        word = self.table.get(key, self.column) or 0
        return None if self.stale(word) else unpack(word)[1]

    def take(self, key: str | bytes) -> tuple[int, int]:
        """One attempt: ``(fence, token)`` when taken (``fence`` 0 without a fence column), else
        ``(BUSY_OWNER, holder's word)`` or ``(BUSY_TURN, waiting process's turn)``.  A holder
        found dead gives the lease up at once."""
        take, ms = self._columns.take, self.ms
        grant = take(key, ms)
        stale = stale_turn = 0
        while grant[0] < 0:
            # C judged the deadline; only a dead holder (the rare case) needs /proc
            word = grant[1]
            if process_alive(word & _TAG_MASK) or word in (stale, stale_turn):
                return grant
            if grant[0] == BUSY_TURN:
                stale_turn = word
            else:
                stale = word
            grant = take(key, ms, 0, stale, stale_turn)
        return grant

    def acquire(self, key: str | bytes) -> int | None:
        """Take ``key`` if it is free; the token, or ``None`` when a live holder has it (this
        process included: a lease is not re-entrant)."""
        fence, token = self.take(key)
        return token if fence >= 0 else None

    def renew(self, key: str | bytes, token: int) -> int | None:
        """Move the deadline forward; the new token, or ``None`` if the lease was lost.  A forked
        child does not renew its parent's lease."""
        me = current_pid()
        if token & _TAG_MASK != me & _TAG_MASK:
            return None
        new = pack(_now_ms() + self.ms, me)
        return new if self.table.compare_and_set(key, self.column, token, new) else None

    def release(self, key: str | bytes, token: int, *, delete: bool = False) -> bool:
        """Give the lease up if ``token`` still holds it (``delete``: remove the row too).  A
        forked child does not release its parent's lease."""
        return bool(self._columns.give(key, token, 0, delete))
