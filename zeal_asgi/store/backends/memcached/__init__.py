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
- ``incr``/``decr``/``compare_and_set`` on rows use the same ``gets``/``cas`` loop, except on tables
  whose only column is INT(8): there the row *is* a native memcached counter and ``incr`` is one
  native command (see ``_memcached_native`` for the bias that makes unsigned ``incr`` exact for
  signed values, and its one caveat at the edge of the 64-bit range).  Smaller INT columns are not
  given native commands: their range edge is reachable, and a native step that overflows must be
  undone after the fact, which concurrent clients could observe.
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
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from zeal_asgi.errors import (
    ConfigError,
    IntegerOverflowError,
    ZealError,
)
from zeal_asgi.shm.schema import Column, validate_value
from zeal_asgi.store.backends.memcached.conn import (
    DEFAULT_SERVERS,
    KeyMapper,
    ServerPool,
    add_op,
    cas_op,
    parse_servers,
)
from zeal_asgi.store.backends.memcached.native import (
    MemcachedCounter,
    NativeOverflow,
    backoff,
    decode_i64,
    encode_i64,
    native_add,
    native_cas,
)
from zeal_asgi.store.backends.memcached.rows import (
    added,
    expiry,
    gather_all,
    native_column,
    seconds,
)
from zeal_asgi.store.base import Key, Row, StoreBackend, StoreBackendKind, TableSpec, counters
from zeal_asgi.store.codec import RowCodec

__all__ = ["MemcachedBackend", "MemcachedCounter"]

R = TypeVar("R")

