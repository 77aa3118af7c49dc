"""Single-row operations of the Redis backend: each one validated first, then one command.

Validation uses the table's rules (:mod:`zeal_asgi.shm.schema`) before any I/O, so errors and
returned types are the shared-memory table's; the scripts in :mod:`._redis_lua` keep a row, its
membership set and its expiry consistent in one atomic step.  What does not change between
calls (key prefixes, zero fields, column ranges) is computed once per table in :class:`_Table`,
and error messages are built only when something fails.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from zeal_asgi._redis.config import RedisConfig
from zeal_asgi._redis.connector import RedisConnector
from zeal_asgi._redis.scripts import CAS, DELETE, INCR_FLOAT, INCR_INT, SET, KeyLayout, Script
from zeal_asgi.errors import ColumnTypeError, ConfigError, IntegerOverflowError, NonFiniteFloatError
from zeal_asgi.shm.schema import Column, ColumnType, validate_key
from zeal_asgi.store.base import Key, TableSpec
from zeal_asgi.store.codec import RowCodec, encode_float

__all__ = ["INCR_INT", "SET", "RedisRows"]  # the two scripts: the store benchmark runs them raw

_INT64 = (-(2**63), 2**63 - 1)
_GET_FIELD = Script(
    "get_field",
    "if redis.call('EXISTS', KEYS[1]) == 0 then return false end\n"
    "return {redis.call('HGET', KEYS[1], ARGV[1])}\n",
)
_HGETALL = "HGETALL"
_EXISTS = "EXISTS"
_OK = b"ok"


class _Table:
    """What the row commands of one declared table need, computed once."""

    __slots__ = (
        "base",
        "binary",
        "codec",
        "head",
        "key_limit",
        "layout",
        "members",
        "name",
        "spec",
        "zeros",
    )

    def __init__(self, spec: TableSpec, layout: KeyLayout) -> None:
        self.spec = spec
        self.layout = layout
        self.name = spec.name
        self.codec = RowCodec(spec.schema, spec.name)
        self.base = layout.table_base(spec.name)
        self.members = layout.members(spec.name)
        self.key_limit = spec.schema.key_limit
        self.binary = spec.schema.binary_keys
        # ARGV[1], ARGV[2] of the row scripts: 't' tracked (SADD) or 'x' ttl (EXPIRE), ttl
        self.head: tuple[bytes, int] = (b"t" if spec.mode == "tracked" else b"x", spec.ttl or 0)
        zeros = self.codec.zero_fields()
        self.zeros: tuple[Any, ...] = (len(zeros), *zeros)

    def key(self, key: object) -> tuple[bytes, bytes]:
        """The validated raw key and its row key (the table's errors on a bad key)."""
        raw = validate_key(key, self.name, self.key_limit, self.binary)
        if raw.endswith(b"keys__") and raw.startswith(b"__"):
            # may collide with the membership set: KeyLayout.row escapes it
            return raw, self.layout.row(self.name, raw)
        return raw, self.base + raw


class RedisRows:
    """Table declarations and the single-row operations (base of ``RedisBackend``)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.layout = KeyLayout(config.prefix)
        self._conn = RedisConnector(config)
        self._tables: dict[str, _Table] = {}

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
        if t is not None and t.spec is spec:
            return t
        if t is None or t.spec != spec:
            self.declare(spec)
            return self._tables[spec.name]
        t.spec = spec  # an equal declaration: later calls take the identity check above
        return t

    def _codec(self, spec: TableSpec) -> RowCodec:
        return self._table(spec).codec

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row`` into the row (new rows start zeroed), in one atomic script."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        codec = t.codec
        fields = codec.encode(row)
        if fields and len(fields) == len(codec.schema.columns):
            args: list[Any] = [*t.head, raw, 0]  # every column given: no zeros to add
        else:
            zeros = codec.zero_fields(fields)
            args = [*t.head, raw, len(zeros), *zeros]
        for k, v in fields.items():
            args += (k, v)
        await self._conn.script(
            SET, (row_key, t.members), args, "set in", idempotent=True, table=t.name
        )
        return True

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row in declaration order, or one field; ``None`` on a miss."""
        t = self._table(spec)
        _, row_key = t.key(key)
        if field is None:
            reply = await self._conn.call(
                (_HGETALL, row_key), "get from", idempotent=True, table=t.name
            )
            if not reply:
                return None
            if isinstance(reply, list):
                it = iter(reply)
                reply = dict(zip(it, it, strict=True))
            return t.codec.decode(reply, key)
        col = spec.schema.column(field, spec.name)
        got = await self._conn.script(
            _GET_FIELD,
            (row_key,),
            (col.name.encode("utf-8"),),
            "get from",
            idempotent=True,
            table=t.name,
        )
        if got is None:
            return None
        return t.codec.decode_value(col, got[0] if got else None, key)

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row (and its membership); ``True`` if it existed."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        n = await self._conn.script(
            DELETE,
            (row_key, t.members),
            (*t.head, raw),
            "delete from",
            idempotent=True,
            table=t.name,
        )
        return bool(n)

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists (and has not expired)."""
        t = self._table(spec)
        _, row_key = t.key(key)
        n = await self._conn.call((_EXISTS, row_key), "exists in", idempotent=True, table=t.name)
        return bool(n)

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomically add ``by`` (range-checked like the table; creates the row)."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        col = spec.schema.column(column, spec.name)
        if col.type is ColumnType.INT:
            if not isinstance(by, int) or isinstance(by, bool):
                raise ColumnTypeError(
                    f"incr on INT column {column!r} of table {spec.name!r} takes an int, got "
                    f"{type(by).__name__}"
                )
            lo, hi = col.int_range
            if not _INT64[0] <= by <= _INT64[1]:
                raise IntegerOverflowError(
                    f"incr of {_where(col, t)} by {by}: the step is outside the signed 64-bit range"
                )
            if col.size < 8 and not lo - hi <= by <= hi - lo:
                raise IntegerOverflowError(
                    f"incr of {_where(col, t)} by {by} would leave [{lo}, {hi}] (INT({col.size})) "
                    "from any value; the value is unchanged"
                )
            args: tuple[Any, ...] = (
                *t.head,
                raw,
                col.name,
                by,
                lo,
                hi,
                b"1" if col.size == 8 else b"0",
                *t.zeros,
            )
            script = INCR_INT
        elif col.type is ColumnType.FLOAT:
            if isinstance(by, bool) or not isinstance(by, (int, float)):
                raise ColumnTypeError(
                    f"incr on FLOAT column {column!r} of table {spec.name!r} takes an int or "
                    f"float, got {type(by).__name__}"
                )
            try:
                step = float(by)
            except OverflowError:
                raise IntegerOverflowError(f"incr step {by} does not fit a double") from None
            if not spec.schema.allow_nan and not math.isfinite(step):
                raise NonFiniteFloatError(f"incr step {by!r} is not finite")
            nan_ok = b"1" if spec.schema.allow_nan else b"0"
            args = (*t.head, raw, col.name, encode_float(step), nan_ok, *t.zeros)
            script = INCR_FLOAT
        else:
            raise ColumnTypeError(
                f"incr needs an INT or FLOAT column; {column!r} of table {spec.name!r} is "
                f"{col.type.name}"
            )
        reply = await self._conn.script(
            script, (row_key, t.members), args, "incr in", idempotent=False, table=t.name
        )
        status = reply[0]
        if status == _OK:
            value: int | float = t.codec.decode_value(col, reply[1], key)
            return value
        current = reply[-1]
        if status == b"overflow" or (status == b"err" and b"overflow" in bytes(reply[1])):
            raise IntegerOverflowError(
                f"incr of {_where(col, t)} by {by} would leave [{col.int_range[0]}, "
                f"{col.int_range[1]}] (INT({col.size})); the value stays {current.decode()}"
            )
        if status == b"nonfinite":
            raise NonFiniteFloatError(
                f"incr of {_where(col, t)} by {by!r} overflows to a non-finite value; the value "
                f"stays {current.decode()}"
            )
        raise t.codec.corrupt_error(col, key, bytes(current or b""), "is not a number")

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomically set ``column`` to ``new`` if it equals ``expected`` (missing row = zeros)."""
        t = self._table(spec)
        raw, row_key = t.key(key)
        codec = t.codec
        col = spec.schema.column(column, spec.name)
        exp = codec.encode_value(column, expected)
        new_raw = codec.encode_value(column, new)
        if col.type is ColumnType.FLOAT:
            kind, zero = b"f", float(expected) == 0.0
        else:
            kind, zero = (b"i", expected == 0) if col.type is ColumnType.INT else (b"s", not exp)
        args = (*t.head, raw, col.name, kind, exp, new_raw, b"1" if zero else b"0", *t.zeros)
        n = await self._conn.script(
            CAS, (row_key, t.members), args, "compare_and_set in", idempotent=False, table=t.name
        )
        return bool(n)


def _where(col: Column, t: _Table) -> str:
    return f"column {col.name!r} of table {t.name!r}"


def _flat(fields: Mapping[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for k, v in fields.items():
        out += (k, v)
    return out
