"""Counters per worker, summed over every worker of the host, kept in shared memory.

Any component records events with ``host_stats().incr("pool_acquires")``; ``Store.stats()`` and
``/health/store`` read them back per worker and summed over the host.  Each counter is a row
``"<pid>:<metric>"`` of one small shared table, so an increment is a single ~100 ns atomic
operation and needs no coordination between workers.  The rows of workers that died are folded
into rows of pid 0 (the host's totals keep their counts) and removed, when a worker starts and
whenever the table is full, so worker restarts never fill it.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import threading

from zeal_asgi.errors import TableFullError
from zeal_asgi.shm.ext import Table, Tally
from zeal_asgi.shm.process import current_pid, process_alive

CAPACITY = 32768


class HostStats:
    """Event counters of this worker, readable for every worker of the host."""

    def __init__(self, table: Table) -> None:
        self._table = table
        self._full = False
        self.prune()

    def incr(self, metric: str, by: int = 1) -> None:
        """Add ``by`` to this worker's ``metric`` (created at 0)."""
        if self._full:
            return
        try:
            self._table.incr(f"{current_pid()}:{metric}", "v", by)
        except TableFullError:
            # Counters are diagnostics: never let them fail a request.  Dead workers' rows make
            # room; when there are none, the live workers alone fill the table: stop counting.
            if self.prune():
                self.incr(metric, by)
            else:
                self._full = True

    def tally(self, metric: str) -> Tally:
        """This worker's ``metric`` as a :class:`~zeal_asgi.shm.ext.Tally` (one lock-free add, for
        hot paths); TableFullError when its row cannot be made.  Its row is this pid's: a forked
        child makes its own, and counts ``metric`` through it alone (never also with ``incr``)."""
        return Tally(self._table, f"{current_pid()}:{metric}", "v")

    def prune(self) -> int:
        """Fold the counters of dead workers into pid 0's and drop their rows; how many rows."""
        alive = functools.cache(process_alive)  # a worker has a row per metric
        folded = 0
        for pid, metric, value in self._rows():
            # Only the process whose delete succeeds moves the count: never twice.
            if pid and not alive(pid) and self._table.delete(f"{pid}:{metric}"):
                folded += 1
                # (a live worker may take the row just freed: then this count is lost)
                with contextlib.suppress(TableFullError):
                    self._table.incr(f"0:{metric}", "v", value)
        return folded

    def _rows(self) -> list[tuple[int, str, int]]:
        out = []
        for key, row in self._table.items():
            pid, _, metric = str(key).partition(":")
            if pid.isdigit():
                out.append((int(pid), metric, int(row["v"])))
        return out

    def worker(self) -> dict[str, int]:
        """Counters of this worker."""
        return self.workers().get(current_pid(), {})

    def host(self) -> dict[str, int]:
        """Counters summed over every worker of the host since the server started."""
        total: collections.Counter[str] = collections.Counter()
        for counts in self.workers().values():
            total.update(counts)
        return dict(total)

    def workers(self) -> dict[int, dict[str, int]]:
        """Counters of every worker that recorded something, by pid (0: workers that died)."""
        out: dict[int, dict[str, int]] = {}
        for pid, metric, value in self._rows():
            out.setdefault(pid, {})[metric] = value
        return out


_instance: HostStats | None = None
_lock = threading.Lock()


def host_stats() -> HostStats:
    """The host-wide counters of this server (created on first use, shared by name)."""
    global _instance
    inst = _instance
    if inst is not None:
        return inst  # hot path: no lock once it exists
    with _lock:
        if _instance is None:
            _instance = HostStats(Table(CAPACITY, {"v": ("int", 8)}, name="__zeal_stats__"))
        return _instance
