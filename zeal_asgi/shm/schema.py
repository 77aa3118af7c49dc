"""Table schemas: column declarations, their validation, and the row layout in shared memory.

The layout is computed here, deterministically from the declaration, and stored in the segment
header; a process attaching to an existing segment recomputes it from the stored schema, so every
worker agrees on where each column lives.
"""

from __future__ import annotations

import enum
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    InvalidKeyError,
    InvalidTTLError,
    KeyTooLongError,
    KeyTypeError,
    NonFiniteFloatError,
    SchemaError,
    UnknownColumnError,
    ValueTooLargeError,
)

MAX_COLUMNS = 64
MAX_KEY_SIZE = 4096
MAX_STRING_SIZE = 16 * 1024 * 1024
MAX_ROWS = 2**32 - 2
MAX_TTL = 10 * 365 * 86400.0
ROW_HEADER = 8
SEGMENT_HEADER = 4096
LOCK_SLOT = 64
PAGE = 4096
SCHEMA_BLOB_MAX = 2560


class ColumnType(enum.IntEnum):
    """Column types of a shared table (values match the C layer)."""

    INT = 1
    FLOAT = 2
    STRING = 3
    BYTES = 4


_TYPE_NAMES = {t.name.lower(): t for t in ColumnType} | {"str": ColumnType.STRING}
_ZERO = {ColumnType.INT: 0, ColumnType.FLOAT: 0.0, ColumnType.STRING: "", ColumnType.BYTES: b""}


@dataclass(frozen=True)
class Column:
    """One column: its declared type and size, and where it lives in a row."""

    name: str
    type: ColumnType
    size: int
    """INT: bytes (1/2/4/8); FLOAT: 8; STRING/BYTES: maximum length in bytes."""
    offset: int = 0
    width: int = 0
    """INT/FLOAT: value bytes; STRING/BYTES: length-prefix bytes."""

    @property
    def int_range(self) -> tuple[int, int]:
        """Inclusive range of an INT column."""
        bits = self.size * 8
        return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


class Geometry(NamedTuple):
    """Sizes and offsets of a table segment, in the order the extension takes them."""

    capacity: int
    row_size: int
    key_limit: int
    key_off: int
    n_stripes: int
    exp_off: int
    ttl_ns: int
    index_slots: int
    off_global: int
    off_stripes: int
    off_index: int
    off_rows: int
    total_size: int


