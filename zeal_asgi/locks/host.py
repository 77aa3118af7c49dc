"""Host-scope locks: one row per name in a shared table, held with the shared-memory lease.

Columns of a row: ``owner``, the lease word of :mod:`zeal_asgi.shm.lease` (deadline and holder
pid: a dead holder's lock is free at once, a stopped one's at its deadline); ``fence``, the last
fencing token handed out, starting at the wall clock in µs (each server run makes the table
anew, and tokens must still rise from one run to the next); ``turn``, a short lease that a
waiting process holds so that the process releasing the lock does not take it straight back
(two contending processes alternate); ``mark``, the highest value claimed under the lock (a
job's last period).  Rows are never deleted: the fence must outlive every holder.
"""

from __future__ import annotations

import functools

from zeal_asgi.errors import TableFullError
from zeal_asgi.shm.ext import Table
from zeal_asgi.shm.lease import Lease, LeaseColumns

TABLE = "__zeal_locks__"
CAPACITY = 4096
"""Distinct host-scope lock names a server can use (rows are kept for their fence)."""
_TURN_SECONDS = 0.05  # a waiter renews its turn at every poll (``HostLocks.poll``) or loses it
_TURN_MS = int(_TURN_SECONDS * 1000)


class HostLocks:
    """Leases, fencing tokens and marks of host-scope locks (every method is one attempt)."""

    name = "host"
    poll = 0.002
    """Longest sleep between two attempts of a waiter (a dead holder's lock is free at once)."""

    def __init__(self, table: Table) -> None:
        self.table = table
        # shared memory: no attempt ever waits, and the compiled one is the uncontended path
        self.immediate: LeaseColumns | None = LeaseColumns(
            table, "owner", "fence", "turn", _TURN_MS
        )
        self._leases: dict[int, Lease] = {}

    def _lease(self, ttl_ms: int) -> Lease:
        lease = self._leases.get(ttl_ms)
        if lease is None:
            if len(self._leases) >= 64:
                self._leases.clear()
            lease = self._leases[ttl_ms] = Lease(
                self.table, ttl_ms / 1000, "owner", fence="fence", turn="turn",
                turn_seconds=_TURN_SECONDS,
            )  # fmt: skip
        return lease

    def try_acquire(self, name: str, ttl_ms: int) -> tuple[int, int] | None:
        """``(token, lease word)`` if ``name`` was free, else ``None`` (and queue for a turn):
        the turn check, the lease and the fencing token in one step."""
        try:
            grant = self._lease(ttl_ms).take(name)
        except TableFullError:
            raise TableFullError(
                f"zeal.lock({name!r}): the host already has {CAPACITY} lock names (each name "
                "keeps its row for its fencing tokens)"
            ) from None
        return grant if grant[0] > 0 else None

    async def acquire(self, name: str, ttl_ms: int) -> tuple[int, int] | None:
        """:meth:`try_acquire`, as a scope's coroutine."""
        return self.try_acquire(name, ttl_ms)

    async def renew(self, name: str, word: int, ttl_ms: int) -> int | None:
        """The lease word with a new deadline, or ``None`` if the lease is lost."""
        return self._lease(ttl_ms).renew(name, word)

    async def release(self, name: str, word: int, ttl_ms: int) -> None:
        """Give the lease up if ``word`` still holds it."""
        self._lease(ttl_ms).release(name, word)

    async def claim(self, name: str, mark: int) -> bool:
        """Raise the mark of ``name`` to ``mark`` if it is below; ``True`` when it rose."""
        current = self.table.get(name, "mark") or 0
        return current < mark and bool(self.table.compare_and_set(name, "mark", current, mark))


@functools.cache
def host_locks() -> HostLocks:
    """The host-scope locks of this server (shared memory made on first use: before workers)."""
    columns = {c: ("int", 8) for c in ("owner", "fence", "turn", "mark")}
    return HostLocks(Table(CAPACITY, columns, name=TABLE, key_size=128))
