"""Counters per worker, summed over every worker of the host, kept in shared memory.

Any component records events with ``host_stats().incr("pool_acquires")``; ``Store.stats()`` and
``/health/store`` read them back per worker and summed over the host.  Each counter is a row
``"<pid>:<metric>"`` of one small shared table, so an increment is a single ~100 ns atomic
operation and needs no coordination between workers.
"""

from __future__ import annotations

import os
import threading
from typing import TYPE_CHECKING

from zeal_asgi.errors import TableFullError

if TYPE_CHECKING:
    from zeal_asgi.shm import Table

__all__ = ["HostStats", "host_stats"]

CAPACITY = 32768


class HostStats:
    """Event counters of this worker, readable for every worker of the host."""

    def __init__(self, table: Table) -> None:
        self._table = table
        self._pid = os.getpid()
        self._full = False

    def incr(self, metric: str, by: int = 1) -> None:
        """Add ``by`` to this worker's ``metric`` (created at 0)."""
        if self._full:
            return
        try:
            self._table.incr(f"{_pid}:{metric}", "v", by)
        except TableFullError:
            # Counters are diagnostics: never let them fail a request.
            self._full = True

    def set(self, metric: str, value: int) -> None:
        """Set this worker's ``metric`` (a gauge, e.g. a breaker state)."""
        if not self._full:
            try:
                self._table.set(f"{_pid}:{metric}", {"v": value})
            except TableFullError:
                self._full = True

    def _rows(self) -> list[tuple[int, str, int]]:
        out = []
        for key, row in self._table.items():
            pid, _, metric = str(key).partition(":")
            if pid.isdigit():
                out.append((int(pid), metric, int(row["v"])))
        return out

    def worker(self, pid: int | None = None) -> dict[str, int]:
        """Counters of one worker (this one by default)."""
        want = os.getpid() if pid is None else pid
        return {m: v for p, m, v in self._rows() if p == want}

    def host(self) -> dict[str, int]:
        """Counters summed over every worker of the host since the server started."""
        total: dict[str, int] = {}
        for _, metric, value in self._rows():
            total[metric] = total.get(metric, 0) + value
        return total

    def workers(self) -> dict[int, dict[str, int]]:
        """Counters of every worker that recorded something, by pid."""
        out: dict[int, dict[str, int]] = {}
        for pid, metric, value in self._rows():
            out.setdefault(pid, {})[metric] = value
        return out


_instance: HostStats | None = None
_lock = threading.Lock()
_pid = os.getpid()  # cached: getpid is a system call on every counter update otherwise


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


def host_stats() -> HostStats:
    """The host-wide counters of this server (created on first use, shared by name)."""
    global _instance
    inst = _instance
    if inst is not None:
        return inst  # hot path: no lock once it exists
    with _lock:
        if _instance is None:
            from zeal_asgi.shm.ext import Table

            table = Table(CAPACITY, {"v": ("int", 8)}, name="__zeal_stats__")
            _instance = HostStats(table)
        return _instance
