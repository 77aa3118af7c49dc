"""Pub/sub, Streams and the router on every backend, and behind the wrappers (real servers)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests._harness.servers import Memcached, RedisCluster, RedisServer
from tests.messaging.helpers import until
from zeal_asgi.errors import UnsupportedOperationError
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.store import Store
from zeal_asgi.streams import StreamEntry, Streams

pytestmark = pytest.mark.redis

SECRET = "tiered invalidation secret, long enough"


def _conn(kind: str, url: str) -> tuple[str, dict[str, Any]]:
    if kind == "redis":
        return "redis", {"url": url}
    if kind == "tiered":
        return "tiered", {"url": url, "invalidation_secret": SECRET}
    return "redis", {"url": url, "on_error": "fallback_table"}  # behind the circuit breaker


@pytest.fixture(params=["redis", "tiered", "breaker"])
async def store(request: pytest.FixtureRequest, redis_url: str) -> AsyncIterator[Store]:
    kind, conn = _conn(request.param, redis_url)
    st = Store(kind, conn)
    await st.start()
    yield st
    await st.aclose()


async def test_pubsub_and_streams_through_every_redis_backend(store: Store) -> None:
    assert store.backend.redis_link() is not None
    got: list[tuple[str, str]] = []
    ps = PubSub(store)
    ps.subscribe("orders.*", lambda p, c: got.append((p, c)))
    await ps.start()
    streams = Streams(store)
    seen: list[str] = []

    def on_job(payload: str, entry: StreamEntry) -> bool:
        seen.append(payload)
        return True

    early = await store.publish_reliable("jobs", "before-the-group")  # group is made at id 0
    streams.subscribe("jobs", on_job, group="g", block_ms=100)
    await streams.start()
    try:
        assert await store.publish("orders.eu", "o1") == 1
        await until(lambda: ("o1", "orders.eu") in got, within=5.0)
        await store.publish_reliable("jobs", "after")
        await until(lambda: seen == ["before-the-group", "after"], within=5.0)
        assert early.count("-") == 1
        await until(lambda: streams.counters.values["acked"] == 2, within=5.0)
    finally:
        await streams.stop()
        await ps.stop()


async def test_memcached_has_no_pubsub(memcached_server: Memcached) -> None:
    st = Store("memcached", {"servers": f"127.0.0.1:{memcached_server.port}"})
    try:
        with pytest.raises(UnsupportedOperationError, match="memcached"):
            await st.publish("a", "x")
        ps = PubSub(st)
        ps.subscribe("a", lambda p, c: None)
        with pytest.raises(UnsupportedOperationError, match="pub/sub needs"):
            await ps.start()
        streams = Streams(st)
        streams.subscribe("s", lambda p, e: True)
        with pytest.raises(UnsupportedOperationError, match="Streams"):
            await streams.start()
    finally:
        await st.aclose()


async def test_stream_entries_pending_until_acked(fresh_redis: RedisServer) -> None:
    st = Store("redis", {"url": fresh_redis.url})
    await st.start()
    calls: list[int] = []

    async def flaky(payload: str, entry: StreamEntry) -> bool:
        calls.append(entry.deliveries)
        if len(calls) == 1:
            raise RuntimeError("first try fails")
        return len(calls) >= 3  # False once more, then True

    streams = Streams(st)
    streams.subscribe("work", flaky, group="g", min_idle_ms=100, reclaim_interval=0.1, block_ms=100)
    await streams.start()
    try:
        await st.publish_reliable("work", "w")
        await until(lambda: len(calls) >= 3, within=5.0)
        await until(lambda: streams.counters.values["acked"] == 1, within=5.0)
        assert calls[:3] == [1, 2, 3]  # the delivery count grows with each reclaim
        assert fresh_redis.command("XPENDING", "zeal:stream:work", "g")["pending"] == 0
        assert streams.counters.values["failed"] == 2
    finally:
        await streams.stop()
        await st.aclose()


async def test_redis_cluster_delivers(redis_cluster: RedisCluster) -> None:
    st = Store("redis", redis_cluster.routing_conn())
    await st.start()
    got: list[str] = []
    seen: list[str] = []
    ps = PubSub(st)
    ps.subscribe("news", lambda p, c: got.append(p))
    streams = Streams(st)

    def on_job(payload: str, entry: StreamEntry) -> bool:
        seen.append(payload)
        return True

    streams.subscribe("jobs", on_job, group="g", block_ms=100)
    await ps.start()
    await streams.start()
    try:
        # PUBLISH on a Cluster counts the subscribers of the node that ran it only
        await st.publish("news", "hi")
        await st.publish_reliable("jobs", "j1")
        await until(lambda: got == ["hi"] and seen == ["j1"], within=5.0)
    finally:
        await streams.stop()
        await ps.stop()
        await st.aclose()
