"""Bad input (reliability.md §7, rows 1-16, 21, 22): a typed error naming the thing and the
limit, and the stored row left exactly as it was."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest

from zeal_asgi import Table
from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    InvalidKeyError,
    KeyTooLongError,
    KeyTypeError,
    NonFiniteFloatError,
    SchemaError,
    TableFullError,
    UnknownColumnError,
    ValueTooLargeError,
    ZealError,
)

MakeTable = Callable[..., Table]
COLS = {"name": ("string", 8), "n": ("int", 2), "n8": ("int", 8), "f": ("float",)}
ORIGINAL = {"name": "orig", "n": 7, "n8": 9, "f": 1.5}

CASES: list[tuple[str, Any, Any, type[Exception], tuple[str, ...]]] = [
    # (kind, key, row, error, words the message must contain)
    ("1 string too long", "k", {"name": "x" * 9}, ValueTooLargeError, ("'name'", "8 bytes", "9")),
    ("2 unknown column", "k", {"nope": 1}, UnknownColumnError, ("'nope'", "name")),
    ("3 str into int", "k", {"n": "5"}, ColumnTypeError, ("'n'", "INT(2)", "str")),
    ("4 float into int", "k", {"n": 1.9}, ColumnTypeError, ("'n'", "float", "1.9")),
    ("5 bool into int", "k", {"n": True}, ColumnTypeError, ("'n'", "bool")),
    ("6 None into a column", "k", {"name": None}, ColumnTypeError, ("'name'", "NoneType")),
    ("7 int outside INT(2)", "k", {"n": 40000}, IntegerOverflowError, ("'n'", "40000", "32767")),
    ("7 int below INT(2)", "k", {"n": -32769}, IntegerOverflowError, ("'n'", "-32768")),
    (
        "7 int outside int64",
        "k",
        {"n8": 2**63},
        IntegerOverflowError,
        ("'n8'", "9223372036854775807"),
    ),
    ("9 NaN into float", "k", {"f": math.nan}, NonFiniteFloatError, ("'f'", "nan")),
    ("9 inf into float", "k", {"f": math.inf}, NonFiniteFloatError, ("'f'", "inf")),
    ("9 huge int into float", "k", {"f": 2**64 + 1}, ColumnTypeError, ("'f'", "exactly")),
    ("10 key too long", "k" * 65, {"n": 1}, KeyTooLongError, ("65 bytes", "64 bytes")),
    ("11 empty key", "", {"n": 1}, InvalidKeyError, ("empty",)),
    ("13 lone surrogate key", "\udc80", {"n": 1}, InvalidKeyError, ("UTF-8",)),
    ("14 invalid UTF-8 bytes key (str mode)", b"\xff", {"n": 1}, InvalidKeyError, ("UTF-8",)),
    ("15 int key", 5, {"n": 1}, KeyTypeError, ("int",)),
    ("15 None key", None, {"n": 1}, KeyTypeError, ("NoneType",)),
    ("row not a mapping", "k", [1, 2, 3], ColumnTypeError, ("mapping",)),
    ("bytes into string", "k", {"name": b"x"}, ColumnTypeError, ("'name'", "BYTES")),
    ("surrogate in a string", "k", {"name": "\udc80"}, ColumnTypeError, ("'name'", "UTF-8")),
]


@pytest.mark.parametrize(("kind", "key", "row", "error", "words"), CASES, ids=[c[0] for c in CASES])
def test_set_rejects_and_keeps_the_row(
    make_table: MakeTable,
    kind: str,
    key: Any,
    row: Any,
    error: type[Exception],
    words: tuple[str, ...],
) -> None:
    t = make_table(4, COLS)
    t.set("k", ORIGINAL)
    with pytest.raises(error) as info:
        # a valid column first: all-or-nothing means it must not be written either
        t.set(key, {"n8": 123, **row} if isinstance(row, dict) else row)
    assert isinstance(info.value, ZealError)
    for w in words:
        assert w in str(info.value), (w, str(info.value))
    assert t.get("k") == ORIGINAL
    assert len(t) == 1


@pytest.mark.parametrize(
    ("column", "by", "error"),
    [
        ("n", 32767, IntegerOverflowError),  # 7 + 32767 leaves INT(2)
        ("n", -40000, IntegerOverflowError),
        ("n8", 2**63 - 1, IntegerOverflowError),  # 8: past int64, never wraps
        ("n8", 2**64, IntegerOverflowError),  # the step itself is outside int64
        ("n", 1.5, ColumnTypeError),
        ("n", True, ColumnTypeError),
        ("name", 1, ColumnTypeError),  # incr on a string column
        ("f", math.inf, NonFiniteFloatError),
        ("f", 1.7e308, NonFiniteFloatError),  # overflows to inf: refused, value kept
        ("nope", 1, UnknownColumnError),
    ],
)
def test_incr_rejects_and_keeps_the_value(
    make_table: MakeTable, column: str, by: Any, error: type[Exception]
) -> None:
    t = make_table(4, COLS)
    t.set("k", {**ORIGINAL, "n8": 2**62, "f": 1.7e308})
    before = t.get("k")
    with pytest.raises(error):
        t.incr("k", column, by)
    assert t.get("k") == before


def test_full_table_is_typed_and_keeps_rows(make_table: MakeTable) -> None:
    t = make_table(2, COLS)
    t.set("a", ORIGINAL)
    t.set("b", ORIGINAL)
    with pytest.raises(TableFullError) as info:
        t.set("c", ORIGINAL)
    assert isinstance(info.value, OverflowError) and "2 rows" in str(info.value)
    with pytest.raises(TableFullError):
        t.incr("c", "n")
    assert t.get("a") == t.get("b") == ORIGINAL and len(t) == 2


@pytest.mark.parametrize(
    ("max_rows", "columns", "kw", "words"),
    [
        (0, {"v": ("int", 4)}, {}, ("max_rows", "0")),
        (-5, {"v": ("int", 4)}, {}, ("max_rows",)),
        (10, {"v": ("string", 0)}, {}, ("'v'", "size")),
        (10, {"v": ("string", -1)}, {}, ("'v'",)),
        (10, {"v": ("int", 3)}, {}, ("'v'", "1, 2, 4 or 8")),
        (10, {"v": ("float", 4)}, {}, ("'v'", "8-byte")),
        (10, {"v": ("decimal", 4)}, {}, ("'v'", "unknown type")),
        (10, {"v": ("string",)}, {}, ("'v'", "size")),
        (10, {"": ("int", 4)}, {}, ("non-empty",)),
        (10, {"v": ("int", 4)}, {"key_size": 0}, ("key_size",)),
        (10, {f"c{i}": ("int", 1) for i in range(65)}, {}, ("64 columns",)),
        (True, {"v": ("int", 4)}, {}, ("max_rows",)),
    ],
)
def test_bad_schemas_are_value_errors(
    make_table: MakeTable, max_rows: Any, columns: Any, kw: dict[str, Any], words: tuple[str, ...]
) -> None:
    with pytest.raises(SchemaError) as info:
        make_table(max_rows, columns, **kw)
    assert isinstance(info.value, ValueError)
    for w in words:
        assert w in str(info.value), (w, str(info.value))


def test_binary_keys_mode_accepts_any_bytes(make_table: MakeTable) -> None:
    t = make_table(4, COLS, binary_keys=True)
    t.set(b"\xff\x00", {"n": 1})
    assert t.get(b"\xff\x00", "n") == 1
    assert list(t.keys()) == [b"\xff\x00"]


def test_allow_nan_opt_in(make_table: MakeTable) -> None:
    t = make_table(4, COLS, allow_nan=True)
    t.set("k", {"f": math.inf})
    assert t.get("k", "f") == math.inf
    t.set("k", {"f": math.nan})
    assert math.isnan(t.get("k", "f"))
