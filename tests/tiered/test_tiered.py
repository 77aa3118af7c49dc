"""The tiered backend: Store behaviour of the table backend, L1 use, invalidation across nodes."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import os
import time
import uuid
from typing import Any

import pytest

from tests._harness.servers import RedisServer
from tests.redis.test_parity import STEPS, outcome
from zeal_asgi.errors import ConfigError, UnknownTableError
from zeal_asgi.shm import Table
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.lease import Lease
from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend
from zeal_asgi.store.backends.tiered import TieredBackend

from .conftest import COLUMNS, MakeNode, settle, tiered, wait_for

PARITY_COLUMNS: dict[str, Any] = {
    "name": (Store.TYPE_STRING, 16),
    "i1": (Store.TYPE_INT, 1),
    "i2": (Store.TYPE_INT, 2),
    "i4": (Store.TYPE_INT, 4),
    "i8": (Store.TYPE_INT, 8),
    "f": (Store.TYPE_FLOAT,),
    "b": (Store.TYPE_BYTES, 8),
}


def _reader(key: str) -> Any:
    return lambda s: s.get_strict("t", key)


def _signed(backend: TieredBackend) -> bool:
    signed: bool = backend.stats()["tiered"]["signed"]
    return signed


def _metric(name: str) -> int:
    return host_stats().worker().get(f"tiered_{name}_total", 0)


async def test_same_outcomes_as_the_table(make_node: MakeNode) -> None:
    """Every step of the Redis parity suite, on two tiered nodes, answers like the table."""
    table = Store(backend=TableBackend(namespace=f"tp{uuid.uuid4().hex[:8]}"))
    a, b = await make_node(), await make_node()
    for s in (table, a, b):
        s.make("t", 256, PARITY_COLUMNS)
        s.make("bin", 64, {"v": (Store.TYPE_INT, 8)}, binary_keys=True)
        s.make("empty", 64, {})
    try:
        for name, op in STEPS:
            expected = await outcome(table, op)
            got = await outcome(a, op)
            assert got == expected, f"step {name!r}: table {expected!r}, tiered {got!r}"
            await settle(a, b)
            # node B reads through its own L1: it must agree after every write of node A
            for key in ("k", "n", "c", "fl", "z"):
                want = await outcome(table, _reader(key))
                assert await outcome(b, _reader(key)) == want, (name, key)
    finally:
        backend = table.backend
        assert isinstance(backend, TableBackend)
        backend.close_all()


async def test_reads_are_served_from_l1_while_fresh(
    make_node: MakeNode, redis_server: RedisServer, prefix: str
) -> None:
    node = await make_node(l1_ttl=0.3)
    await node.set("kv", "a", {"v": 1, "s": "one"})
    hits = _metric("l1_hits")
    # change L2 behind the backend's back: a fresh L1 copy keeps answering until l1_ttl
    redis_server.command("HSET", tiered(node).l2.row_key("kv", "a"), "v", "2")
    assert await node.get("kv", "a") == {"v": 1, "s": "one"}
    assert await node.get("kv", "a", "s") == "one"
    assert await node.exists("kv", "a")
    assert await node.exists_cached("kv", "a")
    assert _metric("l1_hits") >= hits + 3
    await asyncio.sleep(0.35)
    assert not await node.exists_cached("kv", "a")
    assert await node.get("kv", "a") == {"v": 2, "s": "one"}  # stale in L1: read from L2


async def test_writes_on_one_node_invalidate_the_others(make_node: MakeNode) -> None:
    a, b = await make_node(), await make_node()

    async def cached_on_b(key: str) -> None:
        await settle(a, b)  # else a message still in flight may drop the fill (as it should)
        await b.get("kv", key)
        assert await b.exists_cached("kv", key)

    await a.mset("kv", {"k1": {"v": 1}, "k2": {"v": 2}, "k3": {"v": 3}})
    for key in ("k1", "k2", "k3"):
        await cached_on_b(key)

    await a.set("kv", "k1", {"v": 10, "s": "x"})  # whole row
    await a.set("kv", "k2", {"s": "partial"})  # merged row
    await a.incr("kv", "k3", "v", 5)
    await settle(a, b)
    assert not await b.exists_cached("kv", "k1")
    assert await b.get("kv", "k1") == {"v": 10, "s": "x"}
    assert await b.get("kv", "k2") == {"v": 2, "s": "partial"}
    assert await b.get("kv", "k3", "v") == 8

    await cached_on_b("k1")
    assert await a.compare_and_set("kv", "k1", "v", 10, 11)
    await settle(a, b)
    assert await b.get("kv", "k1", "v") == 11

    await cached_on_b("k1")
    assert not await a.compare_and_set("kv", "k1", "v", 99, 12)  # no change: nothing to drop
    await a.mset("kv", {"k1": {"v": 20, "s": ""}, "k2": {"v": 21}})
    await settle(a, b)
    assert [r and r["v"] for r in await b.mget("kv", ["k1", "k2", "nope"])] == [20, 21, None]

    await cached_on_b("k1")
    assert await a.delete("kv", "k1")
    await settle(a, b)
    assert await b.get("kv", "k1") is False
    assert not await b.exists("kv", "k1")

    await cached_on_b("k2")
    assert await a.clear("kv") == 2
    await settle(a, b)
    assert await b.get_strict("kv", "k2") is None
    assert await b.count("kv") == 0
    st = b.stats()["tiered"]
    assert st["invalidation"]["rejected"] == dict.fromkeys(st["invalidation"]["rejected"], 0)
    assert st["invalidations_applied_total"] >= 7 and st["signed"]


async def test_same_server_messages_are_ignored_l1_is_shared(make_node: MakeNode) -> None:
    a = await make_node()
    own = _metric("invalidations_own")
    await a.set("kv", "x", {"v": 1, "s": ""})
    await settle(a)
    assert _metric("invalidations_own") == own + 1
    assert await a.exists_cached("kv", "x")  # its own put survives its own message


async def test_a_full_l1_evicts_instead_of_pinning_old_rows(make_node: MakeNode) -> None:
    node = await make_node(l1_rows=64, table={"max_rows": 4096})
    tn = tiered(node)
    evicted = _metric("l1_evictions")
    for i in range(600):
        await node.set("kv", f"k{i}", {"v": i, "s": ""})
    recent = [await node.exists_cached("kv", f"k{i}") for i in range(590, 600)]
    assert all(recent), recent  # new keys still get into L1
    assert _metric("l1_evictions") > evicted
    assert tn.l1.tables["kv"].stats()["rows"] <= 64
    assert await node.count("kv") == 600  # L2 holds everything
    assert (await node.get("kv", "k3"))["v"] == 3


def _hold_and_die(gens_name: str) -> None:
    gens = Table(1032, {"g": ("int", 8)}, name=gens_name)
    assert Lease(gens, 60.0, column="g").acquire("evict") is not None
    os._exit(0)  # dies holding the sweep's lease for another minute


async def test_a_sweeper_that_died_holding_the_lease_does_not_stop_eviction(
    make_node: MakeNode,
) -> None:
    """The L1 sweep is taken on the host lease: a worker killed mid-sweep frees it at once."""
    node = await make_node(l1_rows=64, table={"max_rows": 4096})
    tn = tiered(node)
    child = mp.get_context("fork").Process(target=_hold_and_die, args=(f"{tn.l1.namespace}:l1gen",))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    evicted = _metric("l1_evictions")
    for i in range(200):
        await node.set("kv", f"k{i}", {"v": i, "s": ""})
    assert _metric("l1_evictions") > evicted
    assert await node.exists_cached("kv", "k199")


async def test_l1_is_not_trusted_before_the_subscriber_runs(make_node: MakeNode) -> None:
    node = await make_node(start=False)
    await node.set("kv", "a", {"v": 1, "s": ""})
    bypass = _metric("l1_bypass")
    assert await node.get("kv", "a", "v") == 1
    assert not await node.exists_cached("kv", "a")
    assert _metric("l1_bypass") == bypass + 1
    with pytest.raises(UnknownTableError):
        await node.exists_cached("nope", "a")


async def test_ttl_tables_never_outlive_l2(make_node: MakeNode, redis_server: RedisServer) -> None:
    # Each step waits on what Redis says of the row (its PTTL), never on a sleep of a fixed
    # length: a loaded machine oversleeps, and a row read after its expiry is no longer there.
    node = await make_node(l1_ttl=30.0, table={"mode": "ttl", "ttl": 2})
    tn = tiered(node)

    def ms_left(key: str) -> int:
        return int(redis_server.command("PTTL", tn.l2.row_key("kv", key)))

    await node.set("kv", "w", {"v": 1, "s": ""})  # cached by the write
    await node.set("kv", "r", {"v": 2})  # partial: not cached by the write ...
    assert not await node.exists_cached("kv", "r")
    await wait_for(lambda: ms_left("r") <= 1000, what="r to be half way to its expiry")
    assert await node.get("kv", "r", "v") == 2  # ... but by this read, <= 1 s before expiry
    assert await node.exists_cached("kv", "r")
    # both expired in L2 (-2: no such key)
    await wait_for(lambda: ms_left("w") == ms_left("r") == -2, what="both rows to expire")
    # so neither is served from L1: not w, cached for 2 s by its write, nor r, which a read
    # that cached it for the table's 2 s would have kept a second longer than L2
    assert await node.get_strict("kv", "w") is None
    assert await node.get_strict("kv", "r") is None


async def test_generations_drop_a_fill_overtaken_by_an_invalidation(make_node: MakeNode) -> None:
    node = await make_node()
    tn, spec = tiered(node), node.spec("kv")
    token = tn.l1.snapshot("kv", "g")
    tn.l1.invalidate("kv", ["g"])  # a write lands while the L2 read is in flight
    assert not tn.l1.fill(spec, "g", {"v": 1, "s": ""}, token)
    assert not await node.exists_cached("kv", "g")
    token = tn.l1.snapshot("kv", "g")
    assert tn.l1.fill(spec, "g", {"v": 1, "s": ""}, token)
    assert await node.exists_cached("kv", "g")


async def test_pass_through_features(make_node: MakeNode, redis_server: RedisServer) -> None:
    node = await make_node()
    tn = tiered(node)
    assert await node.ping()
    assert await node.publish("news", "hello") == 0
    assert "-" in await node.publish_reliable("jobs", "payload")
    assert await node.eval("return redis.call('SET', KEYS[1], ARGV[1])", ["e"], ["v"]) == b"OK"
    assert tn.redis_link().channel_name("news").endswith(":ch:news")  # L2's link
    assert tn.channel.startswith(tn.l2.prefix + ":")  # the invalidation channel is prefixed
    c = tn.counter("hits", 0)
    assert await c.increment(2) == 2
    st = node.stats()
    assert st["tiered"]["subscriber"]["connected"] and "redis" in st and "kv" in st["l1"]["tables"]


@pytest.mark.parametrize(
    ("options", "fragment"),
    [
        ({"l1_ttl": 0}, "l1_ttl"),
        ({"l1_ttl": "5"}, "l1_ttl"),
        ({"l1_ttl": float("inf")}, "l1_ttl"),
        ({"l1_rows": 0}, "l1_rows"),
        ({"invalidation_secret": "short"}, "at least 16"),
        ({"l1_tll": 5}, "l1_tll"),
    ],
)
def test_bad_options(options: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        TieredBackend.from_config({"url": "redis://127.0.0.1:1", **options})


def test_secret_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ZEAL_TIERED_INVALIDATION_SECRET", "e" * 20)
    assert _signed(TieredBackend.from_config("redis://127.0.0.1:1"))
    assert _signed(
        TieredBackend.from_config({"url": "redis://127.0.0.1:1", "invalidation_secret": None})
    )
    monkeypatch.delenv("ZEAL_TIERED_INVALIDATION_SECRET")
    assert not _signed(TieredBackend.from_config("redis://127.0.0.1:1"))
    with pytest.raises(ConfigError):
        TieredBackend.from_config("redis://")


async def test_partial_writes_never_serve_invented_columns(make_node: MakeNode) -> None:
    a, b = await make_node(), await make_node()
    await b.set("kv", "p", {"v": 7, "s": "keep"})
    await settle(a, b)
    await a.set("kv", "p", {"v": 8})  # a never saw the row: it must not cache {"v": 8, "s": ""}
    assert not await a.exists_cached("kv", "p")
    assert await a.get("kv", "p") == {"v": 8, "s": "keep"}


async def test_reads_during_churn_stay_monotonic(make_node: MakeNode) -> None:
    """A writer on A and readers on B: B never goes back to an older value once it saw a newer.

    Exercises fills racing invalidations (the generation protocol) on a real event loop.
    """
    a, b = await make_node(), await make_node()
    stop = time.monotonic() + 1.0
    seen: dict[str, int] = {}
    regressions = 0

    async def writer() -> None:
        i = 0
        while time.monotonic() < stop:
            i += 1
            await a.set("kv", f"m{i % 4}", {"v": i, "s": ""})

    async def reader() -> None:
        nonlocal regressions
        while time.monotonic() < stop:
            key = f"m{os.urandom(1)[0] % 4}"
            row = await b.get_strict("kv", key)
            v = row["v"] if row else 0
            if v < seen.get(key, 0):
                regressions += 1
            seen[key] = max(v, seen.get(key, 0))

    await asyncio.gather(writer(), reader(), reader())
    await settle(a, b)
    for k in range(4):
        assert await b.get_strict("kv", f"m{k}") == await a.get_strict("kv", f"m{k}")
    assert regressions == 0


async def test_store_exists_cached_on_every_backend(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    node = await make_node()
    await node.set("kv", "a", {"v": 1, "s": ""})
    assert await node.exists_cached("kv", "a")
    assert not await node.exists_cached("kv", "b")
    table = Store(backend=TableBackend(namespace=f"tc{uuid.uuid4().hex[:8]}"))
    table.make("kv", 16, COLUMNS)
    redis = Store("redis", {"url": redis_server.url, "prefix": f"tc{uuid.uuid4().hex[:8]}"})
    redis.make("kv", 16, COLUMNS)
    try:
        for s in (table, redis):
            await s.set("kv", "a", {"v": 1})
        assert await table.exists_cached("kv", "a")  # the shared table is local memory
        assert not await redis.exists_cached("kv", "a")  # nothing is cached locally
        with pytest.raises(ValueError):
            await redis.exists_cached("kv", "")
    finally:
        await redis.aclose()
        backend = table.backend
        assert isinstance(backend, TableBackend)
        backend.close_all()


async def test_concurrent_writes_and_reads_share_one_connection(fresh_redis: RedisServer) -> None:
    # Each write's invalidation PUBLISH and a ttl table's PTTL on a read-through go on the
    # shared connection with the row commands: 64 writers and 64 readers at once opened one
    # pooled connection each for those.
    store = Store(
        "tiered",
        {
            "url": fresh_redis.url,
            "prefix": f"tt{uuid.uuid4().hex[:8]}",
            "l1_namespace": f"l1-{uuid.uuid4().hex[:8]}",
            "invalidation_secret": "tiered-test-secret-0123456789",
        },
    )
    store.make("kv", 256, COLUMNS, mode="ttl", ttl=60)
    await store.start()
    tn = tiered(store)
    try:
        await wait_for(lambda: tn.synced, what="the subscriber")
        await store.set("kv", "warm", {"v": -1})
        sent = tn.sent
        await asyncio.gather(*(store.set("kv", f"k{i}", {"v": i}) for i in range(64)))
        assert tn.sent == sent + 64
        tn.l1.clear(None)  # every read now goes through to Redis, with its PTTL
        got = await asyncio.gather(*(store.get("kv", f"k{i}", "v") for i in range(64)))
        assert got == list(range(64))
        listing = fresh_redis.command("CLIENT", "LIST")
        assert isinstance(listing, bytes)
        lines = listing.splitlines()
        # besides this test's own: the subscriber's and the one shared connection
        assert len(lines) == 3 and sum(b" sub=1 " in line for line in lines) == 1, listing
        assert tn.l2.stats()["redis"]["connections"] == 1
    finally:
        await store.aclose()
        tn.close_shared()
