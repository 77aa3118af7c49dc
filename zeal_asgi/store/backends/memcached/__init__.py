"""``MemcachedBackend``: Store rows and counters on one or more memcached servers (aiomcache).

Layout (every key carries the prefix, ``zeal`` by default):

- a row is one value at ``{prefix}:{table}:{key}`` holding the whole typed row
  (:meth:`zeal_asgi.store.codec.RowCodec.pack`: typed fields behind a schema fingerprint); a table
  whose only column is INT(8) stores the bare number instead (``value + 2**63`` in decimal);
- a counter is the number at ``{prefix}:counter:{name}`` (same encoding);
- a key longer than 250 bytes or holding whitespace, control or non-ASCII bytes is replaced by
  ``{prefix}:h:<BLAKE2b-256 hex>``: CRLF in a key can never inject a protocol command (rows of
  the tables called ``h`` and ``counter`` are always hashed, so namespaces never overlap);
- with several servers, each key lives on one server chosen by rendezvous hashing; ``mget`` sends
  one multi-get per server.  There is no failover: keys of a server that is down fail with
  ``BackendUnavailableError`` (wrap the backend with ``on_error="fallback_table"`` for a breaker).

Atomicity (every operation below is atomic; reads see whole rows):

- ``set`` with every column is a plain ``set``.  A partial ``set`` merges (only the given columns
  change), so it reads the row with ``gets`` and writes it back with ``cas`` (or ``add`` for a new
  row), retrying with jittered backoff when another write got in first, until ``cas_timeout``
  (then ``BackendTimeoutError``).  One value per row was chosen over one key per column because a
  row then reads, deletes and expires as a unit; per-column keys would let readers see half a
  write and let a delete race an increment.
- ``incr``/``decr``/``compare_and_set`` on rows use the same ``gets``/``cas`` loop, except ``incr``
  on tables whose only column is INT(8): there the row *is* a native memcached counter and
  ``incr`` is one native command (see :mod:`~zeal_asgi.store.backends.memcached.native` for the
  bias that makes unsigned ``incr`` exact for signed values, and its one caveat at the edge of the
  64-bit range).  Smaller INT columns are not given native commands: their range edge is
  reachable, and a native step that overflows must be undone after the fact, which concurrent
  clients could observe.
- Counters use native ``incr`` (``initial`` written with ``add``), ``gets``/``cas`` for
  compare-and-set.

What memcached cannot do raises ``UnsupportedOperationError``: ``count``, ``iterate`` and ``clear``
(memcached cannot list keys), and pub/sub, Streams and Lua (this backend declares none of those
capabilities).  memcached is a cache: rows can be
evicted under memory pressure and vanish on restart.  A TTL table (``mode="ttl"``) passes its
ttl as the expiry of every write (``touch`` after a native ``incr``).

At its first use in a process, a table's declaration is stored at ``{prefix}:schema:{table}``
(``add``) or compared with the one there: another app declaring the table differently gets a
SchemaError naming both (memcached may evict that key like any other; the row blobs carry a
schema fingerprint as well).  A stored value that is not a row of the table's current schema
(another program wrote it, or the schema changed) raises ``BackendResponseError`` when read or
merged into, never reads as zeros; ``delete`` or a ``set`` of every column replaces it.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from typing import Any, TypeVar

from zeal_asgi.errors import ConfigError, IntegerOverflowError, ZealError
from zeal_asgi.shm.schema import Column, ColumnType, validate_value
from zeal_asgi.store.backends.memcached.conn import (
    DEFAULT_SERVERS,
    KeyMapper,
    ServerPool,
    parse_servers,
    put_op,
)
from zeal_asgi.store.backends.memcached.native import (
    backoff,
    decode_i64,
    encode_i64,
    native_add,
)
from zeal_asgi.store.base import (
    CounterBackend,
    Key,
    Row,
    StoreBackend,
    StoreBackendKind,
    TableSpec,
    counters,
    positive_int,
    seconds,
)
from zeal_asgi.store.codec import RowCodec, incr_nonfinite, incr_overflow

__all__ = ["MemcachedBackend", "MemcachedCounter"]

R = TypeVar("R")
Change = Callable[[bytes | None], tuple[bytes | None, R]]
"""``change(stored)`` of :meth:`MemcachedBackend._swap`: ``(value to write or None, result)``."""
Edit = Callable[[Row, bool], tuple[bool, R]]
"""``edit(row, present)`` of :meth:`MemcachedBackend._update`: ``(write?, result)``."""

_OPTIONS = {"servers", "prefix", "timeout", "cas_timeout", "pool_size", "on_error", "breaker"}
_MGET_CHUNK = 200
_MSET_CONCURRENCY = 32
_RELATIVE_TTL_MAX = 30 * 24 * 3600
"""memcached reads an expiry above 30 days as an absolute Unix time."""


async def _gather_all(coros: Iterable[Awaitable[R]]) -> list[R]:
    """Await every coroutine, then raise the first failure: none is left running unseen."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]