def _pow2_at_least(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _align(n: int, a: int) -> int:
    return (n + a - 1) // a * a


def _size(what: str, value: object, high: int, unit: str = "") -> None:
    """SchemaError unless ``value`` is an int in ``[1, high]``."""
    if not isinstance(value, int) or isinstance(value, bool):
        raise SchemaError(f"{what} must be an int, got {value!r}")
    if not 1 <= value <= high:
        raise SchemaError(f"{what} must be between 1 and {high}{unit}, got {value}")


_FIXED_SIZES = {
    ColumnType.INT: ((1, 2, 4, 8), "INT size must be 1, 2, 4 or 8 bytes, got"),
    ColumnType.FLOAT: ((8,), "FLOAT is an 8-byte double, got size"),
}


def _column(name: object, spec: Any) -> Column:
    """The column ``name`` declared as ``type`` or ``(type, size)``, checked (not placed yet)."""
    if not isinstance(name, str) or not name:
        raise SchemaError(f"column names must be non-empty str, got {name!r}")
    if len(name.encode("utf-8", "surrogatepass")) > 64:
        raise SchemaError(f"column name {name[:20]!r}... is longer than 64 bytes")
    if isinstance(spec, (ColumnType, str, int)) and not isinstance(spec, bool):
        spec = (spec,)
    if not isinstance(spec, Sequence) or isinstance(spec, bytes) or not 1 <= len(spec) <= 2:
        raise SchemaError(
            f"column {name!r}: expected (type,) or (type, size), e.g. (Store.TYPE_INT, 4); "
            f"got {spec!r}"
        )
    raw, size = spec[0], (spec[1] if len(spec) == 2 else None)
    try:
        ctype = _TYPE_NAMES[raw.lower()] if isinstance(raw, str) else ColumnType(raw)
    except (KeyError, ValueError):
        raise SchemaError(
            f"column {name!r}: unknown type {raw!r}; use one of {sorted(_TYPE_NAMES)}"
        ) from None
    if size is not None and (not isinstance(size, int) or isinstance(size, bool)):
        raise SchemaError(f"column {name!r}: size must be an int, got {size!r}")
    if ctype in _FIXED_SIZES:
        sizes, rule = _FIXED_SIZES[ctype]
        size = 8 if size is None else size
        if size not in sizes:
            raise SchemaError(f"column {name!r}: {rule} {size}")
    elif size is None:
        raise SchemaError(f"column {name!r}: {ctype.name} needs a size in bytes")
    else:
        _size(f"column {name!r}: {ctype.name} size", size, MAX_STRING_SIZE, " bytes")
    return Column(name, ctype, size)


@dataclass(frozen=True)
class Schema:
    """A validated table schema and its row layout (computed from the declaration, so every
    worker places each column in the same place)."""

    columns: tuple[Column, ...]
    key_limit: int
    allow_nan: bool = False
    binary_keys: bool = False
    ttl: float | None = None
    """Seconds a row lives after its last write (``None``: rows never expire)."""
    row_size: int = field(init=False)
    key_off: int = field(init=False)
    exp_off: int = field(init=False)
    """Where a row keeps its expiry (0: nowhere, rows never expire)."""

    def __post_init__(self) -> None:
        """Place the columns in a row and set the derived fields (the declaration's ``columns``
        become the placed ones, in declaration order)."""
        placed: dict[str, Column] = {}
        # A row that expires keeps its deadline (8 bytes) first, aligned for atomic access.
        off = ROW_HEADER + (8 if self.ttl else 0)
        # Numeric columns first, widest first, so each is naturally aligned for atomic access.
        numeric = [c for c in self.columns if c.type in (ColumnType.INT, ColumnType.FLOAT)]
        for c in sorted(numeric, key=lambda c: -c.size):
            placed[c.name] = Column(c.name, c.type, c.size, off, c.size)
            off += c.size
        key_off = off
        off += max(self.key_limit, 4)  # a free row keeps its free-list link in the key area
        for c in self.columns:
            if c.type in (ColumnType.STRING, ColumnType.BYTES):
                width = 1 if c.size <= 0xFF else 2 if c.size <= 0xFFFF else 4
                placed[c.name] = Column(c.name, c.type, c.size, off, width)
                off += width + c.size
        # frozen: the derived fields are set once, here
        object.__setattr__(self, "columns", tuple(placed[c.name] for c in self.columns))
        object.__setattr__(self, "row_size", _align(off, 8))
        object.__setattr__(self, "key_off", key_off)
        object.__setattr__(self, "exp_off", ROW_HEADER if self.ttl else 0)

    @classmethod
    def declare(
        cls,
        columns: Mapping[str, Any],
        *,
        key_size: int = 64,
        allow_nan: bool = False,
        binary_keys: bool = False,
        ttl: float | None = None,
    ) -> Schema:
        """Validate a declaration such as ``{"name": (TYPE_STRING, 64), "n": (TYPE_INT, 4)}``.

        Raises:
            SchemaError: unknown types, non-positive or oversized sizes, bad or duplicate names.
            InvalidTTLError: a ``ttl`` that is not a number of seconds in (0, 10 years].
        """
        if not isinstance(columns, Mapping):
            raise SchemaError(f"columns must be a mapping of name -> (type, size), got {columns!r}")
        if len(columns) > MAX_COLUMNS:
            raise SchemaError(f"a table has at most {MAX_COLUMNS} columns, got {len(columns)}")
        _size("key_size", key_size, MAX_KEY_SIZE, " bytes")
        parsed = [_column(name, spec) for name, spec in columns.items()]
        if ttl is not None and (
            not isinstance(ttl, (int, float)) or isinstance(ttl, bool) or not 0 < ttl <= MAX_TTL
        ):
            raise InvalidTTLError(
                f"ttl must be a number of seconds in (0, {MAX_TTL:g}], got {ttl!r}"
            )
        return cls(tuple(parsed), key_size, allow_nan, binary_keys, ttl)

    def to_blob(self) -> bytes:
        """Canonical encoding stored in the segment header."""
        doc = {
            "v": 1,
            "columns": [[c.name, int(c.type), c.size] for c in self.columns],
            "key_limit": self.key_limit,
            "allow_nan": self.allow_nan,
            "binary_keys": self.binary_keys,
        }
        if self.ttl:
            doc["ttl"] = self.ttl
        blob = json.dumps(doc, separators=(",", ":"), sort_keys=True).encode()
        if len(blob) > SCHEMA_BLOB_MAX:
            raise SchemaError(
                f"schema description is {len(blob)} bytes; at most {SCHEMA_BLOB_MAX} fit the "
                "segment header (shorten column names or use fewer columns)"
            )
        return blob

    @classmethod
    def from_blob(cls, blob: bytes) -> Schema:
        """Rebuild the schema stored in a segment header."""
        doc = json.loads(blob)
        cols = tuple(Column(n, ColumnType(t), s) for n, t, s in doc["columns"])
        return cls(cols, doc["key_limit"], doc["allow_nan"], doc["binary_keys"], doc.get("ttl"))

    def column(self, name: object, table: str) -> Column:
        """The column called ``name``, or UnknownColumnError naming the table's columns."""

        for c in self.columns:
            if c.name == name:
                return c
        raise UnknownColumnError(
            f"table {table!r} has no column {name!r}; columns: {[c.name for c in self.columns]}"
        )

    def validate_row(self, row: object, table: str) -> dict[str, Any]:
        """Validate a whole row before anything is written (the table backend's rules)."""

        if not isinstance(row, Mapping):
            try:
                row = dict(row)  # type: ignore[call-overload]
            except (TypeError, ValueError):
                raise ColumnTypeError(
                    f"a row of table {table!r} is a mapping of column -> value, got "
                    f"{type(row).__name__}"
                ) from None
        assert isinstance(row, Mapping)
        return {
            name: validate_value(self.column(name, table), value, table, self.allow_nan)
            for name, value in row.items()
        }

    def zero_row(self) -> dict[str, Any]:
        """A new row: every column zero or empty, in declaration order."""
        return {c.name: _ZERO[c.type] for c in self.columns}

    def describe(self) -> dict[str, tuple[str, int]]:
        """``{column: (type name, size)}``, for messages and health output."""
        return {c.name: (c.type.name, c.size) for c in self.columns}

    def difference(self, other: Schema) -> str:
        """Column by column, how ``other`` differs from this schema (``""`` when it does not):
        ``column 'age': INT(8) vs missing; key_limit: 64 vs 128``."""
        mine, theirs = self.describe(), other.describe()

        def shown(col: tuple[str, int] | None) -> str:
            return "missing" if col is None else f"{col[0]}({col[1]})"

        parts = [
            f"column {name!r}: {shown(mine.get(name))} vs {shown(theirs.get(name))}"
            for name in dict.fromkeys([*mine, *theirs])
            if mine.get(name) != theirs.get(name)
        ]
        if not parts and list(mine) != list(theirs):
            parts.append(f"column order: {list(mine)} vs {list(theirs)}")
        for attr in ("key_limit", "allow_nan", "binary_keys", "ttl"):
            if getattr(self, attr) != getattr(other, attr):
                parts.append(f"{attr}: {getattr(self, attr)} vs {getattr(other, attr)}")
        return "; ".join(parts)

    def geometry(self, max_rows: int) -> Geometry:
        """Sizes of a segment holding ``max_rows`` rows of this schema.

        ``capacity == max_rows`` exactly: rows live in a dense pool, and the index is sized at
        least 1.5x the capacity, so a table never refuses a key before ``max_rows`` rows exist.
        """
        _size("max_rows", max_rows, MAX_ROWS)
        index_slots = max(16, _pow2_at_least(math.ceil(max_rows * 1.5)))
        n_stripes = min(1024, max(16, _pow2_at_least(max_rows // 64)))
        off_global = SEGMENT_HEADER
        off_stripes = off_global + LOCK_SLOT
        off_index = _align(off_stripes + n_stripes * LOCK_SLOT, 64)
        off_rows = _align(off_index + index_slots * 8, 64)
        total = _align(off_rows + max_rows * self.row_size, PAGE)
        return Geometry(
            max_rows, self.row_size, self.key_limit, self.key_off, n_stripes, self.exp_off,
            round(self.ttl * 1e9) if self.ttl else 0, index_slots,
            off_global, off_stripes, off_index, off_rows, total,
        )  # fmt: skip


# -- validation shared by every backend ----------------------------------------------------------
#
# Every backend validates here, so application code sees one behaviour whatever the backend; the
# shared-memory table accepts valid input in its compiled fast path and refuses through these.


def validate_key(key: object, table: str, key_limit: int, binary_keys: bool = False) -> bytes:
    """The UTF-8 bytes of a valid key, or the typed error the shared-memory table raises."""

    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(
                f"key {key!r} of table {table!r} is not encodable as UTF-8"
            ) from exc
    elif isinstance(key, bytes):
        raw = key
        if not binary_keys:
            try:
                key.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise InvalidKeyError(
                    f"key {key!r} of table {table!r} is not valid UTF-8; make the table with "
                    "binary_keys=True to store arbitrary bytes"
                ) from exc
    else:
        raise KeyTypeError(f"keys of table {table!r} are str or bytes, got {type(key).__name__}")
    if not raw:
        raise InvalidKeyError(f"empty key for table {table!r}")
    if len(raw) > key_limit:
        raise KeyTooLongError(
            f"key of {len(raw)} bytes exceeds the key limit of {key_limit} bytes of table "
            f"{table!r} (never truncated; raise key_size at make)"
        )
    return raw


def validate_value(col: Column, value: object, table: str, allow_nan: bool = False) -> Any:
    """The value as stored (an int, float, str or bytes), or the table's typed error."""

    if col.type is ColumnType.INT:
        if isinstance(value, int) and not isinstance(value, bool):
            lo, hi = col.int_range
            if not lo <= value <= hi:
                raise IntegerOverflowError(
                    f"column {col.name!r} of table {table!r} is INT({col.size}): {value} is "
                    f"outside [{lo}, {hi}]"
                )
            return int(value)
        raise ColumnTypeError(
            f"column {col.name!r} of table {table!r} is INT({col.size}); got "
            f"{type(value).__name__} {value!r} (no implicit conversion)"
        )
    if col.type is ColumnType.FLOAT:
        if isinstance(value, float):
            fv = float(value)
        elif isinstance(value, int) and not isinstance(value, bool):
            try:
                fv = float(value)
            except OverflowError:
                fv = 0.5
            if fv != value:
                raise ColumnTypeError(
                    f"column {col.name!r} of table {table!r} is FLOAT; the int {value} is not "
                    "exactly representable as a double"
                )
        else:
            raise ColumnTypeError(
                f"column {col.name!r} of table {table!r} is FLOAT; got {type(value).__name__} "
                f"{value!r}"
            )
        if not allow_nan and not math.isfinite(fv):
            raise NonFiniteFloatError(
                f"column {col.name!r} of table {table!r}: {value!r} is not finite (make the table "
                "with allow_nan=True to store NaN/inf)"
            )
        return fv
    if col.type is ColumnType.STRING:
        if not isinstance(value, str):
            raise ColumnTypeError(
                f"column {col.name!r} of table {table!r} is STRING({col.size}); got "
                f"{type(value).__name__} (use a BYTES column for binary data)"
            )
        try:
            n = len(value.encode("utf-8"))
        except UnicodeEncodeError as exc:
            raise ColumnTypeError(
                f"column {col.name!r} of table {table!r}: the string is not encodable as UTF-8"
            ) from exc
        out: Any = str(value)
    else:
        if not isinstance(value, bytes):
            raise ColumnTypeError(
                f"column {col.name!r} of table {table!r} is BYTES({col.size}); got "
                f"{type(value).__name__}"
            )
        n = len(value)
        out = bytes(value)
    if n > col.size:
        raise ValueTooLargeError(
            f"column {col.name!r} of table {table!r} holds {col.size} bytes; the value is {n} "
            "bytes (never truncated)"
        )
    return out
