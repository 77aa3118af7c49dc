"""The single-command fast path on a standalone server: scripts, cancellation, timeouts, bounds."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests._harness.proxy import Proxy
from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer
from zeal_asgi._redis.pipe import Template, pack
from zeal_asgi.errors import BackendTimeoutError
from zeal_asgi.store import Store
from zeal_asgi.store.backends.redis import RedisBackend

from .conftest import unique_prefix


def _store(url: str, **options: Any) -> tuple[Store, RedisBackend]:
    store = Store("redis", {"url": url, "prefix": unique_prefix(), **options})
    store.make("t", 100, {"name": (Store.TYPE_STRING, 16), "n": (Store.TYPE_INT, 8)})
    backend = store.backend
    assert isinstance(backend, RedisBackend)
    return store, backend


async def test_scripts_survive_a_flushed_script_cache(redis_server: RedisServer) -> None:
    store, _ = _store(redis_server.url)
    try:
        await store.set("t", "k", {"name": "a"})
        assert await store.incr("t", "k", "n", 2) == 2
        # a restart or failover empties the cache: NOSCRIPT, then the source, run exactly once
        redis_server.command("SCRIPT", "FLUSH")
        assert await store.incr("t", "k", "n", 3) == 5
        redis_server.command("SCRIPT", "FLUSH")
        await store.set("t", "k", {"name": "b"})
        redis_server.command("SCRIPT", "FLUSH")
        assert await store.get_strict("t", "k", "name") == "b"
        assert await store.get_strict("t", "k") == {"name": "b", "n": 5}
        assert await store.count("t") == 1
    finally:
        await store.aclose()


async def test_a_cancelled_call_leaves_no_reply_behind(redis_server: RedisServer) -> None:
    proxy = await Proxy(redis_server.port, 0.1).start()
    store, backend = _store(f"redis://{proxy.address}", pool_size=1, socket_timeout=2.0)
    try:
        await store.set("t", "a", {"name": "first"})
        await store.set("t", "b", {"name": "second"})
        for _ in range(3):
            # sent, then cancelled before its reply: the one connection must not hand that
            # late reply to the next caller
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.get_strict("t", "a"), 0.03)
            assert await store.get_strict("t", "b", "name") == "second"
        stats = backend.stats()["redis"]
        assert stats["in_use"] == 0 and stats["connections"] <= 1
    finally:
        await store.aclose()
        await proxy.aclose()


async def test_each_attempt_waits_socket_timeout_within_the_deadline(
    redis_server: RedisServer,
) -> None:
    proxy = await Proxy(redis_server.port, 0.5).start()
    store, backend = _store(f"redis://{proxy.address}", socket_timeout=0.1, deadline=1.0, retries=0)
    try:
        for _ in range(2):  # the first opens its connection, the second reopens it
            watch = Stopwatch()
            with pytest.raises(BackendTimeoutError) as info:
                await store.get_strict("t", "k")
            # the reply is 0.5 s late: socket_timeout ends the attempt, not the 1 s deadline
            assert watch.wall() >= 0.09 and watch.own() < 0.3, (watch.wall(), watch.own())
            assert "socket_timeout (100 ms)" in str(info.value)
        assert backend.stats()["redis"]["retries"] == 0
    finally:
        await store.aclose()
        await proxy.aclose()


async def test_connections_stay_within_pool_size(redis_server: RedisServer) -> None:
    pool = 3
    store, backend = _store(redis_server.url, pool_size=pool)
    try:
        await asyncio.gather(*(store.set("t", f"k{i}", {"n": i}) for i in range(50)))
        rows = await asyncio.gather(*(store.get_strict("t", f"k{i}", "n") for i in range(50)))
        assert rows == list(range(50))
        stats = backend.stats()["redis"]
        assert 1 <= stats["connections"] <= pool
        clients = redis_server.command("CLIENT", "LIST")
        assert isinstance(clients, bytes)
        # this process holds at most pool fast-path connections (+ the pooled client's, unused)
        assert clients.count(b"\n") <= pool + 1
    finally:
        await store.aclose()
    assert backend.stats()["redis"]["connections"] == 0


async def test_replies_keep_their_types(redis_server: RedisServer) -> None:
    store, backend = _store(redis_server.url)
    try:
        assert await backend.ping() is True
        assert await store.exists("t", "nope") is False
        assert await store.get_strict("t", "nope") is None
        assert await store.get_strict("t", "nope", "n") is None
        await store.set("t", "k", {"n": -(2**63)})
        assert await store.get_strict("t", "k") == {"name": "", "n": -(2**63)}
        assert await store.exists("t", "k") is True
        assert await store.publish("nobody-listens", b"x") == 0
        entry = await store.publish_reliable("s", "payload", max_len=10)
        assert isinstance(entry, str) and "-" in entry
        watch = Stopwatch()
        assert await store.delete("t", "k") is True
        assert await store.delete("t", "k") is False
        assert watch.own() < 1.0
    finally:
        await store.aclose()


async def test_incr_results_are_exact_around_2_to_the_53(redis_server: RedisServer) -> None:
    # below 2^53 the script answers with an integer reply, from there on with the stored string
    store, _ = _store(redis_server.url)
    try:
        await store.set("t", "k", {"n": 2**53 - 3})
        got = [await store.incr("t", "k", "n") for _ in range(5)]
        assert got == [2**53 - 2, 2**53 - 1, 2**53, 2**53 + 1, 2**53 + 2]
        await store.set("t", "k", {"n": -(2**53) + 1})
        assert await store.incr("t", "k", "n", -1) == -(2**53)
        assert await store.incr("t", "k", "n", -1) == -(2**53) - 1
        assert await store.get_strict("t", "k", "n") == -(2**53) - 1
    finally:
        await store.aclose()


def test_a_template_packs_as_pack_does() -> None:
    # '%' in a kept argument or a filled-in one is just a byte (the template is a format)
    args = ("EVALSHA", "f" * 40, 2, b"row", b"%d%%", 0, b"k%b", "col", 7, -(2**63), 2.5, b"")
    for holes in [(), (3,), (0, 11), (3, 7, 9), (4,), tuple(range(len(args)))]:
        tpl = Template([None if i in holes else a for i, a in enumerate(args)], holes)
        filled = tpl.fill(*(pack((args[i],)).split(b"\r\n")[2] for i in holes))
        assert filled == pack(args)


async def test_slots_go_to_waiters_in_order_and_none_leaks(redis_server: RedisServer) -> None:
    # one slot: the holder's release hands it to the oldest waiter still waiting; the waiters
    # cancelled in the queue are skipped, and the slot is free again at the end
    store, backend = _store(redis_server.url, pool_size=1, acquire_timeout=5.0)
    try:
        await store.set("t", "k", {"n": 0})
        release = asyncio.Event()
        order: list[int] = []

        async def hold(c: Any) -> None:
            await release.wait()

        async def incr(i: int) -> None:
            await store.incr("t", "k", "n")
            order.append(i)

        holder = asyncio.create_task(backend.run(hold, what="hold"))
        await asyncio.sleep(0.01)
        waiters = [asyncio.create_task(incr(i)) for i in range(6)]
        await asyncio.sleep(0.01)
        assert backend.stats()["redis"]["waiting"] == 6
        waiters[0].cancel()
        waiters[3].cancel()
        release.set()
        await holder
        await asyncio.gather(*waiters, return_exceptions=True)
        assert order == [1, 2, 4, 5]
        assert await store.get_strict("t", "k", "n") == 4
        stats = backend.stats()["redis"]
        assert stats["in_use"] == 0 and stats["waiting"] == 0
        assert await store.incr("t", "k", "n") == 5  # the one slot is free again
    finally:
        await store.aclose()
