"""The Redis backend behaves exactly like the shared-memory table backend, edge by edge."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from tests._harness.servers import RedisServer
from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend

from .conftest import COLUMNS, unique_prefix

Op = Callable[[Store], Awaitable[Any]]


def _table_store(**make: Any) -> Store:
    store = Store(backend=TableBackend(namespace=f"rt{uuid.uuid4().hex[:8]}"))
    store.make("t", 256, COLUMNS, **make)
    store.make("bin", 64, {"v": (Store.TYPE_INT, 8)}, binary_keys=True)
    store.make("empty", 64, {})
    return store


def _redis_store(url: str, **make: Any) -> Store:
    store = Store("redis", {"url": url, "prefix": unique_prefix()})
    store.make("t", 256, COLUMNS, **make)
    store.make("bin", 64, {"v": (Store.TYPE_INT, 8)}, binary_keys=True)
    store.make("empty", 64, {})
    return store


@pytest.fixture
def table_store() -> Iterator[Store]:
    store = _table_store()
    yield store
    backend = store.backend
    assert isinstance(backend, TableBackend)
    backend.close_all()


@pytest.fixture
async def redis_parity_store(redis_server: RedisServer) -> AsyncIterator[Store]:
    store = _redis_store(redis_server.url)
    yield store
    await store.aclose()


async def outcome(store: Store, op: Op) -> Any:
    """The result of ``op``, or the exception's type (messages may word things differently)."""
    try:
        result = await op(store)
    except Exception as exc:  # the exception's type is the observable behaviour
        return ("raises", type(exc).__name__, isinstance(exc, (ValueError, TypeError, KeyError)))
    if isinstance(result, dict):
        return ("row", list(result.items()))  # declaration order matters too
    return ("value", type(result).__name__, result)


