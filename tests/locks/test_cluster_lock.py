"""Cluster-scope ``zeal.lock`` on Redis: two servers exclude each other, tokens keep rising
(across a Redis restart that loses every key too), a lease that cannot be renewed cancels the
block with LockLostError, release deletes only our own lease and survives its cancellation."""

from __future__ import annotations

import asyncio
import concurrent.futures
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests._harness.apps import AppServer
from tests._harness.servers import RedisCluster, RedisServer, running
from tests.conftest import quick_or_long
from tests.locks.conftest import LOCKS_APP
from zeal_asgi import Store, Zeal
from zeal_asgi.errors import LockLostError, LockTimeoutError


def unique() -> str:
    return f"lock-{uuid.uuid4().hex[:12]}"


def redis_zeal(url: str, prefix: str, **options: Any) -> Zeal:
    return Zeal(store=Store("redis", {"url": url, "prefix": prefix, **options}))


@pytest.fixture(params=["redis", "tiered"])
async def zeals(redis_url: str, request: pytest.FixtureRequest) -> AsyncIterator[tuple[Zeal, Zeal]]:
    """Two apps on one Redis and one prefix (redis or tiered backend): two servers of one
    cluster."""
    conn = {"url": redis_url, "prefix": f"zt{uuid.uuid4().hex[:8]}"}
    a, b = (Zeal(store=Store(request.param, conn)) for _ in range(2))
    async with a, b:
        yield a, b


async def test_two_servers_exclude_each_other_and_tokens_rise(zeals: tuple[Zeal, Zeal]) -> None:
    a, b = zeals
    name = unique()
    async with a.lock(name, ttl=5, scope="cluster") as first:
        assert first.scope == "cluster"
        with pytest.raises(LockTimeoutError):
            async with b.lock(name, ttl=5, scope="cluster", timeout=0.2):
                pass
    async with b.lock(name, ttl=5, scope="cluster", timeout=0) as second:
        assert second.token > first.token


async def test_a_body_longer_than_the_ttl_keeps_the_cluster_lock(
    zeals: tuple[Zeal, Zeal],
) -> None:
    # The lease is renewed while the block runs: past two ttls it is still ours, and the other
    # server still cannot take it.
    a, b = zeals
    name = unique()
    async with a.lock(name, ttl=0.6, scope="cluster") as lease:
        with pytest.raises(LockTimeoutError):
            async with b.lock(name, ttl=0.6, scope="cluster", timeout=1.5):
                pass
        assert not lease.lost


async def test_eight_coroutines_on_each_of_two_servers_exclude_each_other(
    zeals: tuple[Zeal, Zeal],
) -> None:
    name, rounds = unique(), int(quick_or_long(20, 200))
    inside, total, overlaps = 0, 0, 0
    tokens: list[int] = []

    async def one(zeal: Zeal) -> None:
        nonlocal inside, total, overlaps
        for _ in range(rounds):
            async with zeal.lock(name, ttl=5, scope="cluster") as lease:
                inside += 1
                overlaps += inside != 1
                value = total
                await asyncio.sleep(0)
                total = value + 1
                tokens.append(lease.token)
                inside -= 1

    await asyncio.gather(*(one(z) for z in zeals for _ in range(8)))
    assert overlaps == 0 and total == 2 * 8 * rounds
    assert tokens == sorted(tokens) and len(set(tokens)) == len(tokens)


def test_two_app_servers_on_one_redis_exclude_each_other(redis_server: RedisServer) -> None:
    """Real servers: 8 coroutines per server on one cluster lock, a shared Redis counter
    updated with a read and a write apart inside the block."""
    redis_server.command("FLUSHALL")
    env = {"ZEAL_STORE_BACKEND": "redis", "ZEAL_REDIS_URL": redis_server.url}
    rounds = int(quick_or_long(25, 250))
    with running(AppServer(LOCKS_APP, env=env), AppServer(LOCKS_APP, env=env)) as servers:
        with concurrent.futures.ThreadPoolExecutor(2) as pool:
            replies = list(pool.map(lambda s: s.get("/hammer", n=rounds, scope="cluster"), servers))
        total = servers[0].get("/total")["total"]
    assert [r["overlaps"] for r in replies] == [0, 0]
    assert all(r["rising"] for r in replies)
    assert total == 2 * 8 * rounds