class _Rows:
    """How the rows of one table are stored: a packed row, or (a table whose only column is
    INT(8)) the bare biased number that native ``incr`` updates.

    INT(8) spans memcached's whole 64-bit counter space, so its edge is practically out of
    reach; smaller INT columns would have to undo an overflowing native step after the fact,
    where concurrent clients could see it, so they are packed like every other row.
    """

    __slots__ = ("codec", "native", "spec")

    def __init__(self, spec: TableSpec) -> None:
        self.spec = spec
        self.codec = RowCodec(spec.schema, spec.name)
        cols = spec.schema.columns
        native = len(cols) == 1 and cols[0].type is ColumnType.INT and cols[0].size == 8
        self.native: Column | None = cols[0] if native else None

    def expiry(self) -> int:
        """The memcached exptime of a write (0: never; absolute beyond 30 days).

        memcached's clock ticks in whole seconds, so an exptime of ``ttl`` lets a row vanish up
        to a second early; one more second makes it live at least ``ttl`` (at most ``ttl + 1``),
        like the other backends' "expires after ttl".
        """
        if self.spec.mode != "ttl" or not self.spec.ttl:
            return 0
        ttl = self.spec.ttl + 1
        return ttl if ttl <= _RELATIVE_TTL_MAX else int(time.time()) + ttl

    def pack(self, row: Mapping[str, Any]) -> bytes:
        """A full row as the value to store."""
        return encode_i64(row[self.native.name]) if self.native else self.codec.pack(row)

    def unpack(self, data: bytes | None, key: object) -> Row | None:
        """The row in a stored value (``None``: missing); BackendResponseError if not one."""
        if data is None:
            return None
        if self.native is not None:
            what = f"row {key!r} of table {self.spec.name!r}"
            return {self.native.name: decode_i64(data, what)}
        return self.codec.unpack(data, key)


