"""The Redis subscriber's read loop: bursts reach the handlers, idle connections stay up."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

import pytest
import redis.asyncio as aioredis

from tests._harness.servers import RedisServer
from tests.messaging.helpers import until
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.store import Store

pytestmark = pytest.mark.redis


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:
    st = Store("redis", {"url": redis_server.url, "prefix": f"zl{time.monotonic_ns()}"})
    await st.start()
    yield st
    await st.aclose()


async def test_a_burst_larger_than_the_queue_is_not_dropped(
    store: Store, redis_server: RedisServer
) -> None:
    # Thousands of small messages arrive in a few socket reads; the listener parses them
    # without suspending, so it must let the handler drain its queue during the burst.
    got: list[str] = []
    ps = PubSub(store)
    ps.subscribe("burst", lambda p, c: got.append(p), queue_size=64)
    await ps.start()
    wire = store.backend.channel_name("burst")  # type: ignore[attr-defined]
    raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        n = 5000
        pipe = raw.pipeline(transaction=False)
        for i in range(n):
            pipe.publish(wire, str(i))
        assert set(await pipe.execute()) == {1}
        await until(lambda: len(got) == n or ps.counters.values["dropped"] > 0)
        print(f"burst of {n}: delivered={len(got)} dropped={ps.counters.values['dropped']}")
        assert ps.counters.values["dropped"] == 0
        assert got == [str(i) for i in range(n)]
    finally:
        await raw.aclose()
        await ps.stop()


async def test_an_idle_connection_is_pinged_not_dropped(store: Store) -> None:
    got: list[str] = []
    ps = PubSub(store, liveness_interval=0.05, liveness_timeout=0.2)
    ps.subscribe("idle", lambda p, c: got.append(p))
    await ps.start()
    try:
        await asyncio.sleep(0.6)  # a dozen idle intervals: PINGed, answered, kept
        assert ps.state == "subscribed" and ps.error is None
        assert ps.counters.values["reconnects"] == 0
        assert await store.publish("idle", "still here") == 1
        await until(lambda: got == ["still here"])
    finally:
        await ps.stop()


async def test_a_burst_of_system_publishes_waits_for_the_slots(redis_server: RedisServer) -> None:
    # A WebSocket join storm publishes presence events on system topics: they must queue for
    # the backend's pool_size slots, not open (or fail to open) a connection each.
    store = Store(
        "redis", {"url": redis_server.url, "prefix": f"zs{time.monotonic_ns()}", "pool_size": 2}
    )
    await store.start()
    got: list[bytes] = []
    ps = PubSub(store)
    await ps.start()
    try:
        await ps.add_system("ws:burst", lambda p, c: got.append(p))
        wire = str(store.backend.key("ws:burst")).encode()  # type: ignore[attr-defined]
        await until(lambda: redis_server.command("PUBSUB", "NUMSUB", wire) == [wire, 1])
        before = store.stats()["redis"]["acquires"]
        n = 300
        sent = await asyncio.gather(*(ps.publish_system("ws:burst", b"%d" % i) for i in range(n)))
        assert sent == [1] * n
        assert store.stats()["redis"]["acquires"] - before == n
        assert store.stats()["redis"]["connections"] <= 2
        await until(lambda: len(got) == n)
    finally:
        await ps.stop()
        await store.aclose()


async def test_a_stopped_worker_is_no_receiver_once_stop_returns(
    store: Store, redis_server: RedisServer
) -> None:
    # Closing the socket alone leaves the server counting the subscriber until it next reads
    # that socket (a PUBLISH meanwhile still counted it, seen once in a CI run); stop()
    # unsubscribes and waits for the server's confirmation first.  A missed confirmation
    # would make each stop wait out liveness_timeout, and this test its time limit.
    wire = store.backend.channel_name("news")  # type: ignore[attr-defined]
    raw = aioredis.Redis(host="127.0.0.1", port=redis_server.port)
    try:
        for _ in range(50):
            ps = PubSub(store, liveness_timeout=30)
            ps.subscribe("news", lambda p, c: None)
            ps.subscribe("ne*", lambda p, c: None)
            await ps.start()
            assert await store.publish("news", "a") == 1
            await ps.stop()
            assert await raw.pubsub_numsub(wire) == [(wire.encode(), 0)]
            assert await raw.pubsub_numpat() == 0
            assert await store.publish("news", "b") == 0
    finally:
        await raw.aclose()
