"""`Streams(max_attempts=)` counts consecutive failures of a loop, not its lifetime's (Redis)."""

from __future__ import annotations

import pytest

from tests._harness.servers import RedisServer
from tests.messaging.helpers import until
from zeal_asgi.store import Store
from zeal_asgi.streams import StreamEntry, Streams

pytestmark = pytest.mark.redis


async def test_a_reader_that_reads_between_failures_never_gives_up(
    fresh_redis: RedisServer,
) -> None:
    st = Store("redis", {"url": fresh_redis.url})
    await st.start()
    got: list[str] = []

    def on_job(payload: str, entry: StreamEntry) -> bool:
        got.append(payload)
        return True

    streams = Streams(st, max_attempts=2, backoff_base=0.01, backoff_cap=0.02)
    streams.subscribe("jobs", on_job, group="g", block_ms=50, reclaim_interval=0.05)
    await streams.start()
    try:
        for i in range(4):  # four failures in all, each after messages were read again
            payload = f"before kill {i}"
            await st.publish_reliable("jobs", payload)
            await until(lambda: payload in got, within=10.0)  # noqa: B023 - awaited at once
            reconnects = streams.counters.values["reconnects"]
            fresh_redis.command("CLIENT", "KILL", "TYPE", "normal")  # every connection dropped
            await until(lambda: streams.counters.values["reconnects"] > reconnects)  # noqa: B023
        await st.publish_reliable("jobs", "after")
        await until(lambda: "after" in got, within=10.0)
        assert streams.state == "running"
    finally:
        await streams.stop()
        await st.aclose()


async def test_a_reader_that_keeps_failing_gives_up_after_max_attempts(
    fresh_redis: RedisServer,
) -> None:
    st = Store("redis", {"url": fresh_redis.url})
    await st.start()
    streams = Streams(st, max_attempts=2, backoff_base=0.01, backoff_cap=0.02)
    streams.subscribe("jobs", lambda payload, entry: True, group="g", block_ms=50)
    await streams.start()
    try:
        fresh_redis.kill()  # nothing answers: each attempt fails at once
        await until(lambda: streams.state == "failed", within=20.0)
    finally:
        await streams.stop()
        await st.aclose()
