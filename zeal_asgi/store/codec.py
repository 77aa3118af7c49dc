"""Typed encoding of row fields to the byte strings Redis and Memcached store, and back.

Every network backend keeps a row's columns as byte strings: one hash field per column on Redis,
one packed value per row on Memcached.  This module owns both encodings so every backend returns
exactly what the shared-memory table returns: the full row in declaration order, typed ``int``,
``float``, ``str`` or ``bytes``, with zeros or empty values for columns a row never had.

Field encoding (one column, the bytes stored in a Redis hash field):

=========  ====================================================================================
INT        canonical decimal, ``b"-42"`` (what ``HINCRBY`` reads and writes)
FLOAT      ``repr()`` of the double, ``b"0.1"``, ``b"-0.0"``, ``b"1e+100"``, ``b"inf"``: parsing
           it back gives the identical double (Lua writes ``%.17g``, which round-trips too)
STRING     UTF-8 bytes
BYTES      the bytes themselves
=========  ====================================================================================

Row blob (one value per row, for stores without hashes such as Memcached)::

    b"ZR1" | 8-byte schema fingerprint | per column, in declaration order: u32 length + field

Decoding is strict: data that does not parse as its column's type or does not fit its column
(written by another program, or under another schema) raises
:class:`~zeal_asgi.errors.BackendResponseError` naming the table, key and column; it is never
coerced, clipped or silently zeroed.  Nothing here unpickles or evaluates anything.

Example::

    codec = RowCodec(spec.schema, spec.name)
    fields = codec.encode({"score": 3})          # {b"score": b"3"}, validated like the table
    row = codec.decode({b"score": b"3"}, "k")    # {"name": "", "score": 3}
"""

from __future__ import annotations

import hashlib
import math
import re
import struct
from collections.abc import Collection, Mapping
from typing import Any

from zeal_asgi.errors import (
    BackendResponseError,
    ColumnTypeError,
    IntegerOverflowError,
    NonFiniteFloatError,
)
from zeal_asgi.shm.schema import Column, ColumnType, Schema, validate_value

EMPTY_ROW_MARKER = b""
"""Hash field that keeps a row of a table without columns alive (Redis deletes empty hashes).

Column names are never empty, so it cannot collide with a column; decoding ignores it.
"""

_BLOB_MAGIC = b"ZR1"
_LEN = struct.Struct(">I")
_INT_RE = re.compile(rb"-?(?:0|[1-9][0-9]*)")
_FLOAT_RE = re.compile(
    rb"[+-]?(?:(?:[0-9]+\.?[0-9]*|\.[0-9]+)(?:[eE][+-]?[0-9]+)?|inf|infinity|nan)",
    re.IGNORECASE,
)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
"""The signed 64-bit range: of incr steps, counters and INT(8) columns."""
_ZERO_FIELD = {
    ColumnType.INT: b"0",
    ColumnType.FLOAT: b"0.0",
    ColumnType.STRING: b"",
    ColumnType.BYTES: b"",
}


def encode_float(value: float) -> bytes:
    """The stored form of a double: ``repr``, which parses back to the identical value."""
    return repr(float(value)).encode("ascii")


def decode_float(raw: bytes) -> float | None:
    """Parse a stored double (``repr`` or ``%.17g`` form); ``None`` when it is not one."""
    if _FLOAT_RE.fullmatch(raw) is None:
        return None
    return float(raw)


