"""The contract every Store backend implements, and what each one declares it can do.

A backend subclasses :class:`StoreBackend` (a ``typing.Protocol``: mypy flags a backend that
misses a row method wherever it is built or passed).  What goes beyond rows and counters is
declared, never guessed from attributes: :attr:`StoreBackend.capabilities` names the optional
operations a backend serves, and :meth:`StoreBackend.redis_link` hands out the Redis link that
pub/sub, Streams, the cache's stampede lock and Lua use, or ``None``.  The optional operations
have bodies here that raise :class:`~zeal_asgi.errors.UnsupportedOperationError` naming the
backend; wrappers (the circuit breaker, the tiered backend) delegate each method by name.
"""

from __future__ import annotations

import enum
import json
from collections.abc import AsyncIterator, Awaitable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from zeal_asgi.errors import ConfigError, SchemaError, UnsupportedOperationError, ZealError
from zeal_asgi.settings import StoreBackendKind as StoreBackendKind  # re-exported
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.schema import Schema, validate_key

if TYPE_CHECKING:
    from pydantic import BaseModel

    from zeal_asgi._redis.link import RedisLink
    from zeal_asgi.shm import Atomic, Table

Key = str | bytes
Row = dict[str, Any]


class Capability(enum.StrEnum):
    """What a backend serves beyond rows and counters (:attr:`StoreBackend.capabilities`)."""

    LISTING = "listing"
    """``count``, ``iterate`` and ``clear`` (memcached cannot list its keys)."""
    PUBSUB = "pubsub"
    """``publish``, and subscribers in every worker (on one host for the table backend)."""
    STREAMS = "streams"
    """``publish_reliable`` and consumer groups (Redis Streams)."""
    EVAL = "eval"
    """Lua scripts (``Store.eval``)."""


_NEEDS = {
    Capability.LISTING: "a backend that can list its keys (table, redis or tiered; keep the "
    "keys you need yourself on memcached, or make the table with mode='ttl')",
    Capability.PUBSUB: "pub/sub: the redis or tiered backend, or the table backend on one host",
    Capability.STREAMS: "Redis Streams: the redis or tiered backend",
    Capability.EVAL: "Lua, which runs on Redis: the redis or tiered backend",
}


def count(area: str, event: str, by: int = 1) -> None:
    """Count ``event`` of ``area`` in the host-wide stats, as ``<area>_<event>_total``."""
    host_stats().incr(f"{area}_{event}_total", by)


def counters(area: str, events: str = "") -> dict[str, Any]:
    """The events of ``area`` summed over the host, and this worker's under ``worker``, as
    ``<event>_total``; the ``events`` named (space-separated) are there as 0 before they
    first happen."""
    hs, pre = host_stats(), f"{area}_"
    zeros = {f"{event}_total": 0 for event in events.split()}

    def mine(counts: dict[str, int]) -> dict[str, int]:
        return {**zeros, **{k[len(pre) :]: v for k, v in counts.items() if k.startswith(pre)}}

    return {**mine(hs.host()), "worker": mine(hs.worker())}


def seconds(
    what: str,
    value: object,
    most: float,
    *,
    zero: bool = False,
    error: type[ZealError] = ConfigError,
) -> float:
    """A duration: a number in ``(0, most]`` (``[0, most]`` with ``zero``; NaN is not), or
    ``error`` (a ConfigError unless the caller's contract names another) naming ``what``."""
    number = value if isinstance(value, (int, float)) and not isinstance(value, bool) else -1
    if not (0 < number <= most or (zero and number == 0)):  # NaN fails every comparison
        low = "[0" if zero else "(0"
        raise error(f"{what} must be a number of seconds in {low}, {most:,.0f}], got {value!r}")
    return float(number)


def positive_int(what: str, value: object, low: int = 1, most: int | None = None) -> int:
    """``value`` if it is an int in ``[low, most]``, else a ``ConfigError`` naming ``what``."""
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{what} must be an int >= {low}, got {value!r}")
    if most is not None and value > most:
        raise ConfigError(f"{what} must be at most {most}, got {value}")
    return value


def unsupported(backend: StoreBackend, what: str, needs: Capability) -> UnsupportedOperationError:
    """The error for ``what`` on a backend without the capability ``needs``."""
    return UnsupportedOperationError(
        f"{what} needs {_NEEDS[needs]}; this store's backend is {backend.kind}"
    )


@dataclass(frozen=True)
class TableSpec:
    """A table declared with ``Store.make``: everything a backend needs to serve it."""

    name: str
    max_rows: int
    schema: Schema
    mode: str = "tracked"
    """``tracked``: O(1) count (a membership set on Redis); ``ttl``: rows expire after ``ttl`` s."""
    ttl: int | None = None
    model: type[BaseModel] | None = field(default=None, compare=False)

    def check_key(self, key: object) -> bytes:
        """The key's bytes, or the table's typed error."""
        schema = self.schema
        return validate_key(key, self.name, schema.key_limit, schema.binary_keys)

    def table_options(self) -> dict[str, Any]:
        """The columns and key rules as ``Table`` and ``Schema.declare`` take them (keywords)."""
        s = self.schema
        return {
            "columns": {c.name: (int(c.type), c.size) for c in s.columns},
            "key_size": s.key_limit,
            "allow_nan": s.allow_nan,
            "binary_keys": s.binary_keys,
        }

    def declaration(self) -> bytes:
        """What every app sharing this table on one backend must declare alike (columns, key
        rules, mode), as the canonical JSON the network backends store at first use."""
        columns = [[c.name, c.type.name, c.size] for c in self.schema.columns]
        doc = {**self.table_options(), "columns": columns, "mode": self.mode}  # columns first
        return json.dumps(doc, separators=(",", ":")).encode()

    def conflict(self, stored: bytes, where: str) -> SchemaError:
        """The error for a table that ``stored`` says another app declared differently."""
        return SchemaError(
            f"table {self.name!r} on {where} was made by another app with the schema "
            f"{stored.decode('utf-8', 'replace')[:2000]}; this app declares "
            f"{self.declaration().decode()} (apps sharing a server and key prefix must declare "
            "a table alike: use another table name or prefix)"
        )


