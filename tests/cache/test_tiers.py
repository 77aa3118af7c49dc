"""How the two tiers work together: spills, restarts, tampering, coherence across hosts, locks."""

from __future__ import annotations

import asyncio
import os
import stat
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer
from tests.cache.conftest import SECRET, entry_files, unique
from zeal_asgi import Zeal
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.cache.lock import ShmLock
from zeal_asgi.cache.serializer import PICKLE_ID
from zeal_asgi.cache.tiers import HEAD, INLINE, POINTER, memory_key
from zeal_asgi.errors import ConfigError, LockTimeoutError
from zeal_asgi.shm.lease import pack
from zeal_asgi.store import Store


async def test_values_survive_a_restart_from_the_file_tier(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    before = cache_factory(await store_factory("table"), secret=SECRET)
    await before.set("small", {"n": 1})
    await before.set("big", "B" * 50_000)
    await before.set("none", None)
    await before.set("gone", 1, ttl=0.2)
    # a new server: empty shared memory, same directory and secret
    after = cache_factory(await store_factory("table"), secret=SECRET, namespace=before.namespace)
    await asyncio.sleep(0.3)
    assert await after.get("small") == {"n": 1}
    assert await after.get("big") == "B" * 50_000
    assert await after.get("none", MISSING) is None
    assert await after.get("gone", MISSING) is MISSING
    assert after.stats()["hits_file"] >= 3


async def test_a_full_memory_tier_spills_to_files(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    cache = cache_factory(await store_factory("table"), secret=SECRET, max_rows=8)
    for i in range(30):
        assert await cache.set(f"k{i}", i) is True
    assert [await cache.get(f"k{i}") for i in range(30)] == list(range(30))
    stats = cache.stats()
    assert stats["spills_full"] == 22 and stats["hits_memory"] == 8 and stats["hits_file"] == 22
    assert await cache.count() == 8  # the memory tier's count, like the seed


async def test_tampered_memory_row_is_never_returned_where_rows_are_authenticated(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    """Rows carry a MAC on shared backends and in pickle mode: a forged one is dropped."""
    for kind, serializer in (("redis", "json"), ("table", "pickle")):
        cache = cache_factory(await store_factory(kind), secret=SECRET, serializer=serializer)
        await cache.set("k", "genuine")
        table, mk = f"__{cache.namespace}", b"k" if kind == "table" else memory_key(b"k")
        row = await cache.store.get_strict(table, mk)
        await cache.store.set(table, mk, {"v": row["v"].replace(b"genuine", b"forged!")})
        # dropped; on the table backend the authentic file copy is served instead
        expected = "genuine" if kind == "table" else MISSING
        assert await cache.get("k", MISSING) == expected
        assert cache.stats()["memory_corrupt"] == 1
        assert await cache.store.get_strict(table, mk) is None or kind == "table"


async def test_damaged_memory_rows_are_misses_on_the_table_backend(table_cache: Cache) -> None:
    """Without a MAC (JSON mode in shared memory) rows are still checked for shape: a bad one
    is dropped and counted, and the file copy is served; never an error, never garbage."""
    table = table_cache.store.table(f"__{table_cache.namespace}")
    await table_cache.set("k", {"n": 1})
    v = table.get(b"k", "v")
    damaged = [
        b"",  # no head
        v[:5],  # torn head
        bytes((9,)) + v[1:],  # unknown kind
        bytes((POINTER,)) + v[1:],  # a pointer of the wrong length
        bytes((INLINE, 0)) + v[2:],  # an inline row without a serializer
        v[: HEAD.size] + b"{not json",  # undecodable
        HEAD.pack(INLINE, PICKLE_ID, 0.0) + b"\x80\x04K\x01.",  # a pickle, read by a JSON cache
    ]
    for i, bad in enumerate(damaged):
        table.set(b"k", {"v": bad})
        assert await table_cache.get("k") == {"n": 1}, i
        assert table.get(b"k") is None, i  # dropped
    stats = table_cache.stats()
    assert stats["memory_corrupt"] == 5
    assert stats["decode_errors"] == 1 and stats["serializer_mismatch"] == 1
    # and without the file copy, a damaged row is a plain miss
    table.set(b"k", {"v": bytes((9,)) + v[1:]})
    for f in entry_files(table_cache.files.path):
        f.unlink()
    assert await table_cache.get("k", MISSING) is MISSING


async def test_the_unauthenticated_memory_tier_is_private_to_the_server_user(
    table_cache: Cache,
) -> None:
    """Rows in shared memory carry no MAC in JSON mode because only the server's own user can
    write the segment (owner-only, 0600) -- the premise of that choice, checked here."""
    table = table_cache.store.table(f"__{table_cache.namespace}")
    st = os.stat(table.path)
    assert st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) == 0o600


async def test_has_checks_integrity_like_get(table_cache: Cache) -> None:
    await table_cache.set("big", "B" * 20_000)
    (f,) = entry_files(table_cache.files.path)
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert not await table_cache.has("big")
    assert entry_files(table_cache.files.path) == []  # the damaged file was removed


async def test_ttl_seconds_limits_memory_residency_on_the_table_backend(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    cache = cache_factory(await store_factory("table"), secret=SECRET, ttl_seconds=0.2)
    await cache.set("k", "v", ttl=60)
    await asyncio.sleep(0.3)
    assert await cache.count() == 0
    assert await cache.get("k") == "v"  # still served by the file tier, for its own ttl
    assert cache.stats()["hits_file"] == 1


async def test_shared_backend_never_serves_another_hosts_stale_file(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    """Two hosts (own directories) sharing one Redis: the memory row decides for both."""
    conn = {"url": redis_server.url, "prefix": unique()}
    ns = unique("ns")
    stores = [Store("redis", conn), Store("redis", conn)]
    caches = [
        Cache(
            cache_dir=str(tmp_path / host),
            gc_interval_ms=0,
            store=store,
            secret=SECRET,
            namespace=ns,
        )
        for host, store in zip("ab", stores, strict=True)
    ]
    try:
        a, b = caches
        big = "B" * 20_000
        await a.set("k", big)
        assert await a.get("k") == big
        assert await b.get("k", MISSING) is MISSING  # the file is on host a only
        await b.set("k", "small")
        assert await a.get("k") == "small"  # a's own (older) file is not served
        await b.set("k", big + "b")
        assert await a.get("k", MISSING) is MISSING  # a's file does not carry b's nonce
        assert await b.get("k") == big + "b"
        await a.set("d", "v")
        await b.delete("d")
        assert await a.get("d", MISSING) is MISSING
    finally:
        for c in caches:
            c.close()
        for s in stores:
            await s.aclose()


@pytest.fixture
def restore_defaults() -> Iterator[None]:
    """Class-level tests replace the default Store and Cache: put them back afterwards."""
    store, cache = Store._default, Cache._default
    Cache.set_default(None)
    yield
    if Cache._default is not None:
        Cache._default.close()
    Store.set_default(store)
    Cache.set_default(cache)


async def test_class_level_calls_follow_the_default_store(
    restore_defaults: None, store_factory: Callable[[str], Any], cache_dir: Path
) -> None:
    with pytest.raises(ConfigError, match=r"Cache\.init"):
        await Cache.get("k")
    first = await store_factory("table")
    Store.set_default(first)
    cache = Cache.init(64, str(cache_dir), 0, secret=SECRET, namespace=unique("ns"))
    assert Cache.init(64, str(cache_dir), 0, secret=SECRET, namespace=cache.namespace) is cache
    with pytest.raises(ConfigError, match="already called"):
        Cache.init(65, str(cache_dir), 0, secret=SECRET, namespace=cache.namespace)
    await Cache.set("k", "v")
    assert await Cache.get("k") == "v" and cache.store is first
    second = await store_factory("table")
    Store.set_default(second)
    assert cache.store is second
    await Cache.set("only-in-second", 2)
    assert first.names() == second.names()  # the cache declared its tables on the new store
    assert await second.get_strict(f"__{cache.namespace}", b"only-in-second")


def _dead_pid() -> int:
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    return dead.pid


async def test_dead_owner_lock_is_taken_over_at_once(table_cache: Cache) -> None:
    dead_pid = _dead_pid()
    lock = table_cache._tiers.bind().lock
    assert isinstance(lock, ShmLock)
    name = memory_key(b"k")
    far = int(time.monotonic() * 1000) + 3_600_000
    lock.table.set(name, {"owner": pack(far, dead_pid)})
    watch = Stopwatch()
    assert await table_cache.get_or_compute("k", lambda: "recomputed", max_wait=5) == "recomputed"
    assert watch.own() < 0.5


async def test_live_owner_lock_makes_waiters_time_out(table_cache: Cache) -> None:
    lock = table_cache._tiers.bind().lock
    name = memory_key(b"k")
    token = await lock.acquire(name)
    assert token is not None
    try:
        with pytest.raises(LockTimeoutError, match="max_wait"):
            await table_cache.get_or_compute("k", lambda: 1, max_wait=0.2)
    finally:
        await lock.release(name, token)
    assert await table_cache.get_or_compute("k", lambda: 2) == 2


async def test_crashed_computer_on_redis_blocks_only_until_its_lease_ends(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    cache = cache_factory(await store_factory("redis"), secret=SECRET, lock_lease=0.5)
    lock = cache._tiers.bind().lock
    name = memory_key(b"k")
    assert await lock.acquire(name) is not None  # then "crashes": never renews nor releases
    assert await lock.acquire(name) is None
    watch = Stopwatch()
    assert await cache.get_or_compute("k", lambda: "mine", max_wait=5) == "mine"
    assert watch.wall() > 0.2 and watch.own() < 2.0


async def test_long_computation_keeps_its_lease(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    cache = cache_factory(await store_factory("redis"), secret=SECRET, lock_lease=0.3)
    calls = 0

    async def slow() -> str:
        nonlocal calls
        calls += 1
        await asyncio.sleep(1.0)  # three leases long: renewed meanwhile, so nobody takes over
        return "v"

    results = await asyncio.gather(*(cache.get_or_compute("k", slow) for _ in range(5)))
    assert results == ["v"] * 5 and calls == 1


async def test_gc_sweeps_expired_memory_rows_and_files(table_cache: Cache) -> None:
    await table_cache.set("dead", 1, ttl=0.1)
    await table_cache.set("dead-big", "B" * 20_000, ttl=0.1)
    await table_cache.set("alive", 1)
    await asyncio.sleep(0.2)
    out = await table_cache.gc()
    assert out["memory_expired"] == 2 and out["expired"] == 2
    assert await table_cache.count() == 1
    assert len(entry_files(table_cache.files.path)) == 1


async def _until(probe: Callable[[], Any], want: Any = True, within: float = 10.0) -> None:
    """Polls `probe` (sync or async) until it returns `want`: sweeps 50 ms apart take longer than
    that on a loaded machine, whose loop wakes late; a GC that never runs still fails here."""
    deadline = time.monotonic() + within
    while True:
        got = probe()
        if asyncio.iscoroutine(got):
            got = await got
        if got == want or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.02)


async def test_gc_service_starts_and_stops(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    cache = cache_factory(await store_factory("table"), secret=SECRET, gc_interval_ms=50)
    await cache.set("dead", 1, ttl=0.05)  # also starts the GC lazily
    await _until(lambda: cache.stats().get("gc_sweeps", 0) >= 2)
    await _until(cache.count, 0)  # a sweep after the row expired removed it
    await cache.stop()
    assert cache.stats()["gc_sweeps"] >= 2
    assert await cache.count() == 0


async def test_gc_removes_lock_rows_of_dead_owners(table_cache: Cache) -> None:
    lock = table_cache._tiers.bind().lock
    assert isinstance(lock, ShmLock)
    lock.table.set("dead", {"owner": pack(1, _dead_pid())})
    held = await lock.acquire("held")
    out = await table_cache.gc()
    assert out["dead_locks"] == 1
    assert lock.table.get("dead") is None and lock.table.get("held", "owner") == held


async def test_gc_drops_files_no_row_points_to_on_shared_backends(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    conn = {"url": redis_server.url, "prefix": unique()}
    stores = [Store("redis", conn), Store("redis", conn)]
    a, b = (
        Cache(cache_dir=str(tmp_path / h), gc_interval_ms=0, store=s, secret=SECRET, namespace="o")
        for h, s in zip("ab", stores, strict=True)
    )
    try:
        big = "B" * 20_000
        await a.set("overwritten", big)
        await a.set("kept", big)
        await b.set("overwritten", "small")  # a's file for it is now an orphan
        old = time.time() - 60  # older than the GC's grace period for fresh files
        for f in entry_files(a.files.path):
            os.utime(f, (old, old))
        out = await a.gc()
        assert out["orphans"] == 1
        assert [f.name for f in entry_files(a.files.path)] == [a.files.name(b"kept")]
        assert await a.get("kept") == big
    finally:
        a.close()
        b.close()
        for s in stores:
            await s.aclose()


async def test_zeal_lifecycle_starts_and_stops_the_gc(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    store = await store_factory("table")
    zeal = Zeal(store=store)
    cache = cache_factory(store, secret=SECRET, gc_interval_ms=50, zeal=zeal)
    assert cache in zeal.services
    async with zeal:
        await _until(lambda: cache.stats().get("gc_sweeps", 0) >= 2)
    sweeps = cache.stats()["gc_sweeps"]
    assert sweeps >= 2
    await asyncio.sleep(0.15)
    assert cache.stats()["gc_sweeps"] == sweeps  # stopped with the app


async def test_cache_of_an_app_uses_the_apps_store(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    zeal = Zeal(store=await store_factory("table"))
    cache = cache_factory(None, secret=SECRET, zeal=zeal)
    assert cache.store is zeal.store and cache.store is not Store.default()
    await cache.set("k", 1)
    assert f"__{cache.namespace}" in zeal.store.names()
