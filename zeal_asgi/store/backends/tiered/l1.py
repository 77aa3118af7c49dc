"""The tiered backend's L1: shared-memory tables (one copy per host) with freshness and eviction.

Each declared table gets a shared table with the same columns and key rules plus a hidden
``__l1_fetched_at`` column (host monotonic clock).  A row is fresh for ``ttl`` seconds.

Fills race with invalidations (a worker reads the old row from L2, another one writes the new
row and invalidates, then the first one stores the old row in L1).  Generation counters close
that window: every invalidation bumps the generation of the key's bucket (or the global one)
*before* touching L1; a filler snapshots the generations before reading L2, and after storing
its row checks them again and deletes the row if either moved.  Whatever the interleaving, L1
ends up with the new row or without the key, never with the old row.

When L1 is full, one worker at a time sweeps it (it holds the host lease, which a dead holder
gives up at once): stale rows go first, then the least recently fetched, until an eighth of it
is free.
"""

from __future__ import annotations

import heapq
import time
import zlib
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from zeal_asgi.errors import ConfigError, TableFullError
from zeal_asgi.shm.ext import Table
from zeal_asgi.shm.lease import Lease
from zeal_asgi.shm.schema import ColumnType
from zeal_asgi.store.base import Key, Row, TableSpec, count

if TYPE_CHECKING:
    from zeal_asgi.shm import Table as TableT

FETCHED = "__l1_fetched_at"
_BUCKETS = 1024
_GLOBAL = "all"
_LOCK = "evict"
_LOCK_LEASE = 5.0
Token = tuple[int, int]


