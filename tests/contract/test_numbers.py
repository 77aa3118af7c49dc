"""incr / decr / compare_and_set: creation, range checks per INT width, floats, concurrency."""

from __future__ import annotations

import asyncio

import pytest

from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    NonFiniteFloatError,
    UnknownColumnError,
)
from zeal_asgi.store import Store

from ._support import INT_WIDTHS, ZERO_ROW, int_range, raises_exact

TASKS = 200


async def test_incr_creates_a_missing_row(store: Store) -> None:
    value = await store.incr("t", "n", "i4", 5)
    assert value == 5 and type(value) is int
    assert await store.get_strict("t", "n") == {**ZERO_ROW, "i4": 5}
    assert await store.decr("t", "m", "i8", 3) == -3
    assert await store.get_strict("t", "m") == {**ZERO_ROW, "i8": -3}
    assert await store.incr("t", "d", "i2") == 1  # the default step is 1
    assert await store.decr("t", "d", "i2") == 0


async def test_incr_returns_the_new_value_and_keeps_other_columns(store: Store) -> None:
    await store.set("t", "k", {"name": "n", "i4": 10, "b": b"\x00z"})
    assert await store.incr("t", "k", "i4", 7) == 17
    assert await store.decr("t", "k", "i4", 20) == -3
    assert await store.incr("t", "k", "i4", 0) == -3
    assert await store.get_strict("t", "k") == {**ZERO_ROW, "name": "n", "i4": -3, "b": b"\x00z"}


async def test_float_incr_is_double_addition(store: Store) -> None:
    first = await store.incr("t", "k", "f", 0.1)
    assert first == 0.1 and type(first) is float
    second = await store.incr("t", "k", "f", 0.2)
    assert repr(second) == repr(0.1 + 0.2)  # 0.30000000000000004, as C doubles add
    third = await store.incr("t", "k", "f", 2)  # an int step on a FLOAT column
    assert type(third) is float and repr(third) == repr(0.1 + 0.2 + 2)
    fourth = await store.decr("t", "k", "f", 0.25)
    assert repr(fourth) == repr(0.1 + 0.2 + 2 - 0.25)
    assert repr(await store.get_strict("t", "k", "f")) == repr(fourth)


@pytest.mark.parametrize(("step", "down"), [(-0.0, False), (0.0, True), (0.0, False)])
async def test_incr_on_a_missing_row_adds_to_a_zero_row(
    store: Store, step: float, down: bool
) -> None:
    """A new row reads as zeros, so incr on it is 0.0 + step (IEEE: 0.0 + -0.0 is +0.0)."""
    call = store.decr if down else store.incr
    await store.set("t", "zero", {})
    on_zero_row = await call("t", "zero", "f", step)
    on_missing_row = await call("t", "missing", "f", step)
    assert repr(on_zero_row) == repr(0.0 + (-step if down else step)) == "0.0"
    assert repr(on_missing_row) == repr(on_zero_row)
    assert repr(await store.get_strict("t", "missing", "f")) == "0.0"


async def test_float_incr_to_infinity_raises_and_keeps_the_value(store: Store) -> None:
    await store.set("t", "k", {"f": 1e308})
    await raises_exact(NonFiniteFloatError, store.incr("t", "k", "f", 1e308))
    assert await store.get_strict("t", "k", "f") == 1e308
    await raises_exact(NonFiniteFloatError, store.incr("t", "k", "f", float("nan")))
    await raises_exact(NonFiniteFloatError, store.incr("t", "k", "f", float("-inf")))
    assert await store.get_strict("t", "k", "f") == 1e308


@pytest.mark.parametrize("column", list(INT_WIDTHS))
async def test_int_overflow_raises_and_leaves_the_value(store: Store, column: str) -> None:
    lo, hi = int_range(INT_WIDTHS[column])
    await store.set("t", "k", {column: hi, "name": "keep"})
    error = await raises_exact(IntegerOverflowError, store.incr("t", "k", column, 1))
    assert column in str(error)
    assert await store.get_strict("t", "k") == {**ZERO_ROW, column: hi, "name": "keep"}
    assert await store.incr("t", "k", column, -1) == hi - 1
    await store.set("t", "k", {column: lo})
    await raises_exact(IntegerOverflowError, store.decr("t", "k", column, 1))
    await raises_exact(IntegerOverflowError, store.incr("t", "k", column, -1))
    assert await store.get_strict("t", "k", column) == lo
    assert await store.incr("t", "k", column, hi) == -1  # lo + hi: the whole range is usable


@pytest.mark.parametrize("column", list(INT_WIDTHS))
async def test_overflowing_incr_on_a_missing_row_creates_nothing(store: Store, column: str) -> None:
    lo, hi = int_range(INT_WIDTHS[column])
    await raises_exact(IntegerOverflowError, store.incr("t", "new", column, hi + 1))
    await raises_exact(IntegerOverflowError, store.decr("t", "new", column, -lo + 1))
    await raises_exact(IntegerOverflowError, store.incr("t", "new", column, 2**64))
    assert await store.exists("t", "new") is False
    assert await store.incr("t", "new", column, hi) == hi