def int64(value: object, what: str) -> int:
    """``value`` as an int if it is one within the signed 64-bit range (no bool), else the
    typed error naming ``what``: one rule for incr steps and every Counter argument."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise ColumnTypeError(f"{what} takes an int, got {type(value).__name__}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise IntegerOverflowError(f"{what}: {value} is outside the signed 64-bit range")
    return int(value)


def check_step(col: Column, by: object, table: str, allow_nan: bool) -> int | float:
    """The step of ``incr`` on ``col`` (an int, or a float on FLOAT), or its typed error.

    One rule on every backend: INT takes an int within 64 bits; FLOAT an int or a float, finite
    unless the table allows NaN/inf; an int no double can hold is IntegerOverflowError.
    """
    if col.type is ColumnType.INT:
        if by.__class__ is int and INT64_MIN <= by <= INT64_MAX:
            return by  # the usual step, without building the error text
        return int64(by, f"incr on INT column {col.name!r} of table {table!r}")
    if col.type is ColumnType.FLOAT:
        if isinstance(by, bool) or not isinstance(by, (int, float)):
            raise ColumnTypeError(
                f"incr on FLOAT column {col.name!r} of table {table!r} takes an int or float, "
                f"got {type(by).__name__}"
            )
        try:
            step = float(by)
        except OverflowError:
            raise IntegerOverflowError(
                f"incr of FLOAT column {col.name!r} of table {table!r}: the int step is outside "
                "the range of a double"
            ) from None
        if not allow_nan and not math.isfinite(step):
            raise NonFiniteFloatError(f"incr step {by!r} is not finite")
        return step
    raise ColumnTypeError(
        f"incr needs an INT or FLOAT column; {col.name!r} of table {table!r} is {col.type.name}"
    )


def incr_overflow(col: Column, table: str, by: object, current: object) -> IntegerOverflowError:
    """The error of an ``incr`` that would leave ``col``'s range (``current`` stays)."""
    lo, hi = col.int_range
    return IntegerOverflowError(
        f"incr of column {col.name!r} of table {table!r} by {by} would leave [{lo}, {hi}] "
        f"(INT({col.size})); the value stays {current}"
    )


def incr_nonfinite(col: Column, table: str, by: object, current: object) -> NonFiniteFloatError:
    """The error of an ``incr`` that would make a FLOAT non-finite (``current`` stays)."""
    return NonFiniteFloatError(
        f"incr of column {col.name!r} of table {table!r} by {by!r} overflows to a non-finite "
        f"value; the value stays {current}"
    )


