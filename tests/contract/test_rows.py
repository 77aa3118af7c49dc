"""Rows: round trips of every column type, merge semantics, misses, keys (str, bytes, NUL, unicode).

The shared-memory table is the reference; every other backend must answer the same, value for
value and type for type.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from zeal_asgi import Table
from zeal_asgi.errors import UnsupportedOperationError
from zeal_asgi.store import Store

from ._support import COLUMNS, LISTING, ZERO_ROW, StoreMaker

FULL_ROWS: list[dict[str, Any]] = [
    {
        "name": "alice",
        "i1": 7,
        "i2": -300,
        "i4": 70_000,
        "i8": 2**40,
        "f": 0.1,
        "b": b"\x00\x01\xff",
    },
    {
        "name": "x" * 16,
        "i1": -128,
        "i2": 32_767,
        "i4": -(2**31),
        "i8": 2**63 - 1,
        "f": -1.7976931348623157e308,
        "b": b"\xff" * 8,
    },
    {"name": "", "i1": 127, "i2": -32_768, "i4": 2**31 - 1, "i8": -(2**63), "f": 5e-324, "b": b""},
    {"name": "a\x00b\x00", "i1": -1, "i2": 1, "i4": -1, "i8": 1, "f": -0.0, "b": b"ab\x00\x00"},
]


def assert_same_row(got: Any, want: dict[str, Any]) -> None:
    """Equal values, the exact Python types, declaration order, and floats bit for bit."""
    assert isinstance(got, dict), f"expected a row dict, got {got!r}"
    assert list(got) == list(COLUMNS), f"columns {list(got)} not in declaration order"
    assert got == want
    for name, value in want.items():
        assert type(got[name]) is type(value), f"{name}: {type(got[name]).__name__}"
        if isinstance(value, float):
            assert repr(got[name]) == repr(value), f"{name}: {got[name]!r} != {value!r}"


@pytest.mark.parametrize("row", FULL_ROWS, ids=["typical", "extremes", "other-extremes", "nuls"])
async def test_full_row_round_trips_with_exact_types(store: Store, row: dict[str, Any]) -> None:
    assert await store.set("t", "k", row) is True
    assert_same_row(await store.get_strict("t", "k"), row)
    assert_same_row(await store.get("t", "k"), row)
    # A second write of the same row is not a merge artefact.
    assert await store.set("t", "k", row) is True
    assert_same_row(await store.get_strict("t", "k"), row)


@pytest.mark.parametrize("column", list(COLUMNS))
async def test_one_field_get_returns_that_value_and_type(store: Store, column: str) -> None:
    row = FULL_ROWS[1]
    await store.set("t", "k", row)
    for getter in (store.get, store.get_strict):
        value = await getter("t", "k", column)
        assert value == row[column] and type(value) is type(row[column])


async def test_only_the_given_columns_change(store: Store) -> None:
    await store.set("t", "k", FULL_ROWS[0])
    await store.set("t", "k", {"i4": 5, "b": b"new"})
    assert_same_row(await store.get_strict("t", "k"), {**FULL_ROWS[0], "i4": 5, "b": b"new"})
    await store.set("t", "k", {"name": "bob"})
    want = {**FULL_ROWS[0], "i4": 5, "b": b"new", "name": "bob"}
    assert_same_row(await store.get_strict("t", "k"), want)


async def test_a_new_row_reads_as_zeros_and_empties(store: Store) -> None:
    await store.set("t", "partial", {"name": "bob"})
    assert_same_row(await store.get_strict("t", "partial"), {**ZERO_ROW, "name": "bob"})
    assert await store.get_strict("t", "partial", "f") == 0.0
    # An empty row creates an all-zero row, as on the shared-memory table.
    assert await store.set("t", "empty", {}) is True
    assert await store.exists("t", "empty") is True
    assert_same_row(await store.get_strict("t", "empty"), ZERO_ROW)


async def test_a_deleted_row_leaves_nothing_behind(store: Store) -> None:
    await store.set("t", "k", FULL_ROWS[1])
    assert await store.delete("t", "k") is True
    await store.set("t", "k", {"i4": 1})
    assert_same_row(await store.get_strict("t", "k"), {**ZERO_ROW, "i4": 1})


async def test_a_float_column_takes_an_exact_int_as_a_float(store: Store) -> None:
    await store.set("t", "k", {"f": 3})
    value = await store.get_strict("t", "k", "f")
    assert value == 3.0 and type(value) is float


async def test_miss_is_false_for_get_and_none_for_get_strict(store: Store) -> None:
    assert await store.get("t", "absent") is False
    assert await store.get("t", "absent", "i4") is False
    assert await store.get_strict("t", "absent") is None
    assert await store.get_strict("t", "absent", "name") is None
    assert await store.exists("t", "absent") is False
    assert await store.delete("t", "absent") is False


async def test_delete_and_exists(store: Store) -> None:
    await store.set("t", "k", {"i1": 1})
    assert await store.exists("t", "k") is True
    assert await store.delete("t", "k") is True
    assert await store.exists("t", "k") is False
    assert await store.delete("t", "k") is False
    assert await store.get_strict("t", "k") is None
    assert await store.get("t", "k") is False


async def test_str_and_bytes_keys_name_the_same_row(store: Store) -> None:
    await store.set("t", "k", {"i4": 1})
    assert await store.get_strict("t", b"k", "i4") == 1
    await store.set("t", b"k", {"i8": 2})
    assert await store.get_strict("t", "k") == {**ZERO_ROW, "i4": 1, "i8": 2}
    key = "ключ"
    await store.set("t", key.encode(), {"name": "x"})
    assert await store.exists("t", key) is True
    assert await store.delete("t", key.encode()) is True
    assert await store.exists("t", key) is False


UNICODE_KEYS = ["ключ", "🎉", "ü-名前-✓", "e\u0301"]  # the last: a combining accent, not NFC


@pytest.mark.parametrize("key", UNICODE_KEYS)
async def test_unicode_keys_and_values(store: Store, key: str) -> None:
    row = {**ZERO_ROW, "name": "héllo🌍", "b": "é🌍".encode()}
    await store.set("t", key, row)
    assert_same_row(await store.get_strict("t", key), row)
    assert await store.get_strict("t", "é") is None  # never normalised into another key
    await store.set("t", key, {"name": "🌍🌍🌍🌍"})  # 16 UTF-8 bytes: exactly the limit
    assert await store.get_strict("t", key, "name") == "🌍🌍🌍🌍"


async def test_keys_with_nul_bytes_are_distinct_rows(store: Store, backend: str) -> None:
    keys = ["a", "a\x00b", "a\x00", "\x00"]
    for i, key in enumerate(keys):
        await store.set("t", key, {"i4": i})
    for i, key in enumerate(keys):
        assert await store.get_strict("t", key, "i4") == i
        assert await store.get_strict("t", key.encode(), "i4") == i
    assert await store.mget("t", keys) == [{**ZERO_ROW, "i4": i} for i in range(len(keys))]
    if backend in LISTING:
        seen = {k: r["i4"] async for k, r in store.iterate("t")}
        assert seen == {key: i for i, key in enumerate(keys)}
    assert await store.delete("t", "a\x00b") is True
    assert await store.get_strict("t", "a", "i4") == 0
    assert await store.exists("t", "a\x00") is True


BINARY_KEYS = [b"\xff\xfe", b"\x00", b"\x80abc\x00", b"\xc3", b"text"]


async def test_binary_keys_table_takes_any_bytes(store: Store, backend: str) -> None:
    for i, key in enumerate(BINARY_KEYS):
        assert await store.set("bin", key, {"v": i, "s": "x"}) is True
    await store.set("bin", "str-key", {"v": 99})
    for i, key in enumerate(BINARY_KEYS):
        assert await store.get_strict("bin", key) == {"v": i, "s": "x"}
        assert await store.exists("bin", key) is True
    assert await store.get_strict("bin", b"str-key", "v") == 99
    if backend in LISTING:
        seen = {k: r["v"] async for k, r in store.iterate("bin")}
        # A binary-keys table hands keys back as bytes, whatever type they were written as.
        assert seen == {**{k: i for i, k in enumerate(BINARY_KEYS)}, b"str-key": 99}
    assert await store.delete("bin", b"\xff\xfe") is True
    assert await store.get_strict("bin", b"\xff\xfe") is None
    assert await store.get_strict("bin", b"\xff", "v") is None


async def test_make_returns_the_shared_table_only_on_the_table_backend(
    make_store: StoreMaker, backend: str
) -> None:
    s = make_store()
    made = s.make("raw", 8, {"v": (Store.TYPE_INT, 8)})
    if backend == "table":
        assert isinstance(made, Table)
        assert s.table("raw") is made
        made.set("k", {"v": 3})  # the raw table and the store are the same rows
        await s.start()
        assert await s.get_strict("raw", "k") == {"v": 3}
    else:
        assert made is None
        with pytest.raises(UnsupportedOperationError):
            s.table("raw")


@pytest.fixture
def class_level(store: Store) -> Iterator[type[Store]]:
    """``Store`` whose class-level calls act on ``store`` (the default is restored afterwards)."""
    previous = Store._default
    Store.set_default(store)
    try:
        yield Store
    finally:
        Store.set_default(previous)


async def test_class_level_facade_runs_the_same_code(
    class_level: type[Store], store: Store
) -> None:
    async def app_code(s: Any) -> Any:
        await s.set("t", "user_1", {"name": "alice", "i4": 100})
        await s.incr("t", "user_1", "i4", 5)
        return await s.get("t", "user_1"), await s.get("t", "user_2"), await s.exists("t", "user_1")

    via_class = await app_code(class_level)
    assert await store.delete("t", "user_1") is True  # the class-level calls wrote to ``store``
    via_instance = await app_code(store)
    want = ({**ZERO_ROW, "name": "alice", "i4": 105}, False, True)
    assert via_class == via_instance == want
    if store.kind == Store.BACKEND_TABLE:
        assert class_level.table("t") is store.table("t")
    else:
        with pytest.raises(UnsupportedOperationError):
            class_level.table("t")
