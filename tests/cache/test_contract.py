"""The Cache contract on every backend (table, redis, tiered, memcached), against real servers."""

from __future__ import annotations

import asyncio
import datetime as dt
import math
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest
from pydantic import BaseModel

from tests.cache.conftest import SECRET, entry_files
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.errors import (
    InvalidKeyError,
    InvalidTTLError,
    KeyTooLongError,
    KeyTypeError,
    SerializationError,
    UnsupportedOperationError,
    ValueTooLargeError,
    ZealError,
)
from zeal_asgi.store import StoreBackendKind


class Item(BaseModel):
    """A model stored in the cache (module level, so it can be found again by name)."""

    sku: str
    price: Decimal
    tags: tuple[str, ...]
    when: dt.datetime


VALUES: list[Any] = [
    None,
    True,
    0,
    -(2**70),
    3.25,
    "ünïcode ✓",
    b"\x00\xffbinary",
    [1, [2, [3]]],
    {"a": 1, "b": [None, 2.5]},
    (1, "two", (3.0,)),
    {1: "int key", (2, 3): "tuple key"},
    {"__zt__": "a user dict that looks like an envelope"},
    {1, 2, 3},
    frozenset({"x"}),
    dt.datetime(2024, 5, 17, 12, 30, tzinfo=dt.UTC),
    dt.date(2024, 2, 29),
    dt.timedelta(days=2, microseconds=7),
    Decimal("12.340"),
    uuid.UUID(int=42),
    Item(sku="A1", price=Decimal("9.99"), tags=("x", "y"), when=dt.datetime(2024, 1, 1)),
]


@pytest.mark.parametrize("value", VALUES, ids=lambda v: type(v).__name__)
async def test_values_round_trip_with_their_types(any_cache: Cache, value: Any) -> None:
    assert await any_cache.set("k", value) is True
    got = await any_cache.get("k", MISSING)
    assert got == value and type(got) is type(value)


async def test_non_finite_floats_round_trip(any_cache: Cache) -> None:
    await any_cache.set("nan", [float("nan"), float("inf"), -float("inf")])
    got = await any_cache.get("nan")
    assert math.isnan(got[0]) and got[1:] == [float("inf"), -float("inf")]


async def test_miss_returns_default_and_stored_none_is_a_hit(any_cache: Cache) -> None:
    assert await any_cache.get("absent") is None
    assert await any_cache.get("absent", "dflt") == "dflt"
    assert await any_cache.get("absent", MISSING) is MISSING
    assert not await any_cache.has("absent")
    await any_cache.set("none", None)
    assert await any_cache.get("none", MISSING) is None
    assert await any_cache.has("none")


async def test_overwrite_and_delete(any_cache: Cache) -> None:
    await any_cache.set("k", 1)
    await any_cache.set("k", 2)
    assert await any_cache.get("k") == 2
    assert await any_cache.delete("k") is True
    assert await any_cache.get("k", MISSING) is MISSING
    assert not await any_cache.has("k")
    assert await any_cache.delete("k") is False


async def test_ttl_expires_and_zero_never_does(any_cache: Cache) -> None:
    await any_cache.set("short", "v", ttl=0.3)
    await any_cache.set("forever", "v", ttl=0)
    assert await any_cache.get("short") == "v"
    await asyncio.sleep(0.45)
    assert await any_cache.get("short", MISSING) is MISSING
    assert not await any_cache.has("short")
    assert await any_cache.get("forever") == "v"


async def test_expired_entry_is_not_returned_by_has_before_get(any_cache: Cache) -> None:
    await any_cache.set("short", "v", ttl=0.2)
    await asyncio.sleep(0.3)
    assert not await any_cache.has("short")