async def test_a_redis_restart_mid_lease_loses_the_lock_and_tokens_keep_rising(
    fresh_redis: RedisServer,
) -> None:
    """Server a holds the lock when Redis restarts and loses every key: server b gets the lock
    with a higher token, and a's block is cancelled with LockLostError."""
    a, b = redis_zeal(fresh_redis.url, "zt"), redis_zeal(fresh_redis.url, "zt")
    name = unique()
    held: asyncio.Future[int] = asyncio.get_running_loop().create_future()

    async def hold() -> None:
        async with a.lock(name, ttl=1, scope="cluster") as lease:
            held.set_result(lease.token)
            await asyncio.sleep(10)  # cancelled once a renewal finds the lease gone

    async with a, b:
        task = asyncio.create_task(hold())
        before = await held
        await asyncio.to_thread(fresh_redis.restart)  # no persistence: every key is gone
        async with b.lock(name, ttl=5, scope="cluster", timeout=5) as after:
            assert after.token > before
            with pytest.raises(LockLostError):
                await task


async def test_redis_unresponsive_past_the_ttl_loses_the_lock(fresh_redis: RedisServer) -> None:
    zeal = redis_zeal(fresh_redis.url, "zt", socket_timeout=0.2)
    async with zeal:
        with pytest.raises(LockLostError):
            async with zeal.lock(unique(), ttl=0.6, scope="cluster"):
                fresh_redis.pause()
                try:
                    await asyncio.sleep(10)  # renewals get no answer: cancelled at the ttl
                finally:
                    fresh_redis.resume()


async def test_a_cancelled_release_never_leaves_the_lock_held(zeals: tuple[Zeal, Zeal]) -> None:
    """redis-py#3847: a release cancelled in flight left the lock held for good."""
    a, b = zeals
    name = unique()
    for _ in range(5):
        entered = asyncio.Event()

        async def hold(entered: asyncio.Event = entered) -> None:
            async with a.lock(name, ttl=60, scope="cluster"):
                entered.set()
                await asyncio.sleep(0)
            # never reached when cancelled during the release

        task = asyncio.create_task(hold())
        await entered.wait()
        await asyncio.sleep(0)  # the block ends; its release is on the wire
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        # Long before the 60 s lease could expire:
        async with b.lock(name, ttl=5, scope="cluster", timeout=5):
            pass


async def test_release_deletes_only_its_own_lease(zeals: tuple[Zeal, Zeal]) -> None:
    a, b = zeals
    name = unique()
    key = f"lock:{{{name}}}"
    taken, done = asyncio.Event(), asyncio.Event()

    async def take() -> None:
        async with b.lock(name, ttl=30, scope="cluster", timeout=5):
            taken.set()
            await done.wait()

    async with a.lock(name, ttl=30, scope="cluster"):
        await a.store.eval("redis.call('DEL', KEYS[1])", [key])  # as if it had expired
        task = asyncio.create_task(take())
        await taken.wait()
    # a released (its owner id no longer matched): b's lease is untouched
    assert await a.store.eval("return redis.call('EXISTS', KEYS[1])", [key]) == 1
    done.set()
    await task
    assert await a.store.eval("return redis.call('EXISTS', KEYS[1])", [key]) == 0


async def test_cluster_locks_on_a_redis_cluster(redis_cluster: RedisCluster) -> None:
    """The lease, its fence and its mark share one slot (the name is a hash tag)."""
    zeal = Zeal(store=Store("redis", redis_cluster.routing_conn(prefix="zt")))
    async with zeal:
        tokens = []
        for name in ("a", "b{c}", "d}e{", unique()):
            for _ in range(2):
                async with zeal.lock(name, ttl=5, scope="cluster") as lease:
                    tokens.append(lease.token)
            assert tokens[-1] > tokens[-2]


async def test_one_leader_among_servers(zeals: tuple[Zeal, Zeal]) -> None:
    a, b = zeals
    assert await a.is_leader("cluster") is True
    assert await b.is_leader("cluster") is False
    await a.shutdown()  # hands leadership over: b leads at its next campaign
    for _ in range(50):
        if await b.is_leader("cluster"):
            break
        await asyncio.sleep(0.1)
    assert await b.is_leader("cluster") is True
