"""Bad input (reliability.md section 7, rows 1-16) through the Store, on every backend.

Each bad input must raise exactly the error type the shared-memory table raises, name the
column or key (and the limit, where there is one), and leave every stored row as it was: no
partial write, no row created, nothing truncated or wrapped.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import pytest

from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    InvalidKeyError,
    KeyTooLongError,
    KeyTypeError,
    NonFiniteFloatError,
    TableFullError,
    UnknownColumnError,
    ValueTooLargeError,
    ZealError,
)
from zeal_asgi.store import Store

from ._support import LISTING, ZERO_ROW, StoreMaker, raises_exact

EXISTING = {**ZERO_ROW, "name": "keep", "i1": 1, "i2": 2, "i4": 4, "i8": 8, "f": 0.5, "b": b"ok"}

# (id, column, bad value, error type, words the message must contain)
VALUE_CASES: list[tuple[str, str, Any, type[ZealError], tuple[str, ...]]] = [
    ("1-string-too-long", "name", "x" * 17, ValueTooLargeError, ("name", "16")),
    ("1-string-too-long-utf8", "name", "é" * 9, ValueTooLargeError, ("name", "16", "18")),
    ("1-bytes-too-long", "b", b"x" * 9, ValueTooLargeError, ("'b'", "8")),
    ("2-unknown-column", "nope", 1, UnknownColumnError, ("nope",)),
    ("3-str-into-int", "i4", "1", ColumnTypeError, ("i4",)),
    ("3-bytes-into-string", "name", b"x", ColumnTypeError, ("name",)),
    ("3-str-into-bytes", "b", "x", ColumnTypeError, ("'b'",)),
    ("3-str-into-float", "f", "1.0", ColumnTypeError, ("'f'",)),
    ("4-float-into-int", "i4", 1.9, ColumnTypeError, ("i4",)),
    ("4-integral-float-into-int", "i8", 2.0, ColumnTypeError, ("i8",)),
    ("5-bool-into-int", "i4", True, ColumnTypeError, ("i4",)),
    ("5-bool-into-float", "f", False, ColumnTypeError, ("'f'",)),
    ("6-none-into-int", "i4", None, ColumnTypeError, ("i4",)),
    ("6-none-into-string", "name", None, ColumnTypeError, ("name",)),
    ("6-none-into-float", "f", None, ColumnTypeError, ("'f'",)),
    ("6-none-into-bytes", "b", None, ColumnTypeError, ("'b'",)),
    ("7-int1-high", "i1", 128, IntegerOverflowError, ("i1", "127")),
    ("7-int1-low", "i1", -129, IntegerOverflowError, ("i1", "-128")),
    ("7-int2-high", "i2", 32_768, IntegerOverflowError, ("i2", "32767")),
    ("7-int4-low", "i4", -(2**31) - 1, IntegerOverflowError, ("i4", "-2147483648")),
    ("7-int8-high", "i8", 2**63, IntegerOverflowError, ("i8", str(2**63 - 1))),
    ("7-int8-low", "i8", -(2**63) - 1, IntegerOverflowError, ("i8",)),
    ("9-nan", "f", float("nan"), NonFiniteFloatError, ("'f'",)),
    ("9-inf", "f", float("inf"), NonFiniteFloatError, ("'f'",)),
    ("9-minus-inf", "f", float("-inf"), NonFiniteFloatError, ("'f'",)),
    ("9-int-not-a-double", "f", 2**53 + 1, ColumnTypeError, ("'f'",)),
]


async def _snapshot(store: Store, backend: str) -> tuple[Any, Any, int | None]:
    count = await store.count("t") if backend in LISTING else None
    return await store.get_strict("t", "k"), await store.get_strict("t", "new"), count


@pytest.fixture
async def seeded(store: Store) -> Store:
    """``store`` with row ``k`` of table ``t`` holding EXISTING."""
    await store.set("t", "k", EXISTING)
    return store


@pytest.mark.parametrize(
    ("column", "value", "error", "words"),
    [c[1:] for c in VALUE_CASES],
    ids=[c[0] for c in VALUE_CASES],
)
async def test_bad_value_is_a_typed_error_and_changes_nothing(
    seeded: Store,
    backend: str,
    column: str,
    value: Any,
    error: type[ZealError],
    words: tuple[str, ...],
) -> None:
    store = seeded
    before = await _snapshot(store, backend)
    assert before[0] == EXISTING and before[1] is None
    attempts: list[Callable[[], Awaitable[Any]]] = [
        lambda: store.set("t", "k", {column: value}),
        # A valid column next to the bad one must not be written either (all or nothing).
        lambda: store.set("t", "k", {"i2": 99, column: value}),
        lambda: store.set("t", "new", {"i2": 99, column: value}),
        lambda: store.mset("t", {"new": {"i2": 1}, "k": {column: value}}),
        lambda: store.mset("t", {"k": {"i2": 1}, "new": {column: value}}),
    ]
    for attempt in attempts:
        exc = await raises_exact(error, attempt())
        for word in words:
            assert word in str(exc), f"{word!r} not in the message {str(exc)!r}"
        assert await _snapshot(store, backend) == before
    # As the new value of compare_and_set, matching expected or not, on a row or a missing one.
    await raises_exact(error, store.compare_and_set("t", "k", column, EXISTING.get(column), value))
    zero = ZERO_ROW.get(column, 0)
    await raises_exact(error, store.compare_and_set("t", "new", column, zero, value))
    assert await _snapshot(store, backend) == before


async def test_row_that_is_not_a_mapping_is_a_typed_error(seeded: Store) -> None:
    for row in (None, [("i4", 1)], "i4=1", 5):
        await raises_exact(ColumnTypeError, seeded.set("t", "k", row))  # type: ignore[arg-type]
    await raises_exact(ColumnTypeError, seeded.mset("t", {"k": None}))  # type: ignore[dict-item]
    assert await seeded.get_strict("t", "k") == EXISTING


async def test_unknown_column_in_reads(seeded: Store) -> None:
    for key in ("k", "absent"):
        for getter in (seeded.get, seeded.get_strict):
            exc = await raises_exact(UnknownColumnError, getter("t", key, "nope"))
            assert "nope" in str(exc)
    await raises_exact(UnknownColumnError, seeded.incr("t", "k", "nope"))
    await raises_exact(UnknownColumnError, seeded.compare_and_set("t", "k", "nope", 0, 1))
    assert await seeded.get_strict("t", "k") == EXISTING


async def test_incr_past_int64_keeps_the_value(seeded: Store) -> None:
    top = 2**63 - 1
    await seeded.set("t", "k", {"i8": top})
    exc = await raises_exact(IntegerOverflowError, seeded.incr("t", "k", "i8"))
    assert "i8" in str(exc)
    await raises_exact(IntegerOverflowError, seeded.incr("t", "k", "i8", top))
    assert await seeded.get_strict("t", "k") == {**EXISTING, "i8": top}


# (id, bad key, error type, words the message must contain)
KEY_CASES: list[tuple[str, Any, type[ZealError], tuple[str, ...]]] = [
    ("10-too-long", "k" * 65, KeyTooLongError, ("65", "64")),
    ("10-too-long-utf8", "é" * 33, KeyTooLongError, ("66", "64")),
    ("10-too-long-bytes", b"k" * 65, KeyTooLongError, ("65", "64")),
    ("11-empty", "", InvalidKeyError, ("empty",)),
    ("11-empty-bytes", b"", InvalidKeyError, ("empty",)),
    ("13-lone-surrogate", "a\ud800b", InvalidKeyError, ("UTF-8",)),
    ("14-invalid-utf8-bytes", b"a\xffb", InvalidKeyError, ("UTF-8", "binary_keys")),
    ("15-int", 5, KeyTypeError, ("int",)),
    ("15-none", None, KeyTypeError, ("NoneType",)),
    ("15-float", 1.5, KeyTypeError, ("float",)),
    ("15-bytearray", bytearray(b"k"), KeyTypeError, ("bytearray",)),
    ("15-tuple", ("k",), KeyTypeError, ("tuple",)),
]


def _key_ops(store: Store, key: Any) -> list[tuple[str, Callable[[], Awaitable[Any]]]]:
    ops: list[tuple[str, Callable[[], Awaitable[Any]]]] = [
        ("set", lambda: store.set("t", key, {"i4": 1})),
        ("get", lambda: store.get("t", key)),
        ("get_strict", lambda: store.get_strict("t", key, "i4")),
        ("exists", lambda: store.exists("t", key)),
        ("delete", lambda: store.delete("t", key)),
        ("incr", lambda: store.incr("t", key, "i4", 1)),
        ("decr", lambda: store.decr("t", key, "i4", 1)),
        ("compare_and_set", lambda: store.compare_and_set("t", key, "i4", 0, 1)),
        ("mget", lambda: store.mget("t", ["k", key])),
    ]
    if isinstance(key, Hashable):  # a bytearray cannot even be a key of the mapping
        ops.append(("mset", lambda: store.mset("t", {"new": {"i4": 1}, key: {"i4": 1}})))
    return ops


@pytest.mark.parametrize(
    ("key", "error", "words"), [c[1:] for c in KEY_CASES], ids=[c[0] for c in KEY_CASES]
)
async def test_bad_key_is_a_typed_error_in_every_call(
    seeded: Store, backend: str, key: Any, error: type[ZealError], words: tuple[str, ...]
) -> None:
    before = await _snapshot(seeded, backend)
    for name, op in _key_ops(seeded, key):
        try:
            exc = await raises_exact(error, op())
        except AssertionError as failure:
            raise AssertionError(f"Store.{name}: {failure}") from None
        for word in words:
            assert word in str(exc), f"Store.{name}: {word!r} not in {str(exc)!r}"
    assert await _snapshot(seeded, backend) == before


async def test_key_at_the_limit_is_accepted(store: Store) -> None:
    for key in ("k" * 64, "é" * 32, b"\x00" * 64):
        await store.set("t", key, {"i4": 1})
        assert await store.get_strict("t", key, "i4") == 1
        assert await store.exists("t", key[:-1]) is False  # never aliased to a shorter key


async def test_a_larger_key_size_moves_the_limit(make_store: StoreMaker) -> None:
    s = make_store()
    s.make("long", 8, {"v": (Store.TYPE_INT, 8)}, key_size=200)
    s.make("short", 8, {"v": (Store.TYPE_INT, 8)}, key_size=4)
    await s.start()
    await s.set("long", "k" * 200, {"v": 1})
    assert await s.get_strict("long", "k" * 200, "v") == 1
    await raises_exact(KeyTooLongError, s.set("long", "k" * 201, {"v": 1}))
    await s.set("short", "abcd", {"v": 2})
    exc = await raises_exact(KeyTooLongError, s.set("short", "abcde", {"v": 1}))
    assert "5" in str(exc) and "4" in str(exc)
    assert await s.get_strict("short", "abcd", "v") == 2


@pytest.mark.parametrize("max_rows", [1, 5])
async def test_table_full_only_on_the_shared_table(
    make_store: StoreMaker, backend: str, max_rows: int
) -> None:
    """16: the shared table refuses a new key past max_rows; other backends have no hard cap
    (tiered: rows past its L1's capacity are still served, from L2)."""
    s = make_store()
    s.make("small", max_rows, {"v": (Store.TYPE_INT, 8)})
    await s.start()
    for i in range(max_rows):
        await s.set("small", f"r{i}", {"v": i})
    extra: list[Callable[[], Awaitable[Any]]] = [
        lambda: s.set("small", "extra", {"v": 7}),
        lambda: s.incr("small", "extra", "v", 7),
        lambda: s.compare_and_set("small", "extra", "v", 0, 7),
        lambda: s.mset("small", {"extra": {"v": 7}}),
    ]
    if backend == "table":
        for attempt in extra:
            exc = await raises_exact(TableFullError, attempt())
            assert "small" in str(exc)
        assert await s.count("small") == max_rows
        assert await s.exists("small", "extra") is False
        await s.set("small", "r0", {"v": -1})  # existing rows can still change
        assert await s.delete("small", f"r{max_rows - 1}") is True
        assert await s.set("small", "extra", {"v": 7}) is True  # and a freed slot is reusable
    else:
        for attempt in extra:
            await attempt()
        assert await s.get_strict("small", "extra", "v") == 7
        for i in range(max_rows):
            assert await s.get_strict("small", f"r{i}", "v") == i
        if backend in LISTING:
            assert await s.count("small") == max_rows + 1


@pytest.mark.parametrize("backend", ["breaker"], indirect=True)
async def test_bad_input_never_trips_the_breaker(seeded: Store) -> None:
    """Typed input errors are the caller's fault, not an outage: the wrapper stays closed."""
    backend: Any = seeded.backend
    for _ in range(3 * backend.options.failure_threshold):
        await raises_exact(ColumnTypeError, seeded.set("t", "k", {"i4": "x"}))
        await raises_exact(KeyTooLongError, seeded.get("t", "k" * 65))
        await raises_exact(IntegerOverflowError, seeded.incr("t", "k", "i1", 1000))
    assert backend.state == "closed"
    assert await seeded.incr("t", "k", "i4", 1) == EXISTING["i4"] + 1  # still served by Redis
    assert backend.stats()["breaker"]["state"] == "closed"