class CounterBackend(Protocol):
    """A named signed 64-bit counter shared by every worker (and node, off the table backend)."""

    name: str
    atomic: Atomic | None = None
    """The shared-memory atomic behind the counter (table backend only)."""

    def increment(self, by: int = 1) -> Awaitable[int]:
        """Add ``by`` atomically; awaited, the new value (overflow raises, value unchanged)."""

    async def get(self) -> int:
        """The current value (0 when never written)."""

    async def set(self, value: int) -> None:
        """Store ``value``."""

    async def compare_and_set(self, expected: int, new: int) -> bool:
        """Set to ``new`` if the value is ``expected`` (a missing value counts as 0)."""


@runtime_checkable
class StoreBackend(Protocol):
    """What the Store facade needs from a backend.

    ``declare`` runs synchronously, at import time, before workers start; every other call runs in
    a worker's event loop.  Connections open lazily in the worker (``start`` may be called more
    than once).  Misses are ``None`` at this level (the facade turns them into ``False`` for
    ``Store.get``).  Every method validates with the table's
    :class:`~zeal_asgi.shm.schema.Schema`, so the errors and returned types are the same on every
    backend.
    """

    kind: StoreBackendKind
    capabilities: frozenset[Capability] = frozenset()
    """The optional operations this backend serves; the others raise UnsupportedOperationError."""

    def redis_link(self) -> RedisLink | None:
        """The Redis link behind this backend (pub/sub, Streams, stampede locks, Lua) or None."""
        return None

    def declare(self, spec: TableSpec) -> Table | None:
        """Register a table (allocating shared memory where the backend has some)."""

    async def start(self) -> None:
        """Open connections in this worker (idempotent); a boot check that fails loudly."""

    async def aclose(self) -> None:
        """Close connections and background tasks of this worker."""

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row`` into the row at ``key`` (new rows start zeroed); ``True``."""

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row dict, or one field's value; ``None`` on a miss."""

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row; ``True`` if it existed."""

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists."""

    async def exists_cached(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when this host's memory holds the row, without any network round trip."""
        spec.check_key(key)
        return False

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomically add ``by`` to a numeric column (creating the row); the new value."""

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomically set ``column`` to ``new`` if it equals ``expected`` (missing row = zeros)."""

    async def count(self, spec: TableSpec) -> int:
        """Number of rows."""
        raise unsupported(self, f"Store.count({spec.name!r})", Capability.LISTING)

    def iterate(self, spec: TableSpec) -> AsyncIterator[tuple[Any, Row]]:
        """Every ``(key, row)``; rows changed meanwhile may or may not appear."""
        raise unsupported(self, f"Store.iterate({spec.name!r})", Capability.LISTING)

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys`` in order, ``None`` for misses (one round trip where possible)."""

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Merge many rows (validated first, all or nothing); the number written."""

    async def clear(self, spec: TableSpec) -> int:
        """Remove every row; the number removed (approximate on distributed backends)."""
        raise unsupported(self, f"Store.clear({spec.name!r})", Capability.LISTING)

    def table(self, name: str) -> Table:
        """The raw shared-memory ``Table`` (the table backend only)."""
        raise UnsupportedOperationError(
            f"Store.table() returns the raw shared-memory Table: only on the 'table' backend "
            f"(current: {self.kind})"
        )

    async def ping(self) -> bool:
        """``True`` when the backend answers."""

    def stats(self) -> dict[str, Any]:
        """Counters of this backend in this worker (pool, breaker, pub/sub, tables)."""

    def counter(self, name: str, initial: int) -> CounterBackend:
        """A named counter; ``initial`` is written only if the counter does not exist yet."""

    async def publish(self, channel: str, payload: bytes) -> int:
        """Publish a validated channel and payload (``Store.publish``); the number of receivers."""
        raise unsupported(self, "Store.publish", Capability.PUBSUB)

    async def publish_reliable(self, stream: str, payload: bytes, max_len: int | None) -> str:
        """Append to a stream (``Store.publish_reliable``); the entry id."""
        raise unsupported(self, "Store.publish_reliable", Capability.STREAMS)

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` with KEYS/ARGV (keys are prefixed by the backend)."""
        raise unsupported(self, "Store.eval", Capability.EVAL)

    def close_shared(self) -> None:
        """Unlink this backend's shared memory (tests and explicit teardown; workers keep their
        mappings until they exit)."""
        return None  # a network backend shares no memory