# Each step: an operation on a Store.  The same list runs on both backends.
STEPS: list[tuple[str, Op]] = [
    ("get missing", lambda s: s.get_strict("t", "k")),
    ("get field of missing", lambda s: s.get_strict("t", "k", "i4")),
    ("get unknown field of missing", lambda s: s.get_strict("t", "k", "nope")),
    ("facade get miss is False", lambda s: s.get("t", "k")),
    ("set partial", lambda s: s.set("t", "k", {"name": "ab"})),
    ("new row reads zeros", lambda s: s.get_strict("t", "k")),
    ("merge", lambda s: s.set("t", "k", {"i4": 5, "f": 0.1})),
    ("merged row", lambda s: s.get_strict("t", "k")),
    ("one field", lambda s: s.get_strict("t", "k", "f")),
    ("set empty row on new key", lambda s: s.set("t", "z", {})),
    ("empty row exists", lambda s: s.get_strict("t", "z")),
    ("unknown column", lambda s: s.set("t", "k", {"nope": 1})),
    ("int as float", lambda s: s.set("t", "k", {"i4": 1.9})),
    ("bool as int", lambda s: s.set("t", "k", {"i4": True})),
    ("None value", lambda s: s.set("t", "k", {"name": None})),
    ("string too long", lambda s: s.set("t", "k", {"name": "x" * 17})),
    ("utf-8 size counts", lambda s: s.set("t", "k", {"name": "é" * 8})),
    ("utf-8 too long", lambda s: s.set("t", "k", {"name": "é" * 9})),
    ("bytes into string", lambda s: s.set("t", "k", {"name": b"x"})),
    ("str into bytes", lambda s: s.set("t", "k", {"b": "x"})),
    ("nan refused", lambda s: s.set("t", "k", {"f": float("nan")})),
    ("inf refused", lambda s: s.set("t", "k", {"f": float("-inf")})),
    ("int into float", lambda s: s.set("t", "k", {"f": 3})),
    ("huge int into float", lambda s: s.set("t", "k", {"f": 2**60 + 1})),
    ("i1 range", lambda s: s.set("t", "k", {"i1": -129})),
    ("i8 range", lambda s: s.set("t", "k", {"i8": 2**63})),
    ("row unchanged after bad writes", lambda s: s.get_strict("t", "k")),
    ("bad row aborts whole set", lambda s: s.set("t", "k", {"i4": 9, "i1": 999})),
    ("still unchanged", lambda s: s.get_strict("t", "k", "i4")),
    ("row not a mapping", lambda s: s.set("t", "k", [("i4", 1)])),  # type: ignore[arg-type]
    ("empty key", lambda s: s.get_strict("t", "")),
    ("key too long", lambda s: s.set("t", "k" * 65, {})),
    ("key at limit", lambda s: s.set("t", "k" * 64, {"i1": 1})),
    ("key of wrong type", lambda s: s.exists("t", 42)),  # type: ignore[arg-type]
    ("lone surrogate key", lambda s: s.set("t", "\ud800", {})),
    ("invalid utf-8 bytes key", lambda s: s.set("t", b"\xff", {})),
    ("key with NUL", lambda s: s.set("t", "a\x00b", {"i2": 7})),
    ("NUL key reads back", lambda s: s.get_strict("t", "a\x00b")),
    ("bytes and str name one row", lambda s: s.get_strict("t", b"a\x00b", "i2")),
    ("reserved-looking key", lambda s: s.set("t", "__keys__", {"name": "r"})),
    ("more underscores", lambda s: s.set("t", "___keys__", {"name": "r3"})),
    ("reserved-looking key reads", lambda s: s.get_strict("t", "__keys__", "name")),
    ("binary key", lambda s: s.set("bin", b"\xff\x00", {"v": 1})),
    ("binary key iterate", lambda s: _bin_keys(s)),
    ("empty schema row", lambda s: s.set("empty", "e", {})),
    ("empty schema get", lambda s: s.get_strict("empty", "e")),
    ("empty schema exists", lambda s: s.exists("empty", "e")),
    ("empty schema count", lambda s: s.count("empty")),
    ("incr missing creates", lambda s: s.incr("t", "n", "i4", 3)),
    ("created row", lambda s: s.get_strict("t", "n")),
    ("decr", lambda s: s.decr("t", "n", "i4", 10)),
    ("incr i1 to max", lambda s: s.incr("t", "n", "i1", 127)),
    ("incr i1 overflow", lambda s: s.incr("t", "n", "i1", 1)),
    ("i1 unchanged", lambda s: s.get_strict("t", "n", "i1")),
    ("decr i2 underflow", lambda s: s.decr("t", "n", "i2", 32769)),
    ("incr i4 huge step", lambda s: s.incr("t", "n", "i4", 2**40)),
    ("step over 64 bits", lambda s: s.incr("t", "n", "i8", 2**64)),
    ("incr i8 to max", lambda s: s.incr("t", "n", "i8", 2**63 - 1)),
    ("incr i8 overflow", lambda s: s.incr("t", "n", "i8", 1)),
    ("i8 unchanged", lambda s: s.get_strict("t", "n", "i8")),
    ("decr i8 to min", lambda s: s.incr("t", "m", "i8", -(2**63))),
    ("overflowing step on missing row", lambda s: s.incr("t", "nx", "i1", 300)),
    ("no row created", lambda s: s.exists("t", "nx")),
    ("incr by bool", lambda s: s.incr("t", "n", "i4", True)),
    ("incr int by float", lambda s: s.incr("t", "n", "i4", 1.0)),
    ("incr string column", lambda s: s.incr("t", "n", "name", 1)),
    ("incr unknown column", lambda s: s.incr("t", "n", "nope", 1)),
    ("float incr", lambda s: s.incr("t", "fl", "f", 0.1)),
    ("float incr exact", lambda s: s.incr("t", "fl", "f", 0.2)),
    ("float incr by int", lambda s: s.incr("t", "fl", "f", 1)),
    ("float incr by nan", lambda s: s.incr("t", "fl", "f", float("nan"))),
    ("float set big", lambda s: s.set("t", "fl", {"f": 1.7e308})),
    ("float incr to inf", lambda s: s.incr("t", "fl", "f", 1.7e308)),
    ("float unchanged", lambda s: s.get_strict("t", "fl", "f")),
    ("float incr by string", lambda s: s.incr("t", "fl", "f", "1")),  # type: ignore[arg-type]
    ("cas missing zero creates", lambda s: s.compare_and_set("t", "c", "i4", 0, 5)),
    ("cas created row", lambda s: s.get_strict("t", "c")),
    ("cas missing nonzero", lambda s: s.compare_and_set("t", "c2", "i4", 1, 5)),
    ("cas missing nonzero no row", lambda s: s.exists("t", "c2")),
    ("cas mismatch", lambda s: s.compare_and_set("t", "c", "i4", 4, 6)),
    ("cas match", lambda s: s.compare_and_set("t", "c", "i4", 5, 6)),
    ("cas float -0.0 equals 0.0", lambda s: s.compare_and_set("t", "c", "f", -0.0, 2.5)),
    ("cas float after incr", lambda s: s.compare_and_set("t", "fl", "f", 1.7e308, 1.0)),
    ("cas string", lambda s: s.compare_and_set("t", "c", "name", "", "x")),
    ("cas string again", lambda s: s.compare_and_set("t", "c", "name", "", "y")),
    ("cas bytes", lambda s: s.compare_and_set("t", "c", "b", b"", b"\x00")),
    ("cas bad expected type", lambda s: s.compare_and_set("t", "c", "i4", "6", 7)),
    ("cas new out of range", lambda s: s.compare_and_set("t", "c", "i1", 0, 128)),
    ("cas row", lambda s: s.get_strict("t", "c")),
    ("exists", lambda s: s.exists("t", "c")),
    ("delete", lambda s: s.delete("t", "c")),
    ("delete again", lambda s: s.delete("t", "c")),
    ("exists after delete", lambda s: s.exists("t", "c")),
    ("mget", lambda s: s.mget("t", ["k", "missing", "n", "k"])),
    ("mget bad key", lambda s: s.mget("t", ["k", ""])),
    ("mget empty", lambda s: s.mget("t", [])),
    ("mset all or nothing", lambda s: s.mset("t", {"m1": {"i4": 1}, "m2": {"i1": 999}})),
    ("nothing written", lambda s: s.exists("t", "m1")),
    ("mset", lambda s: s.mset("t", {"m1": {"i4": 1}, "k": {"name": "kk"}})),
    ("mset merged", lambda s: s.get_strict("t", "k")),
    ("count", lambda s: s.count("t")),
    ("iterate", lambda s: _rows_of(s, "t")),
    ("clear", lambda s: s.clear("t")),
    ("count after clear", lambda s: s.count("t")),
    ("get after clear", lambda s: s.get_strict("t", "k")),
]


