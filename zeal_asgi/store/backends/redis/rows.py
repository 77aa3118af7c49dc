"""Single-row operations of the Redis backend: each one validated first, then one command.

Validation uses the table's rules (:mod:`zeal_asgi.shm.schema`) before any I/O, so errors and
returned types are the shared-memory table's; the scripts of :mod:`zeal_asgi._redis.scripts`
keep a row, its membership set and its expiry consistent in one atomic step.  What does not
change between calls (key prefixes, zero fields, column ranges) is computed once per table in
:class:`_Table`, and error messages are built only when something fails.

At its first use in a process, a table's declaration is stored at ``{prefix}:schema:{table}``
(or read from there): a second app declaring the same table differently on the same Redis and
prefix gets a SchemaError naming both declarations, instead of sharing rows silently.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from zeal_asgi._redis.config import RedisConfig
from zeal_asgi._redis.link import RedisLink
from zeal_asgi._redis.pipe import Template, pack
from zeal_asgi._redis.scripts import (
    CAS,
    DELETE,
    GET_FIELD,
    INCR_FLOAT,
    INCR_INT,
    SCHEMA,
    SET,
    KeyLayout,
    Script,
)
from zeal_asgi.errors import ConfigError, IntegerOverflowError
from zeal_asgi.shm.schema import Column, ColumnType
from zeal_asgi.store.backends.redis.counter import RedisCounter
from zeal_asgi.store.base import Key, TableSpec
from zeal_asgi.store.codec import RowCodec, encode_float, incr_nonfinite, incr_overflow

__all__ = ["INCR_INT", "SET", "RedisRows"]  # the two scripts: the store benchmark runs them raw

_TEMPLATES = 64
"""Packed script calls kept per table."""


class _Table(RowCodec):
    """What the row commands of one declared table need, computed once: its codec, and more."""

    def __init__(self, spec: TableSpec, layout: KeyLayout) -> None:
        super().__init__(spec.schema, spec.name)
        self.spec = spec
        self.layout = layout
        self.name = spec.name
        self.base = layout.table_base(spec.name)
        self.members = layout.members(spec.name)
        # ARGV[1], ARGV[2] of the row scripts: 't' tracked (SADD) or 'x' ttl (EXPIRE), ttl
        self.head: tuple[bytes, int] = (b"t" if spec.mode == "tracked" else b"x", spec.ttl or 0)
        zeros = self.zero_fields()
        self.zeros: tuple[Any, ...] = (len(zeros), *zeros)
        self.others: dict[str, tuple[Any, ...]] = {}
        """Per column: ``zeros`` without its own field (an increment writes that one)."""
        for col in spec.schema.columns:
            mine = self.zero_fields((col.name.encode("utf-8"),))
            self.others[col.name] = (len(mine), *mine)
        self.checked = False
        """Whether this process compared the declaration with the one stored in Redis."""
        self.templates: dict[object, Template] = {}
        """The EVALSHA of ``set`` per tuple of given fields."""
        self.ints: dict[str, tuple[Column, int, int, Template]] = {}
        """Per INT column incremented: :meth:`int_column`."""

    def template(self, what: object, args: tuple[Any, ...]) -> Template:
        """The EVALSHA ``args`` packed once (``None``: the holes filled per call), kept as
        ``what``; bounded, since the field tuples of ``set`` come from the caller."""
        if len(self.templates) >= _TEMPLATES:
            self.templates.clear()
        holes = [i for i, arg in enumerate(args) if arg is None]
        found = self.templates[what] = Template(args, holes)
        return found

    def int_column(self, col: Column) -> tuple[Column, int, int, Template]:
        """What ``incr`` of the INT column ``col`` needs: the column, its range, and its
        EVALSHA packed but for the row key, the member and the step (kept in ``ints``)."""
        lo, hi = col.int_range
        eight = b"1" if col.size == 8 else b"0"
        tail = (col.name, None, lo, hi, eight, *self.others[col.name])
        args = (b"EVALSHA", INCR_INT.sha, 2, None, self.members, *self.head, None, *tail)
        holes = [i for i, arg in enumerate(args) if arg is None]
        found = self.ints[col.name] = (col, lo, hi, Template(args, holes))
        return found

    def key(self, key: object) -> tuple[bytes, bytes]:
        """The validated raw key and its row key (the table's errors on a bad key)."""
        raw = self.spec.check_key(key)
        if raw.endswith(b"keys__") and raw.startswith(b"__"):
            # may collide with the membership set: KeyLayout.row escapes it
            return raw, self.layout.row(self.name, raw)
        return raw, self.base + raw


class RedisRows(RedisLink):
    """Table declarations and the single-row operations (base of ``RedisBackend``)."""

    def __init__(self, config: RedisConfig) -> None:
        super().__init__(config)
        self._tables: dict[str, _Table] = {}
        self._counters: dict[str, RedisCounter] = {}

    def declare(self, spec: TableSpec) -> None:
        """Register a table (no I/O; Redis needs no allocation)."""
        if "{" in spec.name or "}" in spec.name:
            raise ConfigError(
                f"table {spec.name!r}: braces are not allowed in table names on the redis "
                "backend (the table name is the Cluster hash tag)"
            )
        self._tables[spec.name] = _Table(spec, self.layout)

    def _table(self, spec: TableSpec) -> _Table:
        t = self._tables.get(spec.name)
        if t is None or (t.spec is not spec and t.spec != spec):
            self.declare(spec)
            return self._tables[spec.name]
        t.spec = spec  # an equal declaration: later calls take the identity check above
        return t

    async def _ensure(self, t: _Table) -> None:
        """Compare the table's declaration with the one stored in Redis (once per process)."""
        if t.checked:
            return
        mine = t.spec.declaration()
        stored = await self._conn.script(
            SCHEMA, (self.layout.schema(t.name),), (mine,), "schema check of", idempotent=True
        )
        if stored != mine:
            raise t.spec.conflict(stored, self._conn.where)
        t.checked = True

    def _script(
        self,
        t: _Table,
        script: Script,
        keys: tuple[bytes, ...],
        args: Any,
        what: str,
        *,
        idempotent: bool = True,
        packed: bytes | None = None,
    ) -> Awaitable[Any]:
        """Run ``script`` on ``t``'s keys (after the first-use schema check); awaited, the raw
        reply.  Checked tables go straight to the connector: no frame of its own."""
        if not t.checked:
            return self._checked(t, self._conn.script, script, keys, args, what, idempotent, packed)
        return self._conn.script(
            script, keys, args, what, idempotent=idempotent, table=t.name, packed=packed
        )

    def _call(self, t: _Table, args: tuple[Any, ...], what: str) -> Awaitable[Any]:
        """Send one idempotent command on ``t``'s keys (after the first-use schema check)."""
        if not t.checked:
            return self._checked(t, self._conn.call, args, what, True, None)
        return self._conn.call(args, what, idempotent=True, table=t.name)

    async def _checked(self, t: _Table, send: Callable[..., Awaitable[Any]], *args: Any) -> Any:
        """``await send(*args[:-2], idempotent=args[-2], table=t.name, packed=args[-1])`` after
        the schema check."""
        await self._ensure(t)
        return await send(*args[:-2], idempotent=args[-2], table=t.name, packed=args[-1])

    def row_key(self, table: str, key: Key) -> bytes:
        """The hash holding row ``key`` of ``table``."""
        return self.layout.row(table, key.encode("utf-8") if isinstance(key, str) else key)

    async def row_pttl(self, table: str, key: Key) -> int:
        """Milliseconds row ``key`` of ``table`` has left (-1: no expiry, -2: no row)."""
        args = ("PTTL", self.row_key(table, key))
        return int(await self._conn.call(args, "PTTL", idempotent=True, table=table))

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row`` into the row (new rows start zeroed), in one atomic script."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        fields = t.encode(row)
        names = tuple(fields)
        tpl = t.templates.get(names)
        if tpl is None:
            # every column given: no zeros to add
            full = fields and len(fields) == len(spec.schema.columns)
            zeros = [] if full else t.zero_fields(fields)
            pairs = [x for name in names for x in (name, None)]  # the values vary
            args = (*t.head, None, len(zeros), *zeros, *pairs)
            tpl = t.template(names, (b"EVALSHA", SET.sha, 2, None, t.members, *args))
        packed = tpl.fill(row_key, raw, *fields.values())
        await self._script(t, SET, (row_key, t.members), (), "set in", packed=packed)
        return True

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row in declaration order, or one field; ``None`` on a miss."""
        t = self._table(spec)
        _, row_key = t.key(key)
        col = None if field is None else spec.schema.column(field, spec.name)
        if col is None or len(spec.schema.columns) == 1:
            # a one-column row is its field: HGETALL, a plain command, costs Redis about half
            # what the field script does (the Cache's and the response cache's tables)
            reply = await self._call(t, ("HGETALL", row_key), "get from")
            if not reply:
                return None
            if isinstance(reply, list):
                it = iter(reply)
                reply = dict(zip(it, it, strict=True))
            if col is None:
                return t.decode(reply, key)
            return t.decode_value(col, reply.get(col.name.encode()), key)
        got = await self._script(t, GET_FIELD, (row_key,), (col.name.encode(),), "get from")
        if got is None:
            return None
        return t.decode_value(col, got[0] if got else None, key)

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row (and its membership); ``True`` if it existed."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        n = await self._script(t, DELETE, (row_key, t.members), (*t.head, raw), "delete from")
        return bool(n)

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists (and has not expired)."""
        t = self._table(spec)
        _, row_key = t.key(key)
        n = await self._call(t, ("EXISTS", row_key), "exists in")
        return bool(n)

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomically add ``by`` (a step the facade checked; range-checked like the table)."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        hot = t.ints.get(column) if column.__class__ is str else None
        if hot is None:
            col = spec.schema.column(column, spec.name)
            if col.type is ColumnType.INT:
                hot = t.int_column(col)
        if hot is not None:
            col, lo, hi, tpl = hot
            if col.size < 8 and not lo - hi <= by <= hi - lo:
                # also keeps the script's doubles exact: |value| < 2^31, |step| < 2^33
                raise IntegerOverflowError(
                    f"incr of column {col.name!r} of table {t.name!r} by {by} would leave "
                    f"[{lo}, {hi}] (INT({col.size})) from any value; the value is unchanged"
                )
            packed = tpl.fill(row_key, raw, b"%d" % by)
            script = INCR_INT
        else:
            nan_ok = b"1" if spec.schema.allow_nan else b"0"
            tail = (col.name, encode_float(by), nan_ok, *t.others[col.name])
            packed = pack((b"EVALSHA", INCR_FLOAT.sha, 2, row_key, t.members, *t.head, raw, *tail))
            script = INCR_FLOAT
        reply = await self._script(
            t, script, (row_key, t.members), (), "incr in", idempotent=False, packed=packed
        )
        if reply.__class__ is int:
            return int(reply)  # the script's own range-checked result
        status = reply[0]
        if status == b"ok":
            value: int | float = t.decode_value(col, reply[1], key)
            return value
        current = reply[-1]
        if status == b"overflow" or (status == b"err" and b"overflow" in bytes(reply[1])):
            raise incr_overflow(col, t.name, by, current.decode())
        if status == b"nonfinite":
            raise incr_nonfinite(col, t.name, by, current.decode())
        raise t.corrupt_error(col, key, bytes(current or b""), "is not a number")

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomically set ``column`` to ``new`` if it equals ``expected`` (missing row = zeros)."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        col = spec.schema.column(column, spec.name)
        exp = t.encode_value(column, expected)
        new_raw = t.encode_value(column, new)
        if col.type is ColumnType.FLOAT:
            kind, zero = b"f", float(expected) == 0.0
        else:
            kind, zero = (b"i", expected == 0) if col.type is ColumnType.INT else (b"s", not exp)
        args = (*t.head, raw, col.name, kind, exp, new_raw, b"1" if zero else b"0", *t.zeros)
        keys = (row_key, t.members)
        n = await self._script(t, CAS, keys, args, "compare_and_set in", idempotent=False)
        return bool(n)