class MemcachedBackend(StoreBackend):
    """Store backend over memcached (``Store.BACKEND_MEMCACHED``).

    Example::

        Store.default_backend("memcached", "10.0.0.5:11211,10.0.0.6:11211")
        Store.default_backend("memcached", {"servers": "memcached://cache:11211", "timeout": 0.5})

    Args:
        servers: ``host:port[,host:port...]``, a ``memcached://`` URL or a list of ``host:port``;
            ``None`` reads ``ZEAL_MEMCACHED_SERVERS``, else ``127.0.0.1:11211``.
        prefix: first part of every key (``ZEAL_KEY_PREFIX`` when built from the environment).
        timeout: seconds for one command, pool wait and connect included.
        cas_timeout: seconds a compare-and-swap retry loop may run before BackendTimeoutError.
        pool_size: connections per server in each worker.
    """

    kind = StoreBackendKind.MEMCACHED

    def __init__(
        self,
        servers: str | Sequence[str] | None = None,
        *,
        prefix: str = "zeal",
        timeout: float = 1.0,
        cas_timeout: float = 5.0,
        pool_size: int = 4,
    ) -> None:
        if servers is None:
            servers = os.environ.get("ZEAL_MEMCACHED_SERVERS", DEFAULT_SERVERS)
        self.keys = KeyMapper(prefix)
        self.prefix = prefix
        """The key prefix."""
        self.cas_timeout = seconds("memcached cas_timeout", cas_timeout, 3600)
        self.pool = ServerPool(
            parse_servers(servers),
            timeout=seconds("memcached timeout", timeout, 3600),
            pool_size=positive_int("memcached pool_size", pool_size, 1, 1024),
        )
        self.servers = ",".join(str(s) for s in self.pool.servers)
        """The server list, ``host:port,host:port``."""
        self._tables: dict[str, _Rows] = {}
        self._checked: set[str] = set()
        self._counters: dict[str, MemcachedCounter] = {}

    @classmethod
    def from_config(cls, conn: str | Mapping[str, Any] | None = None) -> MemcachedBackend:
        """Build from a server list / URL or an options dict, validating without any I/O.

        Raises:
            ConfigError: a bad server, port, prefix, timeout or unknown option.
        """
        env_prefix = os.environ.get("ZEAL_KEY_PREFIX") or "zeal"
        if conn is None or isinstance(conn, str):
            return cls(conn, prefix=env_prefix)
        if not isinstance(conn, Mapping):
            raise ConfigError(f"memcached connection must be a str or a dict, got {conn!r}")
        if unknown := set(conn) - _OPTIONS:
            raise ConfigError(
                f"memcached backend: unknown options {sorted(unknown)}; known: {sorted(_OPTIONS)}"
            )
        given = {k: conn[k] for k in ("timeout", "cas_timeout", "pool_size") if k in conn}
        return cls(conn.get("servers"), prefix=conn.get("prefix") or env_prefix, **given)

    def __repr__(self) -> str:
        return f"<MemcachedBackend {self.servers} prefix={self.prefix!r}>"

    # -- lifecycle -----------------------------------------------------------------------------

    def declare(self, spec: TableSpec) -> None:
        """Register a table (nothing is allocated: memcached needs no declaration)."""
        self._tables[spec.name] = _Rows(spec)

    async def _rows(self, spec: TableSpec) -> _Rows:
        """How the rows of ``spec`` are stored; at the table's first use in this process, its
        declaration is stored, or one that differs is refused."""
        rows = self._tables.get(spec.name)
        if rows is None or (rows.spec is not spec and rows.spec != spec):
            rows = self._tables[spec.name] = _Rows(spec)
        if spec.name not in self._checked:
            key, mine = self.keys.schema(spec.name), spec.declaration()
            if not await self._run(key, "schema check", lambda c: c.add(key, mine)):
                stored = await self._run(key, "schema check", lambda c: c.get(key))
                if stored is not None and stored != mine:
                    raise spec.conflict(stored, f"memcached {self.servers}")
            self._checked.add(spec.name)
        return rows

    async def start(self) -> None:
        """Connect to every server in this worker; raises if one does not answer."""
        servers = range(len(self.pool.servers))
        try:
            await _gather_all(self.pool.run(i, "version", lambda c: c.version()) for i in servers)
        except ZealError as exc:
            raise type(exc)(
                f"memcached boot check failed: {exc} (the servers come from "
                "ZEAL_MEMCACHED_SERVERS or the servers option; ZEAL_ON_ERROR=fallback_table boots "
                "degraded)"
            ) from exc

    async def aclose(self) -> None:
        """Close this worker's connections."""
        await self.pool.aclose()

    async def ping(self) -> bool:
        """``True`` when every server answers ``version``."""
        try:
            await self.start()
        except ZealError:
            return False
        return True

    def stats(self) -> dict[str, Any]:
        """Servers and settings, plus counters of this worker and summed over the host."""
        return {
            "memcached": {
                "servers": [str(s) for s in self.pool.servers],
                "prefix": self.keys.prefix,
                "timeout": self.pool.timeout,
                "cas_timeout": self.cas_timeout,
                "pool_size": self.pool.pool_size,
                **counters("memcached"),
            }
        }

    # -- one value -------------------------------------------------------------------------------

    def _run(self, key: bytes, what: str, fn: Callable[[Any], Awaitable[R]]) -> Awaitable[R]:
        """``fn(client)`` on the server that holds ``key``."""
        return self.pool.run(self.pool.index(key), what, fn)

    async def _swap(self, key: bytes, what: str, exptime: int, change: Change[R]) -> R:
        """Read-modify-write of the value at ``key``: ``gets``, then ``cas`` (``add`` when it is
        missing), retried with jittered backoff until it wins or ``cas_timeout`` passes.

        ``change(stored)`` returns ``(value to write or None, result)``; it may raise a typed
        error, and then nothing is written.
        """
        i = self.pool.index(key)
        deadline = time.monotonic() + self.cas_timeout
        attempt = 0
        while True:
            data, token = await self.pool.run(i, what, lambda c: c.gets(key))
            new, result = change(data)
            if new is None:
                return result
            if await self.pool.run(i, what, put_op(key, new, token, exptime)):
                return result
            attempt += 1
            await backoff(attempt, deadline, what)

    # -- rows ----------------------------------------------------------------------------------

    def _key(self, spec: TableSpec, key: object) -> bytes:
        return self.keys.row(spec.name, spec.check_key(key))

    async def _update(self, rows: _Rows, key: object, mk: bytes, op: str, change: Edit[R]) -> R:
        """Read-modify-write of one row (:meth:`_swap`).

        ``change(row, present)`` edits ``row`` (the stored row, or zeros) in place and returns
        ``(write, result)``.
        """

        def step(data: bytes | None) -> tuple[bytes | None, R]:
            stored = rows.unpack(data, key)
            row = rows.spec.schema.zero_row() if stored is None else stored
            write, result = change(row, stored is not None)
            return (rows.pack(row) if write else None), result

        return await self._swap(mk, f"{op} of table {rows.spec.name!r}", rows.expiry(), step)

    async def _write(self, spec: TableSpec, key: object, mk: bytes, values: Row) -> None:
        rows = await self._rows(spec)
        exptime = rows.expiry()
        if values and (rows.native is not None or len(values) == len(spec.schema.columns)):
            # Every column given: the merge result does not depend on the stored row.
            data = rows.pack(values)
            await self._run(mk, "set", lambda c: c.set(mk, data, exptime))
            return
        if rows.native is not None:  # an empty row: create a zero row, or only refresh the expiry
            created = await self._run(mk, "set", lambda c: c.add(mk, encode_i64(0), exptime))
            if not created and exptime:
                await self._run(mk, "set", lambda c: c.touch(mk, exptime))
            return

        def merge(row: Row, present: bool) -> tuple[bool, None]:
            row.update(values)
            return (bool(values) or not present or exptime != 0), None

        await self._update(rows, key, mk, "set", merge)

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row`` into the row at ``key`` (a new row starts zeroed); ``True``."""
        mk = self._key(spec, key)
        await self._write(spec, key, mk, spec.schema.validate_row(row, spec.name))
        return True

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row (declaration order) or one field; ``None`` on a miss."""
        mk = self._key(spec, key)
        if field is not None:
            spec.schema.column(field, spec.name)
        rows = await self._rows(spec)
        row = rows.unpack(await self._run(mk, "get", lambda c: c.get(mk)), key)
        return row if row is None or field is None else row[field]

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row; ``True`` if it existed."""
        mk = self._key(spec, key)
        await self._rows(spec)
        return await self._run(mk, "delete", lambda c: c.delete(mk))

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists."""
        mk = self._key(spec, key)
        await self._rows(spec)
        return await self._run(mk, "exists", lambda c: c.get(mk)) is not None

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomically add ``by`` (a step the facade checked) to a numeric column, creating the
        row; the new value."""
        mk = self._key(spec, key)
        col = spec.schema.column(column, spec.name)
        rows = await self._rows(spec)
        if rows.native is not None:
            return await native_add(
                self.pool,
                mk,
                int(by),
                what=f"incr of table {spec.name!r}",
                exptime=rows.expiry(),
                cas_timeout=self.cas_timeout,
                overflow=lambda before: incr_overflow(col, spec.name, by, before),
            )

        def add(row: Row, present: bool) -> tuple[bool, int | float]:
            old = row[col.name]
            if col.type is ColumnType.INT:
                new = old + by
                if not col.int_range[0] <= new <= col.int_range[1]:
                    raise incr_overflow(col, spec.name, by, old)
            else:
                new = float(old) + float(by)
                if not spec.schema.allow_nan and not math.isfinite(new):
                    raise incr_nonfinite(col, spec.name, by, old)
            row[col.name] = new
            return True, new

        return await self._update(rows, key, mk, "incr", add)

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Set ``column`` to ``new`` if it equals ``expected`` (a missing row compares as zeros)."""
        col = spec.schema.column(column, spec.name)  # before the key, like the table backend
        mk = self._key(spec, key)
        allow_nan = spec.schema.allow_nan
        want = validate_value(col, expected, spec.name, allow_nan)
        value = validate_value(col, new, spec.name, allow_nan)
        rows = await self._rows(spec)

        def swap(row: Row, present: bool) -> tuple[bool, bool]:
            if row[col.name] != want:
                return False, False
            row[col.name] = value
            return True, True

        return await self._update(rows, key, mk, "compare_and_set", swap)

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys`` in order (``None`` for misses): one multi-get per server."""
        mks = [self._key(spec, k) for k in keys]
        if not mks:
            return []
        rows = await self._rows(spec)
        by_server: dict[int, list[bytes]] = {}
        for mk in dict.fromkeys(mks):
            by_server.setdefault(self.pool.index(mk), []).append(mk)

        async def fetch(i: int, chunk: list[bytes]) -> dict[bytes, bytes | None]:
            values = await self.pool.run(i, "mget", lambda c: c.multi_get(*chunk))
            return dict(zip(chunk, values, strict=True))

        found: dict[bytes, bytes | None] = {}
        for part in await _gather_all(
            fetch(i, group[n : n + _MGET_CHUNK])
            for i, group in by_server.items()
            for n in range(0, len(group), _MGET_CHUNK)
        ):
            found.update(part)
        return [rows.unpack(found.get(mk), k) for k, mk in zip(keys, mks, strict=True)]

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Merge many rows, all validated before any I/O; the number written.

        Each row is written atomically; the batch is not (a failure leaves earlier rows written).
        """
        work = [
            (k, self._key(spec, k), spec.schema.validate_row(r, spec.name)) for k, r in rows.items()
        ]
        gate = asyncio.Semaphore(_MSET_CONCURRENCY)

        async def one(key: object, mk: bytes, values: Row) -> None:
            async with gate:
                await self._write(spec, key, mk, values)

        await _gather_all(one(k, mk, v) for k, mk, v in work)
        return len(work)

    # -- counters ------------------------------------------------------------------------------

    def counter(self, name: str, initial: int) -> MemcachedCounter:
        """The counter ``{prefix}:counter:{name}``; ``initial`` is written with ``add``."""
        c = self._counters.get(name)
        if c is None or c.initial != initial:
            c = self._counters[name] = MemcachedCounter(self, name, initial)
        return c