@pytest.mark.parametrize(
    "ttl", [-1, -0.001, float("nan"), float("inf"), 10**12, "5", True, None], ids=repr
)
async def test_bad_ttl_is_a_typed_error_and_writes_nothing(any_cache: Cache, ttl: Any) -> None:
    await any_cache.set("k", "old")
    with pytest.raises(InvalidTTLError) as info:
        await any_cache.set("k", "new", ttl=ttl)
    assert isinstance(info.value, ValueError) and "ttl" in str(info.value)
    assert await any_cache.get("k") == "old"
    with pytest.raises(InvalidTTLError):
        await any_cache.get_or_compute("other", lambda: 1, ttl=ttl)


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("", InvalidKeyError),
        (b"", InvalidKeyError),
        ("\ud800", InvalidKeyError),
        ("k" * 4097, KeyTooLongError),
        (123, KeyTypeError),
        (None, KeyTypeError),
    ],
    ids=["empty", "empty-bytes", "lone-surrogate", "too-long", "int", "none"],
)
async def test_bad_keys_are_typed_errors(
    any_cache: Cache, key: Any, error: type[ZealError]
) -> None:
    for call in (any_cache.set(key, 1), any_cache.get(key), any_cache.has(key)):
        with pytest.raises(error):
            await call


async def test_unserializable_value_raises_before_any_io(any_cache: Cache) -> None:
    await any_cache.set("k", "kept")
    files_before = entry_files(any_cache.files.path)
    with pytest.raises(SerializationError) as info:
        await any_cache.set("k", object())
    assert isinstance(info.value, TypeError)
    assert await any_cache.get("k") == "kept"
    assert entry_files(any_cache.files.path) == files_before


async def test_value_over_max_entry_bytes_is_refused(any_cache: Cache) -> None:
    small = Cache(
        cache_dir=any_cache.files.path,
        gc_interval_ms=0,
        store=any_cache.store,
        namespace=any_cache.namespace + "m",
        secret="s" * 32,
        max_entry_bytes=100,
    )
    try:
        with pytest.raises(ValueTooLargeError, match="max_entry_bytes=100"):
            await small.set("k", "x" * 200)
        assert await small.get("k", MISSING) is MISSING
    finally:
        small.close()


async def test_oversize_spills_and_a_newer_value_is_never_masked(any_cache: Cache) -> None:
    big = "B" * 20_000
    await any_cache.set("k", "small-1")
    await any_cache.set("k", big)
    assert await any_cache.get("k") == big
    await any_cache.set("k", "small-2")
    assert await any_cache.get("k") == "small-2"
    await any_cache.set("k", big + "!")
    assert await any_cache.get("k") == big + "!"
    assert await any_cache.has("k")
    stats = any_cache.stats()
    assert stats["spills_oversize"] == 2 and stats["hits_file"] >= 2


async def test_oversize_value_expires_too(any_cache: Cache) -> None:
    await any_cache.set("big", "B" * 20_000, ttl=0.2)
    await asyncio.sleep(0.3)
    assert await any_cache.get("big", MISSING) is MISSING


async def test_count_counts_live_entries_only(any_cache: Cache) -> None:
    if any_cache.store.kind is StoreBackendKind.MEMCACHED:
        with pytest.raises(UnsupportedOperationError):
            await any_cache.count()
        return
    for i in range(5):
        await any_cache.set(f"k{i}", i)
    await any_cache.set("dying", 1, ttl=0.2)
    assert await any_cache.count() == 6
    await asyncio.sleep(0.3)
    assert await any_cache.count() == 5  # the expired row is not counted, even before a read


async def test_flush_removes_everything(any_cache: Cache) -> None:
    if any_cache.store.kind is StoreBackendKind.MEMCACHED:
        with pytest.raises(UnsupportedOperationError):
            await any_cache.flush()
        return
    await any_cache.set("a", 1)
    await any_cache.set("big", "B" * 20_000)
    await any_cache.flush()
    assert await any_cache.get("a", MISSING) is MISSING
    assert await any_cache.get("big", MISSING) is MISSING
    assert entry_files(any_cache.files.path) == []


async def test_get_or_compute_sync_async_and_none(any_cache: Cache) -> None:
    calls: list[str] = []

    def sync_fn() -> int:
        calls.append("sync")
        return 41

    async def async_fn() -> None:
        calls.append("async")

    assert await any_cache.get_or_compute("s", sync_fn) == 41
    assert await any_cache.get_or_compute("s", sync_fn) == 41
    assert await any_cache.get_or_compute("n", async_fn) is None
    assert await any_cache.get_or_compute("n", async_fn) is None  # None is cached
    assert calls == ["sync", "async"]