class RowCodec:
    """Encode and decode the rows of one table (its schema and name, for error messages)."""

    def __init__(self, schema: Schema, table: str) -> None:
        self.schema = schema
        self.table = table
        self._names = tuple(c.name.encode("utf-8") for c in schema.columns)
        self._known = {c.name: (c, n) for c, n in zip(schema.columns, self._names, strict=True)}
        blob = schema.to_blob() if schema.columns else b"{}"
        self.fingerprint = hashlib.blake2b(blob, digest_size=8).digest()
        """8 bytes identifying the schema, stored in every row blob."""

    # -- encoding (values are validated with the table's rules first) --------------------------

    def encode(self, row: object) -> dict[bytes, bytes]:
        """Validate ``row`` (a mapping of column -> value) and encode the given columns.

        Raises the table's typed errors (UnknownColumnError, ColumnTypeError, ...) before
        anything is sent anywhere.
        """
        schema, table, known = self.schema, self.table, self._known
        # a dict (the usual row) is checked column by column below, in one pass
        rows: Mapping[Any, Any] = row if type(row) is dict else schema.validate_row(row, table)
        out: dict[bytes, bytes] = {}
        for name, value in rows.items():
            if type(name) is str and name in known:
                col, field = known[name]
            else:  # UnknownColumnError naming the columns (or a str subclass)
                col = schema.column(name, table)
                field = col.name.encode("utf-8")
            out[field] = self._encode(col, validate_value(col, value, table, schema.allow_nan))
        return out

    def encode_value(self, column: str, value: object) -> bytes:
        """Validate and encode one value of ``column``."""
        col = self.schema.column(column, self.table)
        return self._encode(col, validate_value(col, value, self.table, self.schema.allow_nan))

    def zero_fields(self, given: Collection[bytes] = ()) -> list[bytes]:
        """Flat ``[field, value, ...]`` zeros for the columns not in ``given`` (a new row).

        A table without columns gets the :data:`EMPTY_ROW_MARKER` field, so the row exists.
        """
        if not self._names:
            return [EMPTY_ROW_MARKER, b""]
        out: list[bytes] = []
        for name, col in zip(self._names, self.schema.columns, strict=True):
            if name not in given:
                out += (name, _ZERO_FIELD[col.type])
        return out

    @staticmethod
    def _encode(col: Column, value: Any) -> bytes:
        if col.type is ColumnType.INT:
            return str(int(value)).encode("ascii")
        if col.type is ColumnType.FLOAT:
            return encode_float(value)
        if col.type is ColumnType.STRING:
            return str(value).encode("utf-8")
        return bytes(value)

    # -- decoding ------------------------------------------------------------------------------

    def decode(self, fields: Mapping[bytes, bytes], key: object) -> dict[str, Any] | None:
        """The full row (declaration order) from stored fields; ``None`` when there are none.

        Missing columns read as zero; fields that are not columns are ignored.
        """
        if not fields:
            return None
        return {
            col.name: self.decode_value(col, fields.get(name), key)
            for name, col in zip(self._names, self.schema.columns, strict=True)
        }

    def decode_value(self, col: Column, raw: bytes | None, key: object) -> Any:
        """One column's value from its stored bytes (``None``: the column's zero)."""
        if raw is None:
            raw = _ZERO_FIELD[col.type]
        if col.type is ColumnType.INT:
            if _INT_RE.fullmatch(raw) is None:
                raise self.corrupt_error(col, key, raw, "is not an integer")
            value = int(raw)
            lo, hi = col.int_range
            if not lo <= value <= hi:
                raise self.corrupt_error(
                    col, key, raw, f"is outside [{lo}, {hi}] (INT({col.size}))"
                )
            return value
        if col.type is ColumnType.FLOAT:
            fv = decode_float(raw)
            if fv is None:
                raise self.corrupt_error(col, key, raw, "is not a number")
            if not self.schema.allow_nan and not math.isfinite(fv):
                raise self.corrupt_error(
                    col, key, raw, "is not finite and the table refuses NaN/inf"
                )
            return fv
        if len(raw) > col.size:
            raise self.corrupt_error(
                col, key, raw, f"is {len(raw)} bytes, over the {col.size} limit"
            )
        if col.type is ColumnType.STRING:
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise self.corrupt_error(col, key, raw, "is not UTF-8") from None
        return bytes(raw)

    def corrupt_error(self, col: Column, key: object, raw: bytes, why: str) -> BackendResponseError:
        """The error for a stored value of ``col`` at ``key`` that is not valid (``why``)."""
        shown = raw[:40] + (b"..." if len(raw) > 40 else b"")
        return BackendResponseError(
            f"stored value of column {col.name!r} of table {self.table!r}, key {key!r}: {shown!r} "
            f"{why} (written by another program or under another schema?)"
        )

    # -- whole-row blobs (Memcached) -----------------------------------------------------------

    def pack(self, row: Mapping[str, Any]) -> bytes:
        """A full row (every column, already valid) as one blob; see the module docstring."""
        parts = [_BLOB_MAGIC, self.fingerprint]
        for col in self.schema.columns:
            field = self._encode(col, row[col.name])
            parts += (_LEN.pack(len(field)), field)
        return b"".join(parts)

    def unpack(self, blob: bytes, key: object) -> dict[str, Any]:
        """The row stored by :meth:`pack`; BackendResponseError when it is not one of ours."""
        where = f"stored row of table {self.table!r}, key {key!r}"
        if not blob.startswith(_BLOB_MAGIC):
            raise BackendResponseError(f"{where}: not a row blob")
        pos = len(_BLOB_MAGIC) + len(self.fingerprint)
        if blob[len(_BLOB_MAGIC) : pos] != self.fingerprint:
            raise BackendResponseError(
                f"{where} was written under another schema (fingerprint mismatch)"
            )
        row: dict[str, Any] = {}
        for col in self.schema.columns:
            start = pos + _LEN.size
            if start <= len(blob):
                pos = start + _LEN.unpack_from(blob, pos)[0]
            if start > len(blob) or pos > len(blob):
                raise BackendResponseError(f"{where} is truncated")
            row[col.name] = self.decode_value(col, blob[start:pos], key)
        if pos != len(blob):
            raise BackendResponseError(f"{where} has {len(blob) - pos} trailing bytes")
        return row

    # -- keys ----------------------------------------------------------------------------------

    def key_out(self, raw: bytes) -> str | bytes:
        """A stored key as the table returns it: ``bytes`` with binary keys, else ``str``."""
        if self.schema.binary_keys:
            return raw
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BackendResponseError(
                f"stored key {raw!r} of table {self.table!r} is not UTF-8 (the table was made "
                "without binary_keys)"
            ) from None