async def test_bad_steps_are_typed_errors(store: Store) -> None:
    await store.set("t", "k", {"i4": 1})
    await raises_exact(ColumnTypeError, store.incr("t", "k", "i4", 1.5))
    await raises_exact(ColumnTypeError, store.incr("t", "k", "i4", True))
    await raises_exact(ColumnTypeError, store.decr("t", "k", "i4", True))
    await raises_exact(ColumnTypeError, store.incr("t", "k", "i4", "1"))  # type: ignore[arg-type]
    await raises_exact(ColumnTypeError, store.incr("t", "k", "name", 1))
    await raises_exact(ColumnTypeError, store.incr("t", "k", "b", 1))
    await raises_exact(UnknownColumnError, store.incr("t", "k", "nope", 1))
    await raises_exact(UnknownColumnError, store.incr("t", "other", "nope", 1))
    assert await store.get_strict("t", "k") == {**ZERO_ROW, "i4": 1}
    assert await store.exists("t", "other") is False


async def test_concurrent_incr_adds_up_exactly(store: Store) -> None:
    results = await asyncio.gather(*(store.incr("t", "hot", "i8", 1) for _ in range(TASKS)))
    # Each call saw its own new value: no two read-modify-writes overlapped.
    assert sorted(results) == list(range(1, TASKS + 1))
    assert await store.get_strict("t", "hot", "i8") == TASKS


async def test_concurrent_writes_to_different_columns_all_land(store: Store) -> None:
    n = TASKS // 4

    async def name(i: int) -> None:
        await store.set("t", "row", {"name": f"n{i}"})

    await asyncio.gather(
        *(store.incr("t", "row", "i4", 1) for _ in range(n)),
        *(store.decr("t", "row", "i2", 2) for _ in range(n)),
        *(store.incr("t", "row", "f", 0.5) for _ in range(n)),
        *(name(i) for i in range(n)),
    )
    row = await store.get_strict("t", "row")
    assert (row["i4"], row["i2"], row["f"]) == (n, -2 * n, 0.5 * n)
    assert row["name"] in {f"n{i}" for i in range(n)}


async def test_compare_and_set_on_a_missing_row_compares_with_zeros(store: Store) -> None:
    assert await store.compare_and_set("t", "m", "i4", 3, 5) is False
    assert await store.exists("t", "m") is False
    assert await store.compare_and_set("t", "m", "i4", 0, 5) is True
    assert await store.get_strict("t", "m") == {**ZERO_ROW, "i4": 5}
    assert await store.compare_and_set("t", "s", "name", "", "x") is True
    assert await store.get_strict("t", "s") == {**ZERO_ROW, "name": "x"}
    assert await store.compare_and_set("t", "fb", "f", 0.0, 1.5) is True
    assert await store.compare_and_set("t", "fb", "b", b"", b"\x00\xff") is True
    assert await store.get_strict("t", "fb") == {**ZERO_ROW, "f": 1.5, "b": b"\x00\xff"}


async def test_compare_and_set_on_a_present_row(store: Store) -> None:
    await store.set("t", "k", {"i8": 10, "name": "a", "f": 2.5})
    assert await store.compare_and_set("t", "k", "i8", 11, 12) is False
    assert await store.get_strict("t", "k", "i8") == 10
    assert await store.compare_and_set("t", "k", "i8", 10, 12) is True
    assert await store.compare_and_set("t", "k", "name", "b", "c") is False
    assert await store.compare_and_set("t", "k", "name", "a", "ü") is True
    assert await store.compare_and_set("t", "k", "f", 2.5, -0.5) is True
    assert await store.get_strict("t", "k") == {
        **ZERO_ROW,
        "i8": 12,
        "name": "ü",
        "f": -0.5,
    }


async def test_compare_and_set_validates_both_values(store: Store) -> None:
    await store.set("t", "k", {"i1": 5})
    await raises_exact(IntegerOverflowError, store.compare_and_set("t", "k", "i1", 5, 128))
    await raises_exact(ColumnTypeError, store.compare_and_set("t", "k", "i1", "5", 6))
    await raises_exact(ColumnTypeError, store.compare_and_set("t", "k", "i1", 5, 6.0))
    await raises_exact(ColumnTypeError, store.compare_and_set("t", "k", "i1", 5, True))
    await raises_exact(UnknownColumnError, store.compare_and_set("t", "k", "nope", 0, 1))
    await raises_exact(NonFiniteFloatError, store.compare_and_set("t", "k", "f", 0.0, float("nan")))
    assert await store.get_strict("t", "k") == {**ZERO_ROW, "i1": 5}


async def test_concurrent_compare_and_set_has_one_winner(store: Store) -> None:
    await store.set("t", "lock", {"i8": 0})
    wins = await asyncio.gather(
        *(store.compare_and_set("t", "lock", "i8", 0, i) for i in range(1, 51))
    )
    assert wins.count(True) == 1
    winner = wins.index(True) + 1
    assert await store.get_strict("t", "lock", "i8") == winner