async def test_get_or_compute_error_propagates_and_releases_the_lock(any_cache: Cache) -> None:
    async def boom() -> int:
        raise RuntimeError("compute failed")

    with pytest.raises(RuntimeError, match="compute failed"):
        await any_cache.get_or_compute("k", boom)
    # the lock is free again: the next caller computes at once (not after a lease)
    assert await asyncio.wait_for(any_cache.get_or_compute("k", lambda: 7), 2.0) == 7


async def test_get_or_compute_respects_ttl(any_cache: Cache) -> None:
    n = 0

    def fn() -> int:
        nonlocal n
        n += 1
        return n

    assert await any_cache.get_or_compute("k", fn, ttl=0.2) == 1
    assert await any_cache.get_or_compute("k", fn, ttl=0.2) == 1
    await asyncio.sleep(0.3)
    assert await any_cache.get_or_compute("k", fn, ttl=0.2) == 2


async def test_stampede_in_one_process_computes_once(any_cache: Cache) -> None:
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.2)
        return "v"

    results = await asyncio.gather(*(any_cache.get_or_compute("hot", slow) for _ in range(40)))
    assert results == ["v"] * 40
    assert calls == 1
    st = any_cache.stats()
    # every other caller waited for that one computation, unless (on a slow machine) it only
    # started after the value was stored: then its first lookup was a plain hit
    assert st["stampede_blocked"] >= 1
    assert st["stampede_blocked"] + st.get("hits_memory", 0) + st.get("hits_file", 0) == 39, st


@pytest.mark.parametrize("kind", ["redis+breaker", "tiered+breaker", "memcached+breaker"])
async def test_get_or_compute_behind_the_circuit_breaker(
    kind: str, store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    """The stampede lock follows the backend behind the breaker (memcached has no Lua)."""
    cache = cache_factory(await store_factory(kind), secret=SECRET)
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.1)
        return "v"

    results = await asyncio.gather(*(cache.get_or_compute("hot", slow) for _ in range(5)))
    assert results == ["v"] * 5 and calls == 1


async def test_unserializable_computed_value_raises_to_the_computer(any_cache: Cache) -> None:
    with pytest.raises(SerializationError):
        await any_cache.get_or_compute("k", object)
    assert await any_cache.get_or_compute("k", lambda: "ok") == "ok"


@pytest.mark.parametrize("kind", ["table", "redis", "tiered", "memcached"])
async def test_ttl_seconds_bounds_the_memory_tier(
    kind: str, store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    cache = cache_factory(await store_factory(kind), secret=SECRET, ttl_seconds=0.5)
    await cache.set("k", "v", ttl=60)
    assert await cache.get("k") == "v"
    await asyncio.sleep(0.7)
    if kind == "table":
        assert await cache.get("k") == "v"  # the host's file tier keeps it for its own ttl
        assert cache.stats()["hits_file"] == 1
    else:
        assert await cache.get("k", MISSING) is MISSING  # the shared row is the authority


@pytest.mark.parametrize("kind", ["table", "redis", "tiered", "memcached"])
async def test_pickle_serializer_round_trips_any_picklable_value(
    kind: str, store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    cache = cache_factory(await store_factory(kind), secret=SECRET, serializer="pickle")
    value = {"enum": StoreBackendKind.REDIS, "exc": ValueError("x").args, "big": "B" * 20_000}
    await cache.set("k", value)
    assert await cache.get("k") == value


async def test_binary_and_odd_keys_are_distinct_entries(any_cache: Cache) -> None:
    keys: list[str | bytes] = [b"\x00\xff", "../../etc/passwd", "a\r\nb", "k" * 4096, "é"]
    for i, k in enumerate(keys):
        await any_cache.set(k, i)
    assert [await any_cache.get(k) for k in keys] == list(range(len(keys)))
    assert await any_cache.get(b"\xc3\xa9") == 4  # a str key is its UTF-8 bytes
