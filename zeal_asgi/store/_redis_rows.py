"""Single-row operations of the Redis backend: each one validated first, then one Lua script.

Validation uses the table's rules (:mod:`zeal_asgi.schema`) before any I/O, so errors and
returned types are the shared-memory table's; the scripts in :mod:`._redis_lua` keep a row, its
membership set and its expiry consistent in one atomic step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import ColumnTypeError, ConfigError, IntegerOverflowError, NonFiniteFloatError
from ..schema import ColumnType, validate_key
from ._redis_config import RedisConfig
from ._redis_conn import RedisConnector
from ._redis_lua import CAS, DELETE, INCR_FLOAT, INCR_INT, SET, KeyLayout, Script
from .base import Key, TableSpec
from .codec import RowCodec, encode_float

__all__ = ["RedisRows"]

_INT64 = (-(2**63), 2**63 - 1)
_GET_FIELD = Script(
    "get_field",
    "if redis.call('EXISTS', KEYS[1]) == 0 then return false end\n"
    "return {redis.call('HGET', KEYS[1], ARGV[1])}\n",
)


class RedisRows:
    """Table declarations and the single-row operations (base of ``RedisBackend``)."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.layout = KeyLayout(config.prefix)
        self._conn = RedisConnector(config)
        self._codecs: dict[str, RowCodec] = {}

    def declare(self, spec: TableSpec) -> None:
        """Register a table (no I/O; Redis needs no allocation)."""
        if "{" in spec.name or "}" in spec.name:
            raise ConfigError(
                f"table {spec.name!r}: braces are not allowed in table names on the redis "
                "backend (the table name is the Cluster hash tag)"
            )
        self._codecs[spec.name] = RowCodec(spec.schema, spec.name)

    def _codec(self, spec: TableSpec) -> RowCodec:
        codec = self._codecs.get(spec.name)
        if codec is None or codec.schema is not spec.schema:
            self.declare(spec)
            codec = self._codecs[spec.name]
        return codec

    def _ctx(self, spec: TableSpec, key: object) -> tuple[bytes, list[bytes], list[Any]]:
        """Validated raw key, KEYS (row, membership set) and the common ARGV head."""
        raw = validate_key(key, spec.name, spec.schema.key_limit, spec.schema.binary_keys)
        keys = [self.layout.row(spec.name, raw), self.layout.members(spec.name)]
        mode = b"t" if spec.mode == "tracked" else b"x"
        return raw, keys, [mode, spec.ttl or 0, raw]

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row`` into the row (new rows start zeroed), in one atomic script."""
        codec = self._codec(spec)
        _, keys, args = self._ctx(spec, key)
        fields = codec.encode(row)
        zeros = codec.zero_fields(fields)
        args += [len(zeros), *zeros, *_flat(fields)]
        await self._conn.run(
            lambda c: SET(c, keys, args), what=f"set in {spec.name!r}", idempotent=True
        )
        return True

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row in declaration order, or one field; ``None`` on a miss."""
        codec = self._codec(spec)
        _, keys, _ = self._ctx(spec, key)
        what = f"get from {spec.name!r}"
        if field is None:
            fields = await self._conn.run(lambda c: c.hgetall(keys[0]), what=what, idempotent=True)
            return codec.decode(fields, key)
        col = spec.schema.column(field, spec.name)
        name = col.name.encode("utf-8")
        reply = await self._conn.run(
            lambda c: _GET_FIELD(c, keys[:1], [name]), what=what, idempotent=True
        )
        if reply is None:
            return None
        return codec.decode_value(col, reply[0] if reply else None, key)

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row (and its membership); ``True`` if it existed."""
        _, keys, args = self._ctx(spec, key)
        n = await self._conn.run(
            lambda c: DELETE(c, keys, args), what=f"delete from {spec.name!r}", idempotent=True
        )
        return bool(n)

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists (and has not expired)."""
        _, keys, _ = self._ctx(spec, key)
        n = await self._conn.run(
            lambda c: c.exists(keys[0]), what=f"exists in {spec.name!r}", idempotent=True
        )
        return bool(n)

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomically add ``by`` (range-checked like the table; creates the row)."""
        codec = self._codec(spec)
        _, keys, args = self._ctx(spec, key)
        col = spec.schema.column(column, spec.name)
        where = f"column {column!r} of table {spec.name!r}"
        if col.type is ColumnType.INT:
            if not isinstance(by, int) or isinstance(by, bool):
                raise ColumnTypeError(
                    f"incr on INT column {column!r} of table {spec.name!r} takes an int, got "
                    f"{type(by).__name__}"
                )
            lo, hi = col.int_range
            if not _INT64[0] <= by <= _INT64[1]:
                raise IntegerOverflowError(
                    f"incr of {where} by {by}: the step is outside the signed 64-bit range"
                )
            if col.size < 8 and not lo - hi <= by <= hi - lo:
                raise IntegerOverflowError(
                    f"incr of {where} by {by} would leave [{lo}, {hi}] (INT({col.size})) from "
                    "any value; the value is unchanged"
                )
            zeros = codec.zero_fields()
            args += [col.name, by, lo, hi, b"1" if col.size == 8 else b"0", len(zeros), *zeros]
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
            zeros = codec.zero_fields()
            nan_ok = b"1" if spec.schema.allow_nan else b"0"
            args += [col.name, encode_float(step), nan_ok, len(zeros), *zeros]
            script = INCR_FLOAT
        else:
            raise ColumnTypeError(
                f"incr needs an INT or FLOAT column; {column!r} of table {spec.name!r} is "
                f"{col.type.name}"
            )
        reply = await self._conn.run(
            lambda c: script(c, keys, args), what=f"incr in {spec.name!r}", idempotent=False
        )
        status = bytes(reply[0])
        if status == b"ok":
            value: int | float = codec.decode_value(col, reply[1], key)
            return value
        current = reply[-1]
        if status == b"overflow" or (status == b"err" and b"overflow" in bytes(reply[1])):
            raise IntegerOverflowError(
                f"incr of {where} by {by} would leave [{col.int_range[0]}, {col.int_range[1]}] "
                f"(INT({col.size})); the value stays {current.decode()}"
            )
        if status == b"nonfinite":
            raise NonFiniteFloatError(
                f"incr of {where} by {by!r} overflows to a non-finite value; the value stays "
                f"{current.decode()}"
            )
        raise codec.corrupt_error(col, key, bytes(current or b""), "is not a number")

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomically set ``column`` to ``new`` if it equals ``expected`` (missing row = zeros)."""
        codec = self._codec(spec)
        _, keys, args = self._ctx(spec, key)
        col = spec.schema.column(column, spec.name)
        exp = codec.encode_value(column, expected)
        new_raw = codec.encode_value(column, new)
        if col.type is ColumnType.FLOAT:
            kind, zero = b"f", float(expected) == 0.0
        else:
            kind, zero = (b"i", expected == 0) if col.type is ColumnType.INT else (b"s", not exp)
        zeros = codec.zero_fields()
        args += [col.name, kind, exp, new_raw, b"1" if zero else b"0", len(zeros), *zeros]
        n = await self._conn.run(
            lambda c: CAS(c, keys, args), what=f"compare_and_set in {spec.name!r}", idempotent=False
        )
        return bool(n)


def _flat(fields: Mapping[bytes, bytes]) -> list[bytes]:
    out: list[bytes] = []
    for k, v in fields.items():
        out += (k, v)
    return out
