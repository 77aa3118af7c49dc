"""The field codec shared by the Redis and Memcached backends: exact, typed and strict."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import given, settings, strategies as st

from zeal_asgi.errors import (
    BackendResponseError,
    ColumnTypeError,
    IntegerOverflowError,
    UnknownColumnError,
    ValueTooLargeError,
)
from zeal_asgi.shm.schema import Schema
from zeal_asgi.store.codec import EMPTY_ROW_MARKER, RowCodec, decode_float, encode_float

from .conftest import COLUMNS

SCHEMA = Schema.declare(COLUMNS)
CODEC = RowCodec(SCHEMA, "t")


@settings(max_examples=300, deadline=None)
@given(st.floats(allow_nan=False, allow_infinity=False))
def test_float_round_trip_is_exact(x: float) -> None:
    raw = encode_float(x)
    back = decode_float(raw)
    assert back is not None and back == x and math.copysign(1, back) == math.copysign(1, x)
    # the form Lua writes after an incr (%.17g) parses to the same double too
    assert decode_float(f"{x:.17g}".encode()) == x


@settings(max_examples=200, deadline=None)
@given(
    st.fixed_dictionaries(
        {},
        optional={
            "name": st.text(max_size=4),
            "i1": st.integers(-128, 127),
            "i8": st.integers(-(2**63), 2**63 - 1),
            "f": st.floats(allow_nan=False, allow_infinity=False),
            "b": st.binary(max_size=8),
        },
    )
)
def test_row_round_trip(row: dict[str, Any]) -> None:
    fields = CODEC.encode(row)
    stored = dict(zip(CODEC.zero_fields(fields)[::2], CODEC.zero_fields(fields)[1::2], strict=True))
    stored.update(fields)
    out = CODEC.decode(stored, "k")
    assert out == {**SCHEMA.zero_row(), **row}
    assert list(out or {}) == [c.name for c in SCHEMA.columns]  # declaration order
    assert CODEC.unpack(CODEC.pack(out or {}), "k") == out


def test_decode_missing_and_extra_fields() -> None:
    assert CODEC.decode({}, "k") is None
    row = CODEC.decode({b"i4": b"-7", b"not_a_column": b"x"}, "k")
    assert row == {**SCHEMA.zero_row(), "i4": -7}
    assert isinstance(row and row["f"], float) and isinstance(row and row["b"], bytes)


def test_encode_validates_like_the_table() -> None:
    with pytest.raises(UnknownColumnError):
        CODEC.encode({"nope": 1})
    with pytest.raises(ColumnTypeError):
        CODEC.encode({"i4": 1.5})
    with pytest.raises(ColumnTypeError):
        CODEC.encode({"i4": True})
    with pytest.raises(IntegerOverflowError):
        CODEC.encode({"i1": 128})
    with pytest.raises(ValueTooLargeError):
        CODEC.encode({"name": "x" * 17})
    assert CODEC.encode({"f": 3}) == {b"f": b"3.0"}


@pytest.mark.parametrize(
    ("field", "raw", "why"),
    [
        (b"i4", b"12abc", "not an integer"),
        (b"i4", b" 12", "not an integer"),
        (b"i4", b"1_000", "not an integer"),
        (b"i1", b"300", "outside [-128, 127]"),
        (b"f", b"one", "not a number"),
        (b"f", b"inf", "not finite"),
        (b"name", b"\xff\xfe", "not UTF-8"),
        (b"name", b"x" * 17, "over the 16 limit"),
        (b"b", b"123456789", "over the 8 limit"),
    ],
)
def test_foreign_data_is_refused_not_coerced(field: bytes, raw: bytes, why: str) -> None:
    with pytest.raises(BackendResponseError) as info:
        CODEC.decode({field: raw}, "k")
    assert why in str(info.value) and "'t'" in str(info.value)


def test_blob_checks() -> None:
    blob = CODEC.pack(SCHEMA.zero_row())
    other = RowCodec(Schema.declare({"x": ("int", 4)}), "t")
    with pytest.raises(BackendResponseError, match="another schema"):
        other.unpack(blob, "k")
    with pytest.raises(BackendResponseError, match="truncated"):
        CODEC.unpack(blob[:-1] if blob[-1:] else blob[:-5], "k")
    with pytest.raises(BackendResponseError, match="trailing"):
        CODEC.unpack(blob + b"x", "k")
    with pytest.raises(BackendResponseError, match="not a row blob"):
        CODEC.unpack(b"pickle\x80", "k")


def test_empty_schema_and_keys() -> None:
    empty = RowCodec(Schema.declare({}), "e")
    assert empty.zero_fields() == [EMPTY_ROW_MARKER, b""]
    assert empty.decode({EMPTY_ROW_MARKER: b""}, "k") == {}
    assert CODEC.key_out(b"caf\xc3\xa9") == "café"
    with pytest.raises(BackendResponseError):
        CODEC.key_out(b"\xff")
    binary = RowCodec(Schema.declare({}, binary_keys=True), "e")
    assert binary.key_out(b"\xff\x00") == b"\xff\x00"
