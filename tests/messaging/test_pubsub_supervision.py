"""The supervised Redis subscriber: resubscribe, liveness, max_attempts, counters (real Redis)."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

from tests._harness.servers import RedisServer
from tests.messaging.helpers import until
from zeal_asgi.errors import BackendTimeoutError
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.store import Store

pytestmark = pytest.mark.redis


@pytest.fixture
async def store(fresh_redis: RedisServer) -> AsyncIterator[Store]:
    st = Store("redis", {"url": fresh_redis.url, "socket_timeout": 0.5})
    await st.start()
    yield st
    await st.aclose()


async def _publish_until_received(store: Store, got: list[str], tag: str) -> None:
    deadline = time.monotonic() + 10
    while tag not in got:
        assert time.monotonic() < deadline, f"{tag!r} never arrived"
        with contextlib.suppress(Exception):  # the server may still be coming back
            await store.publish("a", tag)
        await asyncio.sleep(0.05)


async def test_resubscribes_after_kill_restart_and_stop(
    store: Store, fresh_redis: RedisServer
) -> None:
    got: list[str] = []
    ps = PubSub(
        store, backoff_base=0.05, backoff_cap=0.2, liveness_interval=0.3, liveness_timeout=0.3
    )
    ps.subscribe("a", lambda p, c: got.append(p))
    await ps.start()
    try:
        assert await store.publish("a", "one") == 1
        await until(lambda: "one" in got)

        fresh_redis.command("CLIENT", "KILL", "TYPE", "pubsub")  # connection dropped
        await _publish_until_received(store, got, "two")
        assert ps.counters.values["reconnects"] >= 1

        fresh_redis.kill()  # server gone, then back on the same port
        await until(lambda: ps.state == "backoff")
        fresh_redis.start()
        await _publish_until_received(store, got, "three")
        before = ps.counters.values["reconnects"]
        assert before >= 2

        fresh_redis.pause()  # SIGSTOP: the socket stays open, nothing answers
        t0 = time.monotonic()
        await until(lambda: isinstance(ps.error, BackendTimeoutError), within=5)
        detected = time.monotonic() - t0
        fresh_redis.resume()
        await _publish_until_received(store, got, "four")
        print(f"pub/sub: stopped server detected in {detected:.2f} s (liveness 0.3 + 0.3 s)")
        assert detected < 2.0
        assert ps.counters.values["reconnects"] > before
        stats = store.stats()["pubsub"]
        assert stats["worker"]["reconnects"] >= 3
        assert stats["state"] == "subscribed"
    finally:
        await ps.stop()


async def test_max_attempts_fails_loudly(
    store: Store, fresh_redis: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    ps = PubSub(store, max_attempts=3, backoff_base=0.01, backoff_cap=0.05, ready_timeout=1)
    ps.subscribe("a", lambda p, c: None)
    await ps.start()
    try:
        fresh_redis.kill()
        await until(lambda: ps.state == "failed")
        assert "giving up after 3 failed attempts" in caplog.text
        assert store.stats()["pubsub"]["state"] == "failed"
    finally:
        await ps.stop()
        fresh_redis.start()


async def test_counters_errors_and_overflow(store: Store) -> None:
    release = asyncio.Event()
    slow_got: list[str] = []

    async def slow(payload: str, channel: str) -> None:
        await release.wait()
        slow_got.append(payload)

    def broken(payload: str, channel: str) -> None:
        raise RuntimeError("handler bug")

    ps = PubSub(store)
    ps.subscribe("slow", slow, queue_size=2)  # drop_oldest
    ps.subscribe("broken", broken)
    ps.subscribe("raw.*", lambda p, c: slow_got.append(f"{c}:{type(p).__name__}"), raw=True)
    await ps.start()
    try:
        for i in range(6):
            await store.publish("slow", f"s{i}")
        await store.publish("broken", "x")
        await store.publish("raw.b", b"\xff")
        await until(lambda: ps.counters.values["received"] >= 8)
        await until(lambda: ps.counters.values["handler_errors"] == 1)
        release.set()
        await until(lambda: "s5" in slow_got)
        # one in the handler, two queued: the three oldest waiting ones were dropped
        assert ps.counters.values["dropped"] == 3
        assert "s0" in slow_got and "s1" not in slow_got
        assert "raw.b:bytes" in slow_got
        worker = store.stats()["pubsub"]["worker"]
        assert worker["handler_errors"] >= 1 and worker["dropped"] >= 3
    finally:
        await ps.stop()


async def test_a_stop_given_up_on_while_the_server_hangs_still_ends_the_subscriber(
    store: Store, fresh_redis: RedisServer
) -> None:
    # stop() unsubscribes and waits (up to liveness_timeout) for the server's confirmation; a
    # stopped server never sends it, and a caller that gives up on stop() must not leave the
    # subscriber's task running.
    ps = PubSub(store, liveness_interval=30, liveness_timeout=30)
    ps.subscribe("a", lambda p, c: None)
    await ps.start()
    sub = ps.subscriber
    assert sub is not None and await sub.wait_ready(5)
    fresh_redis.pause()
    try:
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(sub.stop(), 0.3)
        assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("zeal-subscriber")]
    finally:
        fresh_redis.resume()
        await ps.stop()