class MemcachedCounter(CounterBackend):
    """Counter backend: ``{prefix}:counter:{name}`` updated with memcached's native ``incr``.

    ``initial`` is written with ``add`` (never overwrites an existing value) before the first
    operation of each process; a counter that disappears later (eviction, restart) counts as 0.
    Arguments are checked by :class:`~zeal_asgi.Counter`.
    """

    def __init__(self, backend: MemcachedBackend, name: str, initial: int) -> None:
        self.name = name
        self.initial = initial
        self.key = backend.keys.counter(name)
        self._backend = backend
        self._created = False

    async def _ensure(self) -> None:
        if not self._created:
            data = encode_i64(self.initial)
            what = f"create counter {self.name!r}"
            await self._backend._run(self.key, what, lambda c: c.add(self.key, data))
            self._created = True

    async def increment(self, by: int = 1) -> int:
        """Add ``by`` atomically; the new value (overflow raises, value unchanged)."""
        await self._ensure()

        def overflow(before: int) -> IntegerOverflowError:
            return IntegerOverflowError(
                f"counter {self.name!r}: {before} + {by} leaves the signed 64-bit range; unchanged"
            )

        b = self._backend
        what = f"increment of counter {self.name!r}"
        return await native_add(
            b.pool, self.key, by, what=what, exptime=0, cas_timeout=b.cas_timeout, overflow=overflow
        )

    async def get(self) -> int:
        """The current value (0 when missing)."""
        await self._ensure()
        what = f"get of counter {self.name!r}"
        raw = await self._backend._run(self.key, what, lambda c: c.get(self.key))
        return 0 if raw is None else decode_i64(raw, what)

    async def set(self, value: int) -> None:
        """Store ``value``."""
        data = encode_i64(value)
        what = f"set of counter {self.name!r}"
        await self._backend._run(self.key, what, lambda c: c.set(self.key, data))
        self._created = True

    async def compare_and_set(self, expected: int, new: int) -> bool:
        """Set ``new`` if the value is ``expected`` (missing counts as 0), with ``gets``/``cas``."""
        await self._ensure()
        what = f"compare_and_set of counter {self.name!r}"

        def swap(raw: bytes | None) -> tuple[bytes | None, bool]:
            if (0 if raw is None else decode_i64(raw, what)) != expected:
                return None, False
            return encode_i64(new), True

        return await self._backend._swap(self.key, what, 0, swap)