class L1Cache:
    """Shared L1 tables of one tiered backend (one set per ``namespace`` and server)."""

    def __init__(self, namespace: str, ttl: float, rows: int | None = None) -> None:
        self.namespace = namespace
        self.ttl = ttl
        self.rows = rows
        self.tables: dict[str, TableT] = {}
        """The L1 table of every declared table."""
        self.ttls: dict[str, float] = {}
        """Seconds a row of each table stays fresh (``ttl``, or the table's TTL if shorter)."""
        self._gens: TableT | None = None

    def _gen_table(self) -> TableT:
        if self._gens is None:
            self._gens = Table(_BUCKETS + 8, {"g": ("int", 8)}, name=f"{self.namespace}:l1gen")
        return self._gens

    def declare(self, spec: TableSpec) -> None:
        """Allocate (or attach to) the L1 table of ``spec``: call before workers start."""
        existing = self.tables.get(spec.name)
        if existing is not None and not existing.closed:
            return
        if any(c.name == FETCHED for c in spec.schema.columns):
            raise ConfigError(f"table {spec.name!r}: column name {FETCHED!r} is reserved by L1")
        options = spec.table_options()
        options["columns"][FETCHED] = (int(ColumnType.FLOAT), 8)
        table = Table(
            self.rows or spec.max_rows, name=f"{self.namespace}:l1:{spec.name}", **options
        )
        self._gen_table()
        self.tables[spec.name] = table
        # A row of a TTL table must not outlive its L2 copy: never fresh longer than the TTL.
        self.ttls[spec.name] = min(self.ttl, float(spec.ttl)) if spec.ttl else self.ttl

    # -- generations -----------------------------------------------------------------------------

    @staticmethod
    def _bucket(table: str, key: Key) -> str:
        raw = key.encode("utf-8") if isinstance(key, str) else key
        return str(zlib.crc32(raw, zlib.crc32(table.encode())) % _BUCKETS)

    def snapshot(self, table: str, key: Key) -> Token:
        """Generations to pass to :meth:`fill` (taken before reading L2)."""
        g = self._gen_table()
        return int(g.get(self._bucket(table, key), "g") or 0), int(g.get(_GLOBAL, "g") or 0)

    def _bump(self, table: str, key: Key | None) -> None:
        self._gen_table().incr(_GLOBAL if key is None else self._bucket(table, key), "g", 1)

    # -- reads -----------------------------------------------------------------------------------

    def lookup(self, spec: TableSpec, key: Key) -> Row | None:
        """The fresh L1 row without the hidden column, or ``None`` (missing or stale)."""
        t = self.tables[spec.name]
        row: Row | None = t.get(key)
        if row is None:
            count("tiered", "l1_misses")
            return None
        if time.monotonic() - row.pop(FETCHED) >= self.ttls[spec.name]:
            count("tiered", "l1_stale")
            return None
        count("tiered", "l1_hits")
        return row

    def is_fresh(self, spec: TableSpec, key: Key) -> bool:
        """Whether L1 holds a fresh copy of ``key`` (no counters touched)."""
        fetched = self.tables[spec.name].get(key, FETCHED)
        return fetched is not None and time.monotonic() - fetched < self.ttls[spec.name]

    # -- writes ----------------------------------------------------------------------------------

    def fill(
        self,
        spec: TableSpec,
        key: Key,
        row: Mapping[str, Any],
        token: Token,
        fetched: float | None = None,
    ) -> bool:
        """Store ``row`` read from L2 after ``snapshot() == token``; False if it was dropped.

        ``fetched`` (monotonic) defaults to now; an earlier one shortens the row's freshness.
        """
        if self.snapshot(spec.name, key) != token:
            count("tiered", "l1_fill_skipped")
            return False
        stored = self._store(spec, key, row, fetched)
        if stored and self.snapshot(spec.name, key) != token:
            self.tables[spec.name].delete(key)  # an invalidation overtook us: keep nothing
            count("tiered", "l1_fill_skipped")
            return False
        return stored

    def put(self, spec: TableSpec, key: Key, row: Mapping[str, Any], fetched: float) -> None:
        """Store a row this worker just wrote to L2 (``fetched``: monotonic time before it)."""
        self._bump(spec.name, key)
        self._store(spec, key, row, fetched)

    def invalidate(self, table: str, keys: Iterable[Key]) -> None:
        """Drop ``keys`` from L1 (generation first, see the module docstring)."""
        t = self.tables.get(table)
        if t is not None:
            for key in keys:
                self._bump(table, key)
                t.delete(key)

    def clear(self, table: str | None = None) -> None:
        """Drop every row of ``table`` (or of every table: a flush)."""
        self._bump(table or "", None)
        for name, t in self.tables.items():
            if table is None or name == table:
                t.clear()

    def _store(
        self, spec: TableSpec, key: Key, row: Mapping[str, Any], fetched: float | None = None
    ) -> bool:
        t = self.tables[spec.name]
        full = {**row, FETCHED: time.monotonic() if fetched is None else fetched}
        for swept in (False, True):
            try:
                t.set(key, full)
                return True
            except TableFullError:
                if swept or not self._evict(spec.name, t):
                    break
        count("tiered", "l1_full_skips")
        return False

    # -- eviction --------------------------------------------------------------------------------

    def _evict(self, name: str, t: TableT) -> bool:
        lease = Lease(self._gen_table(), _LOCK_LEASE, column="g")
        token = lease.acquire(_LOCK)
        if token is None:
            return False  # another worker is sweeping; don't stall this request behind it
        try:
            ttl = self.ttls[name]
            now = time.monotonic()
            target = max(1, t.capacity // 8)
            live: list[tuple[float, Any]] = []
            freed = 0
            for key, row in t.items():
                if now - row[FETCHED] >= ttl:
                    freed += bool(t.delete(key))
                else:
                    live.append((row[FETCHED], key))
            for _, key in heapq.nsmallest(target - freed, live, key=lambda item: item[0]):
                freed += bool(t.delete(key))
            count("tiered", "l1_evictions", freed)
            return freed > 0
        finally:
            lease.release(_LOCK, token)

    def stats(self) -> dict[str, Any]:
        """Per-table figures of the shared L1 tables."""
        return {"tables": {n: t.stats() for n, t in self.tables.items() if not t.closed}}

    def close_all(self) -> None:
        """Unmap and unlink every L1 table (tests and explicit teardown)."""
        from zeal_asgi.shm.segments import destroy

        for t in self.tables.values():
            destroy(t)
        if self._gens is not None:
            destroy(self._gens)
        self.tables.clear()
        self._gens = None
