"""Redis-specific behaviour: key layout, atomic membership, TTL mode, batching, messaging,
counters, pool and per-loop clients."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer
from zeal_asgi import Counter
from zeal_asgi.errors import (
    BackendResponseError,
    IntegerOverflowError,
    InvalidKeyError,
    KeyTypeError,
    PoolTimeoutError,
    SerializationError,
    ZealError,
)
from zeal_asgi.store import Store
from zeal_asgi.store.backends.redis import RedisBackend

from .conftest import COLUMNS, redis_keys, unique_prefix


def _prefix(store: Store) -> str:
    backend = store.backend
    assert isinstance(backend, RedisBackend)
    return backend.prefix


async def test_layout_every_key_prefixed(redis_store: Store, redis_server: RedisServer) -> None:
    p = _prefix(redis_store)
    await redis_store.set("t", "alice", {"name": "A", "i4": 1})
    await redis_store.set("t", "__keys__", {"name": "not the set"})
    Counter(5, name="hits", store=redis_store)
    await Counter(5, name="hits", store=redis_store).increment()
    await redis_store.publish_reliable("jobs", "x")
    await redis_store.eval("return redis.call('SET', KEYS[1], ARGV[1])", ["free"], ["v"])
    keys = redis_keys(redis_server, f"{p}*")
    assert keys == sorted(
        [
            f"{p}:{{t}}:alice".encode(),
            f"{p}:{{t}}:___keys__".encode(),
            f"{p}:{{t}}:__keys__".encode(),
            f"{p}:schema:{{t}}".encode(),
            f"{p}:counter:hits".encode(),
            f"{p}:stream:jobs".encode(),
            f"{p}:free".encode(),
        ]
    )
    assert redis_server.command("TYPE", f"{p}:{{t}}:alice") == b"hash"
    members = redis_server.command("SMEMBERS", f"{p}:{{t}}:__keys__")
    assert isinstance(members, set)
    assert sorted(m for m in members if isinstance(m, bytes)) == [b"__keys__", b"alice"]
    assert redis_server.command("HGET", f"{p}:{{t}}:alice", "i4") == b"1"
    assert redis_server.command("HGET", f"{p}:{{t}}:alice", "f") == b"0.0"
    assert redis_server.command("GET", f"{p}:counter:hits") == b"6"


async def test_tracked_count_never_drifts(redis_server: RedisServer) -> None:
    # Two "workers" (separate backends, separate pools) race set/incr/delete/mset on the same
    # keys; afterwards the membership set holds exactly the existing rows.
    prefix = unique_prefix()
    stores = [Store("redis", {"url": redis_server.url, "prefix": prefix}) for _ in range(2)]
    for s in stores:
        s.make("t", 64, COLUMNS)
    rng = random.Random(7)
    keys = [f"k{i}" for i in range(12)]

    async def worker(s: Store) -> None:
        for _ in range(300):
            k = rng.choice(keys)
            match rng.randrange(5):
                case 0:
                    await s.set("t", k, {"i4": 1})
                case 1:
                    await s.delete("t", k)
                case 2:
                    await s.incr("t", k, rng.choice(("i8", "i4", "f")), 1)
                case 3:
                    await s.compare_and_set("t", k, "i1", 0, 1)
                case 4:
                    await s.set("t", k, FULL_ROW)
                case _:
                    await s.mset("t", {k: {"name": "m"}, rng.choice(keys): {"i2": 2}})

    try:
        await asyncio.gather(*(worker(s) for s in stores for _ in range(4)))
        rows = {k for k in keys if await stores[0].exists("t", k)}
        for k in rows:  # however a row was made, it holds every column
            assert len(redis_server.command("HGETALL", f"{prefix}:{{t}}:{k}")) == len(COLUMNS)
        assert await stores[1].count("t") == len(rows)
        members = redis_server.command("SMEMBERS", f"{prefix}:{{t}}:__keys__")
        assert isinstance(members, set)
        assert {m.decode() for m in members if isinstance(m, bytes)} == rows
    finally:
        for s in stores:
            await s.aclose()


FULL_ROW = {"name": "n", "i1": 1, "i2": 2, "i4": 4, "i8": 8, "f": 0.5, "b": b"x"}


@pytest.mark.parametrize(
    "write",
    [
        ("set", {"i4": 3}),
        ("set", FULL_ROW),
        ("set", {}),
        ("incr", "i8"),
        ("incr", "i4"),
        ("incr", "f"),
    ],
    ids=str,
)
async def test_a_write_that_creates_a_row_adds_its_zeros_and_membership(
    redis_store: Store, redis_server: RedisServer, write: tuple[str, Any]
) -> None:
    # the scripts add zeros and membership only when their write created the row (telling it
    # from the write's own reply and HLEN): a created row must still get both, whatever wrote it
    p = _prefix(redis_store)
    what, arg = write
    for _ in range(2):  # creates the row, then writes the existing row
        if what == "set":
            await redis_store.set("t", "r", arg)
        else:
            await redis_store.incr("t", "r", arg, 0)
        fields = redis_server.command("HGETALL", f"{p}:{{t}}:r")
        assert isinstance(fields, dict) and len(fields) == len(COLUMNS), fields
        assert redis_server.command("SMEMBERS", f"{p}:{{t}}:__keys__") == {b"r"}
    zeros = {"name": "", "i1": 0, "i2": 0, "i4": 0, "i8": 0, "f": 0.0, "b": b""}
    expected = {**zeros, **(arg if isinstance(arg, dict) else {})}
    assert await redis_store.get_strict("t", "r") == expected
    assert await redis_store.count("t") == 1
    # a row holding only the field written reads the same after the zeros are added
    redis_server.command("DEL", f"{p}:{{t}}:r")
    redis_server.command("HSET", f"{p}:{{t}}:r", "i4", "0")
    await redis_store.incr("t", "r", "i4", 5)
    assert await redis_store.get_strict("t", "r") == {**zeros, "i4": 5}
    assert await redis_store.count("t") == 1


async def test_ttl_mode(redis_server: RedisServer) -> None:
    store = Store("redis", {"url": redis_server.url, "prefix": unique_prefix()})
    p = _prefix(store)
    store.make("s", 10, {"n": (Store.TYPE_INT, 8)}, mode="ttl", ttl=30)
    store.make("s*", 10, {"n": (Store.TYPE_INT, 8)}, mode="ttl", ttl=30)  # glob in the name
    store.make("s2", 10, {"n": (Store.TYPE_INT, 8)})
    try:
        await store.set("s", "a", {"n": 1})
        await store.incr("s", "b", "n", 2)
        await store.compare_and_set("s", "c", "n", 0, 3)
        await store.set("s*", "x", {"n": 1})
        await store.set("s2", "y", {"n": 1})
        for k in ("a", "b", "c"):
            ttl = redis_server.command("PTTL", f"{p}:{{s}}:{k}")
            assert isinstance(ttl, int) and 29_000 < ttl <= 30_000
        assert redis_keys(redis_server, f"{p}:{{s}}:__keys__") == []  # no set in ttl mode
        assert await store.count("s") == 3  # not s* nor s2
        assert await store.count("s*") == 1
        # every write refreshes the expiry
        redis_server.command("PEXPIRE", f"{p}:{{s}}:a", 5000)
        await store.incr("s", "a", "n", 1)
        ttl = redis_server.command("PTTL", f"{p}:{{s}}:a")
        assert isinstance(ttl, int) and ttl > 29_000
        # an expired row is gone everywhere
        redis_server.command("PEXPIRE", f"{p}:{{s}}:b", 1)
        await asyncio.sleep(0.01)
        assert await store.get_strict("s", "b") is None
        assert await store.count("s") == 2
        assert sorted([k async for k, _ in store.iterate("s")]) == ["a", "c"]
        assert await store.clear("s") == 2
        assert await store.count("s*") == 1 and await store.count("s2") == 1
    finally:
        await store.aclose()


async def test_batches_and_round_trips(redis_store: Store, redis_server: RedisServer) -> None:
    backend = redis_store.backend
    assert isinstance(backend, RedisBackend)
    rows: dict[str | bytes, dict[str, Any]] = {f"k{i}": {"i4": i} for i in range(600)}
    await redis_store.exists("t", "k0")  # the first use of the table checks its schema
    before = backend.stats()["redis"]["commands"]
    assert await redis_store.mset("t", rows) == 600
    got = await redis_store.mget("t", list(rows))
    after = backend.stats()["redis"]["commands"]
    assert after - before == 2  # one pipelined round trip each
    assert [r and r["i4"] for r in got] == list(range(600))
    assert await redis_store.count("t") == 600
    # iterate streams rows while they are deleted: no crash, no row present throughout missed
    seen = set()
    async for key, _row in redis_store.iterate("t"):
        seen.add(key)
        if len(seen) == 10:
            for i in range(300, 400):
                await redis_store.delete("t", f"k{i}")
    assert {f"k{i}" for i in (*range(300), *range(400, 600))} <= seen
    assert await redis_store.clear("t") == 500
    p = _prefix(redis_store)
    assert redis_keys(redis_server, f"{p}*") == [f"{p}:schema:{{t}}".encode()]  # the declaration


async def test_eval_publish_and_streams(redis_store: Store, redis_server: RedisServer) -> None:
    backend = redis_store.backend
    assert isinstance(backend, RedisBackend)
    evil = "'); redis.call('FLUSHALL') --"
    assert await redis_store.eval("return {KEYS[1], ARGV[1]}", ["k"], [evil]) == [
        f"{backend.prefix}:k".encode(),
        evil.encode(),
    ]
    with pytest.raises(BackendResponseError):
        await redis_store.eval("return redis.call('NOPE')")
    with pytest.raises(SerializationError):
        await redis_store.eval("return 1", [], [True])
    with pytest.raises(KeyTypeError):
        await redis_store.eval("return 1", [1])  # type: ignore[list-item]
    # pub/sub: one receiver on the prefixed channel gets the payload
    sub_client = await backend.dedicated_client()
    pubsub = sub_client.pubsub()
    try:
        await pubsub.subscribe(backend.channel_name("news"))
        assert await redis_store.publish("news", b"hello") == 1
        msg = None
        for _ in range(50):
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=0.1)
            if msg is not None:
                break
        assert msg is not None and msg["data"] == b"hello"
        assert msg["channel"] == backend.channel_name("news").encode()
    finally:
        await pubsub.aclose()
        await sub_client.aclose()
    assert await redis_store.publish("nobody", "x") == 0
    with pytest.raises(InvalidKeyError):
        await redis_store.publish("", "x")
    with pytest.raises(SerializationError):
        await redis_store.publish("c", 1)  # type: ignore[arg-type]
    # streams: ids in order, payload field, approximate trimming
    ids = [await redis_store.publish_reliable("jobs", f"p{i}", max_len=10) for i in range(300)]
    parsed = [tuple(int(x) for x in i.split("-")) for i in ids]
    assert parsed == sorted(set(parsed))  # unique and increasing
    length = redis_server.command("XLEN", backend.stream_key("jobs"))
    assert isinstance(length, int) and 10 <= length < 300
    last = redis_server.command("XRANGE", backend.stream_key("jobs"), ids[-1], ids[-1])
    assert last == [(ids[-1].encode(), {b"payload": b"p299"})]


async def test_counter(redis_server: RedisServer) -> None:
    store = Store("redis", {"url": redis_server.url, "prefix": unique_prefix()})
    try:
        a = Counter(10, name="c", store=store)
        assert await a.get() == 10
        assert await a.increment(5) == 15
        b = Counter(99, name="c", store=store)  # another worker declaring it: no reset
        assert await b.get() == 15
        assert await b.decrement(20) == -5
        await a.set(2**63 - 1)
        with pytest.raises(IntegerOverflowError):
            await a.increment()
        assert await a.get() == 2**63 - 1
        await a.reset()
        assert await a.compare_and_set(0, 7) and not await a.compare_and_set(0, 8)
        assert await a.get() == 7
        fresh = Counter(0, name="never-written", store=store)
        redis_server.command("DEL", f"{_prefix(store)}:counter:never-written")
        assert await fresh.compare_and_set(0, 1)  # a missing counter counts as 0
        redis_server.command("SET", f"{_prefix(store)}:counter:c", "abc")
        with pytest.raises(BackendResponseError):
            await a.increment()
    finally:
        await store.aclose()


async def test_stats(redis_store: Store) -> None:
    await redis_store.set("t", "k", {"i4": 1})
    stats = redis_store.stats()
    assert stats["backend"] == "redis"
    r = stats["redis"]
    assert r["pool_size"] == 64 and r["in_use"] == 0 and r["waiting"] == 0
    assert r["acquires"] >= 2 and r["commands"] >= 2 and r["clients_created"] >= 1
    assert r["errors"] == 0
    for name in ("acquires", "commands", "clients_created"):
        assert r["host"][name] >= r[name]


async def test_pool_timeout_and_bounded_in_use(
    make_redis: Callable[..., RedisBackend],
) -> None:
    backend = make_redis(pool_size=2, acquire_timeout=0.05)
    await backend.start()
    release = asyncio.Event()
    peak = 0

    async def hold(c: Any) -> None:
        nonlocal peak
        peak = max(peak, backend.stats()["redis"]["in_use"])
        await release.wait()

    holders = [asyncio.create_task(backend.run(hold, what="hold")) for _ in range(2)]
    await asyncio.sleep(0.01)
    watch = Stopwatch()
    with pytest.raises(PoolTimeoutError) as info:
        await backend.ping()
    assert watch.wall() >= 0.04 and watch.own() < 0.1
    assert "acquire_timeout" in str(info.value)
    assert isinstance(info.value, TimeoutError) and isinstance(info.value, ZealError)
    release.set()
    await asyncio.gather(*holders)
    assert peak == 2 and backend.stats()["redis"]["acquire_timeouts"] == 1
    assert await backend.ping()


def test_a_new_event_loop_gets_a_new_client(redis_server: RedisServer) -> None:
    backend = RedisBackend.from_config({"url": redis_server.url, "prefix": unique_prefix()})

    async def use() -> Any:
        await backend.start()
        assert await backend.ping()
        client = await backend.client()
        await backend.aclose()
        return client

    first = asyncio.run(use())
    second = asyncio.run(use())
    assert first is not second
    assert backend.stats()["redis"]["clients_created"] == 2


async def test_unix_socket(tmp_path: Path) -> None:
    sock = tmp_path / "redis.sock"
    with RedisServer(extra_args=("--unixsocket", str(sock), "--unixsocketperm", "700")) as srv:
        store = Store("redis", f"unix://{sock}?db=2")
        store.make("t", 10, COLUMNS)
        try:
            await store.start()
            await store.set("t", "k", {"i4": 4})
            assert await store.get_strict("t", "k", "i4") == 4
            # row, membership set, schema
            assert srv.info("keyspace")["db2"]["keys"] == 3
            assert await store.count("t") == 1
        finally:
            await store.aclose()


async def test_ready_client_is_used_and_left_open(redis_server: RedisServer) -> None:
    client = Redis.from_url(redis_server.url)
    prefix = unique_prefix()
    store = Store("redis", {"client": client, "prefix": prefix})
    store.make("t", 10, COLUMNS)
    backend = store.backend
    assert isinstance(backend, RedisBackend)
    try:
        await store.start()
        await store.set("t", "k", {"name": "ready"})
        assert await store.incr("t", "k", "i8", 3) == 3  # the scripts through redis-py
        assert await store.incr("t", "k", "f", 0.5) == 0.5
        counter = Counter(2**63 - 1, name="top", store=store)
        with pytest.raises(IntegerOverflowError, match=r"'top'.*signed 64-bit range"):
            await counter.increment()  # redis-py's parsed refusal, translated like hiredis'
        assert await counter.get() == 2**63 - 1
        assert await backend.client() is client
        assert await client.hget(f"{prefix}:{{t}}:k", "name") == b"ready"
        other = await backend.dedicated_client()
        try:
            assert await other.ping()
            assert other.connection_pool is not client.connection_pool
        finally:
            await other.aclose()
        await store.aclose()
        assert await client.ping()  # the caller owns it: still open
    finally:
        await client.aclose()