async def _rows_of(s: Store, table: str) -> Any:
    return sorted([(repr(k), list(r.items())) async for k, r in s.iterate(table)])


async def _bin_keys(s: Store) -> Any:
    return sorted([(k, r) async for k, r in s.iterate("bin")])


async def test_same_outcomes_as_the_table(table_store: Store, redis_parity_store: Store) -> None:
    for name, op in STEPS:
        expected = await outcome(table_store, op)
        got = await outcome(redis_parity_store, op)
        assert got == expected, f"step {name!r}: table {expected!r}, redis {got!r}"


# -- model-based: random operation sequences, both backends, every answer compared ---------------

KEYS = st.sampled_from(["a", "b", "__keys__", "k\x00", "é"])
PARTIAL_ROW = st.fixed_dictionaries(
    {},
    optional={
        "name": st.text(max_size=3),
        "i1": st.integers(-130, 130),
        "i8": st.integers(-(2**63), 2**63 - 1),
        "f": st.floats(allow_nan=False, allow_infinity=False, width=64),
        "b": st.binary(max_size=9),
    },
)
NUMERIC = st.sampled_from(["i1", "i2", "i8", "f"])
OPS = st.one_of(
    st.tuples(st.just("set"), KEYS, PARTIAL_ROW),
    st.tuples(st.just("get"), KEYS, st.sampled_from([None, "name", "f", "b"])),
    st.tuples(st.just("incr"), KEYS, NUMERIC, st.integers(-200, 200)),
    st.tuples(st.just("fincr"), KEYS, st.floats(-1e6, 1e6)),
    st.tuples(st.just("cas"), KEYS, st.sampled_from([0, 1, 2]), st.sampled_from([1, 2, 300])),
    st.tuples(st.just("delete"), KEYS),
    st.tuples(st.just("exists"), KEYS),
    st.tuples(st.just("count")),
    st.tuples(st.just("mget"), st.lists(KEYS, max_size=4)),
)


def _op(step: tuple[Any, ...]) -> Op:
    kind, *a = step
    if kind == "set":
        return lambda s: s.set("t", a[0], a[1])
    if kind == "get":
        return lambda s: s.get_strict("t", a[0], a[1])
    if kind == "incr":
        return lambda s: s.incr("t", a[0], a[1], a[2])
    if kind == "fincr":
        return lambda s: s.incr("t", a[0], "f", a[1])
    if kind == "cas":
        return lambda s: s.compare_and_set("t", a[0], "i1", a[1], a[2])
    if kind == "delete":
        return lambda s: s.delete("t", a[0])
    if kind == "exists":
        return lambda s: s.exists("t", a[0])
    if kind == "count":
        return lambda s: s.count("t")
    return lambda s: s.mget("t", a[0])


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(st.lists(OPS, min_size=1, max_size=25))
def test_random_sequences_match_the_table(
    redis_server: RedisServer, table_store: Store, steps: list[tuple[Any, ...]]
) -> None:
    # A new event loop per example: also exercises per-loop clients and their closing.
    async def run() -> None:
        redis_store = _redis_store(redis_server.url)
        try:
            await table_store.clear("t")
            for step in steps:
                expected = await outcome(table_store, _op(step))
                got = await outcome(redis_store, _op(step))
                assert got == expected, f"{step!r}: table {expected!r}, redis {got!r}"
            assert await _rows_of(redis_store, "t") == await _rows_of(table_store, "t")
        finally:
            await redis_store.aclose()

    asyncio.run(run())
