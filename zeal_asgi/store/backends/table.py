"""The default backend: shared-memory tables and atomics, one copy per host.

Nanosecond-scale and synchronous underneath; the async methods only adapt it to the facade.
Tables are allocated at ``declare`` time (``Store.make``), which must run before workers start
so every worker attaches to the same memory (see ``zeal_asgi.shm.segments``).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any

from zeal_asgi.errors import ConfigError, UnknownTableError
from zeal_asgi.shm.bus import host_bus, user_wire
from zeal_asgi.shm.ext import Atomic, Table
from zeal_asgi.shm.schema import Schema
from zeal_asgi.store.base import (
    Capability,
    CounterBackend,
    Key,
    Row,
    StoreBackend,
    StoreBackendKind,
    TableSpec,
)


class TableBackend(StoreBackend):
    """Store backend over shared-memory tables (``Store.BACKEND_TABLE``)."""

    kind = StoreBackendKind.TABLE
    capabilities = frozenset({Capability.LISTING, Capability.PUBSUB})

    def __init__(self, *, namespace: str = "store") -> None:
        self.namespace = namespace
        self._tables: dict[str, Table] = {}
        self._counters: dict[str, AtomicCounter] = {}

    @classmethod
    def from_config(cls, conn: str | Mapping[str, Any] | None = None) -> TableBackend:
        """The table backend takes no connection; only ``namespace`` is read from a dict."""
        if isinstance(conn, Mapping):
            unknown = set(conn) - {"namespace", "on_error", "breaker"}
            if unknown:
                raise ConfigError(f"table backend: unknown options {sorted(unknown)}")
            return cls(namespace=str(conn.get("namespace", "store")))
        return cls()

    # -- tables --------------------------------------------------------------------------------

    def declare(self, spec: TableSpec) -> Table:
        """Allocate (or attach to) the shared table of ``spec``."""
        # Rows of a TTL table expire in the shared table itself.
        options = {**spec.table_options(), "ttl": spec.ttl if spec.mode == "ttl" else None}
        schema = Schema.declare(**options)
        existing = self._tables.get(spec.name)
        if existing is not None and not existing.closed:
            if existing.schema != schema:
                raise ConfigError(
                    f"table {spec.name!r} was already made with another schema in this process "
                    f"(before vs now: {existing.schema.difference(schema)})"
                )
            return existing
        table = Table(spec.max_rows, name=f"{self.namespace}:{spec.name}", **options)
        self._tables[spec.name] = table
        return table

    def table(self, name: str) -> Table:
        """The raw shared table."""
        try:
            return self._tables[name]
        except KeyError:
            raise UnknownTableError(f"table {name!r} was never made (Store.make)") from None

    async def start(self) -> None:
        """Nothing to connect: shared memory is already mapped."""

    async def aclose(self) -> None:
        """Nothing to close per worker (segments stay mapped until the process exits)."""

    # -- rows ----------------------------------------------------------------------------------
    # A TTL table's rows expire in the shared table itself: every write renews a row's expiry,
    # reads miss an expired row, and a write to one starts a new row, in one locked step.

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row``; on a TTL table every write refreshes the expiry."""
        return self.table(spec.name).set(key, row)

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row or field; ``None`` when missing (or expired)."""
        return self.table(spec.name).get(key, field)

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row."""
        return self.table(spec.name).delete(key)

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists (and has not expired)."""
        return self.table(spec.name).exists(key)

    exists_cached = exists  # the shared table is this host's memory

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomic add on a numeric column."""
        result: int | float = self.table(spec.name).incr(key, column, by)
        return result

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomic compare-and-set of one column."""
        spec.schema.column(column, spec.name)  # the column is checked first, as elsewhere
        return self.table(spec.name).compare_and_set(key, column, expected, new)

    async def count(self, spec: TableSpec) -> int:
        """O(1) row count (a TTL table counts an expired row until it is read or its room is
        needed)."""
        return len(self.table(spec.name))

    async def iterate(self, spec: TableSpec) -> AsyncIterator[tuple[Any, Row]]:
        """Every live row, as consistent per-row snapshots."""
        for key, row in self.table(spec.name).items():
            yield key, row

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys``, ``None`` for misses."""
        return [await self.get(spec, k) for k in keys]

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Validate every row first, then write them."""
        for k, r in rows.items():
            spec.check_key(k)
            spec.schema.validate_row(r, spec.name)
        for k, r in rows.items():
            await self.set(spec, k, r)
        return len(rows)

    async def clear(self, spec: TableSpec) -> int:
        """Remove every row."""
        t = self.table(spec.name)
        n = len(t)
        t.clear()
        return n

    async def ping(self) -> bool:
        """Shared memory is always there."""
        return True

    async def publish(self, channel: str, payload: bytes) -> int:
        """Same-host pub/sub through shared memory; the number of subscribed workers here."""
        return host_bus().publish(user_wire(channel), payload)

    def stats(self) -> dict[str, Any]:
        """Per-table counters (shared by every worker of the host)."""
        return {"tables": {name: t.stats() for name, t in self._tables.items() if not t.closed}}

    # -- counters ------------------------------------------------------------------------------

    def counter(self, name: str, initial: int) -> AtomicCounter:
        """A shared atomic; ``initial`` only applies when this call creates it."""
        c = self._counters.get(name)
        if c is None or c.atomic.closed:
            c = AtomicCounter(name, Atomic(initial, name=f"{self.namespace}:counter:{name}"))
            self._counters[name] = c
        return c

    def close_shared(self) -> None:
        """Unmap and unlink every table and atomic of this backend (tests, explicit teardown)."""
        from zeal_asgi.shm.segments import destroy

        for t in self._tables.values():
            destroy(t)
        for c in self._counters.values():
            destroy(c.atomic)
        self._tables.clear()
        self._counters.clear()

    close_all = close_shared


class AtomicCounter(CounterBackend):
    """Counter backend over a shared :class:`~zeal_asgi.Atomic`."""

    def __init__(self, name: str, atomic: Atomic) -> None:
        self.name = name
        self.atomic: Atomic = atomic

    async def increment(self, by: int = 1) -> int:
        """Lock-free add."""
        return self.atomic.increment(by)

    async def get(self) -> int:
        """Current value."""
        return self.atomic.get()

    async def set(self, value: int) -> None:
        """Store a value."""
        self.atomic.set(value)

    async def compare_and_set(self, expected: int, new: int) -> bool:
        """Lock-free CAS."""
        return self.atomic.compare_and_set(expected, new)