_OPTIONS = {"servers", "prefix", "timeout", "cas_timeout", "pool_size", "on_error", "breaker"}
_MGET_CHUNK = 200
_MSET_CONCURRENCY = 32


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
        if isinstance(pool_size, bool) or not isinstance(pool_size, int) or pool_size < 1:
            raise ConfigError(f"memcached pool_size must be an int >= 1, got {pool_size!r}")
        if pool_size > 1024:
            raise ConfigError(f"memcached pool_size must be at most 1024, got {pool_size}")
        self.keys = KeyMapper(prefix)
        self.cas_timeout = seconds(cas_timeout, "cas_timeout")
        self.pool = ServerPool(
            parse_servers(servers), timeout=seconds(timeout, "timeout"), pool_size=pool_size
        )
        self._tables: dict[str, tuple[TableSpec, Column | None, RowCodec]] = {}
        self._checked: set[str] = set()
        self._counters: dict[str, MemcachedCounter] = {}

    @classmethod
    def from_config(cls, conn: str | Mapping[str, Any] | None = None) -> MemcachedBackend:
        """Build from a server list / URL or an options dict, validating without any I/O.

        Raises:
            ConfigError: a bad server, port, prefix, timeout or unknown option.
        """
        if conn is None or isinstance(conn, str):
            prefix = os.environ.get("ZEAL_KEY_PREFIX") or "zeal"
            return cls(conn, prefix=prefix)
        if not isinstance(conn, Mapping):
            raise ConfigError(f"memcached connection must be a str or a dict, got {conn!r}")
        unknown = set(conn) - _OPTIONS
        if unknown:
            raise ConfigError(
                f"memcached backend: unknown options {sorted(unknown)}; known: {sorted(_OPTIONS)}"
            )
        return cls(
            conn.get("servers"),
            prefix=conn.get("prefix") or os.environ.get("ZEAL_KEY_PREFIX") or "zeal",
            timeout=conn.get("timeout", 1.0),
            cas_timeout=conn.get("cas_timeout", 5.0),
            pool_size=conn.get("pool_size", 4),
        )

    @property
    def servers(self) -> str:
        """The server list, ``host:port,host:port``."""
        return ",".join(str(s) for s in self.pool.servers)

    @property
    def prefix(self) -> str:
        """The key prefix."""
        return self.keys.prefix

    def __repr__(self) -> str:
        return f"<MemcachedBackend {self.servers} prefix={self.prefix!r}>"

    # -- lifecycle -----------------------------------------------------------------------------

    def declare(self, spec: TableSpec) -> None:
        """Register a table (nothing is allocated: memcached needs no declaration)."""
        self._tables[spec.name] = (spec, native_column(spec), RowCodec(spec.schema, spec.name))

    def _layout(self, spec: TableSpec) -> tuple[Column | None, RowCodec]:
        known = self._tables.get(spec.name)
        if known is None or (known[0] is not spec and known[0] != spec):
            self.declare(spec)
            known = self._tables[spec.name]
        return known[1], known[2]

    async def _ensure(self, spec: TableSpec) -> None:
        """Store the table's declaration at first use, or refuse one that differs."""
        if spec.name in self._checked:
            return
        key, mine = self.keys.schema(spec.name), spec.declaration()
        i = self.pool.index(key)
        if not await self.pool.run(i, "schema check", lambda c: c.add(key, mine)):
            stored = await self.pool.run(i, "schema check", lambda c: c.get(key))
            if stored is not None and stored != mine:
                raise spec.conflict(stored, f"memcached {self.servers}")
        self._checked.add(spec.name)

    async def start(self) -> None:
        """Connect to every server in this worker; raises if one does not answer."""
        try:
            await gather_all(self._version(i) for i in range(len(self.pool.servers)))
        except ZealError as exc:
            raise type(exc)(
                f"memcached boot check failed: {exc} (the servers come from "
                "ZEAL_MEMCACHED_SERVERS or the servers option; ZEAL_ON_ERROR=fallback_table boots "
                "degraded)"
            ) from exc

    async def _version(self, i: int) -> bytes:
        return await self.pool.run(i, "version", lambda c: c.version())

    async def aclose(self) -> None:
        """Close this worker's connections."""
        await self.pool.aclose()

    async def ping(self) -> bool:
        """``True`` when every server answers ``version``."""
        results = await asyncio.gather(
            *(self._version(i) for i in range(len(self.pool.servers))), return_exceptions=True
        )
        return not any(isinstance(r, BaseException) for r in results)

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

    # -- rows ----------------------------------------------------------------------------------

    def _key(self, spec: TableSpec, key: object) -> bytes:
        return self.keys.row(spec.name, spec.check_key(key))

    def _decode(self, spec: TableSpec, key: object, data: bytes | None) -> Row | None:
        if data is None:
            return None
        col, codec = self._layout(spec)
        if col is not None:
            return {col.name: decode_i64(data, f"row {key!r} of table {spec.name!r}")}
        return codec.unpack(data, key)

    async def _update(
        self,
        spec: TableSpec,
        key: object,
        mk: bytes,
        what: str,
        change: Callable[[Row, bool], tuple[bool, R]],
    ) -> R:
        """Read-modify-write of one row with ``gets`` + ``cas``/``add``, retried until it wins.

        ``change(row, present)`` edits ``row`` (the stored row, or zeros) in place and returns
        ``(write, result)``; it may raise a typed error, and then nothing is written.
        """
        i = self.pool.index(mk)
        deadline = time.monotonic() + self.cas_timeout
        attempt = 0
        exptime = expiry(spec)
        codec = self._layout(spec)[1]
        while True:
            data, token = await self.pool.run(i, what, lambda c: c.gets(mk))
            row = self._decode(spec, key, data)
            present = row is not None
            if row is None:
                row = spec.schema.zero_row()
            write, result = change(row, present)
            if not write:
                return result
            blob = codec.pack(row)
            if data is not None and token is not None:
                stored = await self.pool.run(i, what, cas_op(mk, blob, token, exptime))
            else:
                stored = await self.pool.run(i, what, add_op(mk, blob, exptime))
            if stored:
                return result
            attempt += 1
            await backoff(attempt, deadline, f"{what} of table {spec.name!r}")

    async def _write(self, spec: TableSpec, key: object, mk: bytes, values: Row) -> None:
        await self._ensure(spec)
        i = self.pool.index(mk)
        exptime = expiry(spec)
        col, codec = self._layout(spec)
        if values and (col is not None or len(values) == len(spec.schema.columns)):
            # Every column given: the merge result does not depend on the stored row.
            data = encode_i64(values[col.name]) if col is not None else codec.pack(values)
            await self.pool.run(i, "set", lambda c: c.set(mk, data, exptime))
            return
        if col is not None:  # an empty row: create a zero row, or only refresh the expiry
            created = await self.pool.run(i, "set", lambda c: c.add(mk, encode_i64(0), exptime))
            if not created and exptime:
                await self.pool.run(i, "set", lambda c: c.touch(mk, exptime))
            return

        def merge(row: Row, present: bool) -> tuple[bool, None]:
            row.update(values)
            return (bool(values) or not present or exptime != 0), None

        await self._update(spec, key, mk, "set", merge)

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row`` into the row at ``key`` (a new row starts zeroed); ``True``."""
        mk = self._key(spec, key)
        values = spec.schema.validate_row(row, spec.name)
        await self._write(spec, key, mk, values)
        return True

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row (declaration order) or one field; ``None`` on a miss."""
        mk = self._key(spec, key)
        if field is not None:
            spec.schema.column(field, spec.name)
        await self._ensure(spec)
        data = await self.pool.run(self.pool.index(mk), "get", lambda c: c.get(mk))
        row = self._decode(spec, key, data)
        if row is None or field is None:
            return row
        return row[field]

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row; ``True`` if it existed."""
        mk = self._key(spec, key)
        await self._ensure(spec)
        return await self.pool.run(self.pool.index(mk), "delete", lambda c: c.delete(mk))

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists."""
        mk = self._key(spec, key)
        await self._ensure(spec)
        data = await self.pool.run(self.pool.index(mk), "exists", lambda c: c.get(mk))
        return data is not None

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomically add ``by`` (a step the facade checked) to a numeric column, creating the
        row; the new value."""
        mk = self._key(spec, key)
        col = spec.schema.column(column, spec.name)
        await self._ensure(spec)
        if self._layout(spec)[0] is not None:
            try:
                return await native_add(
                    self.pool,
                    mk,
                    int(by),
                    what=f"incr of table {spec.name!r}",
                    exptime=expiry(spec),
                    cas_timeout=self.cas_timeout,
                )
            except NativeOverflow as exc:
                lo, hi = col.int_range
                raise IntegerOverflowError(
                    f"incr of column {col.name!r} of table {spec.name!r} by {by} would leave "
                    f"[{lo}, {hi}] (INT({col.size})); the value stays {exc.before}"
                ) from None

        def add(row: Row, present: bool) -> tuple[bool, int | float]:
            new = added(col, row[col.name], by, spec.name, spec.schema.allow_nan)
            row[col.name] = new
            return True, new

        return await self._update(spec, key, mk, "incr", add)

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Set ``column`` to ``new`` if it equals ``expected`` (a missing row compares as zeros)."""
        col = spec.schema.column(column, spec.name)  # before the key, like the table backend
        mk = self._key(spec, key)
        allow_nan = spec.schema.allow_nan
        want = validate_value(col, expected, spec.name, allow_nan)
        value = validate_value(col, new, spec.name, allow_nan)
        await self._ensure(spec)
        if self._layout(spec)[0] is not None:
            return await native_cas(
                self.pool,
                mk,
                want,
                value,
                what=f"compare_and_set of table {spec.name!r}",
                exptime=expiry(spec),
                cas_timeout=self.cas_timeout,
            )

        def swap(row: Row, present: bool) -> tuple[bool, bool]:
            if row[col.name] != want:
                return False, False
            row[col.name] = value
            return True, True

        return await self._update(spec, key, mk, "compare_and_set", swap)

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys`` in order (``None`` for misses): one multi-get per server."""
        mks = [self._key(spec, k) for k in keys]
        if mks:
            await self._ensure(spec)
        by_server: dict[int, list[bytes]] = {}
        for mk in dict.fromkeys(mks):
            by_server.setdefault(self.pool.index(mk), []).append(mk)

        async def fetch(i: int, chunk: list[bytes]) -> dict[bytes, bytes | None]:
            values = await self.pool.run(i, "mget", lambda c: c.multi_get(*chunk))
            return dict(zip(chunk, values, strict=True))

        found: dict[bytes, bytes | None] = {}
        for part in await gather_all(
            fetch(i, group[n : n + _MGET_CHUNK])
            for i, group in by_server.items()
            for n in range(0, len(group), _MGET_CHUNK)
        ):
            found.update(part)
        return [self._decode(spec, k, found.get(mk)) for k, mk in zip(keys, mks, strict=True)]

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

        await gather_all(one(k, mk, v) for k, mk, v in work)
        return len(work)

    # -- counters ------------------------------------------------------------------------------

    def counter(self, name: str, initial: int) -> MemcachedCounter:
        """The counter ``{prefix}:counter:{name}``; ``initial`` is written with ``add``."""
        if not isinstance(name, str) or not name:
            raise ConfigError(f"counter name must be a non-empty str, got {name!r}")
        c = self._counters.get(name)
        if c is None or c.initial != initial:
            c = MemcachedCounter(
                self.pool, self.keys.counter(name), name, initial, cas_timeout=self.cas_timeout
            )
            self._counters[name] = c
        return c
