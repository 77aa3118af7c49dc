"""``zeal.subscribe`` / ``zeal.subscribe_reliable``: function and decorator forms, lifecycle."""

from __future__ import annotations

import math

import pytest

from tests._harness.servers import RedisServer
from tests.messaging.helpers import until
from zeal_asgi import Zeal
from zeal_asgi.errors import ConfigError, UnsupportedOperationError
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.store import Store
from zeal_asgi.streams import StreamEntry, Streams, apply_once, idempotent


async def test_subscribe_forms_on_the_table_backend() -> None:
    zeal = Zeal(store=Store("table"))
    got: list[tuple[str, str]] = []

    @zeal.subscribe("alerts.*")
    async def on_alert(payload: str, channel: str) -> None:
        got.append((payload, channel))

    zeal.subscribe("plain", lambda p, c: got.append((p, c)))
    with pytest.raises(ConfigError, match="overflow"):
        zeal.subscribe("x", lambda p, c: None, overflow="block")
    try:
        async with zeal:
            assert await zeal.store.publish("alerts.disk", "90%") == 1
            assert await zeal.store.publish("plain", "p") == 1
            await until(lambda: len(got) == 2, within=5.0)
            assert ("90%", "alerts.disk") in got and ("p", "plain") in got
            assert zeal.stats()["pubsub"]["state"] == "subscribed"
            with pytest.raises(UnsupportedOperationError, match="Streams"):
                await zeal.store.publish_reliable("s", "x")
        assert zeal.pubsub.state == "stopped"
        assert zeal.pubsub.subscriptions[0].task is None  # cancelled and awaited
    finally:
        close_host_bus()


@pytest.mark.redis
async def test_subscribe_reliable_forms(redis_server: RedisServer) -> None:
    redis_server.command("FLUSHALL")
    store = Store("redis", {"url": redis_server.url})
    zeal = Zeal(store=store)
    done: list[str] = []

    @zeal.subscribe_reliable("orders", block_ms=100)
    async def on_order(payload: str, entry: StreamEntry) -> bool:
        # exactly-once effect + a claim for an outside effect
        await apply_once(f"order:{entry.id}", [("INCRBY", "orders:total", 1)], store=store)
        if await idempotent(f"mail:{payload}", ttl=60, store=store):
            done.append(payload)
        return True

    async with zeal:
        await store.publish_reliable("orders", "o1")
        await store.publish_reliable("orders", "o1")  # same business key twice
        await until(lambda: zeal.streams.counters.values["acked"] == 2, within=5.0)
        assert done == ["o1"]
        assert redis_server.command("GET", "zeal:orders:total") == b"2"
        groups = redis_server.command("XINFO", "GROUPS", "zeal:stream:orders")
        assert isinstance(groups, list) and len(groups) == 1
        assert b"on_order" in groups[0][b"name"]
    with pytest.raises(ConfigError):
        await apply_once("k", [("FLUSHALL", "x")], store=store)


@pytest.mark.parametrize("runner", [PubSub, Streams])
@pytest.mark.parametrize(
    ("option", "value"),
    [
        ("backoff_base", math.nan),
        ("backoff_base", -0.1),
        ("backoff_cap", math.inf),
        ("backoff_cap", "5"),
        ("liveness_timeout", 0),
        ("liveness_timeout", True),
        ("max_attempts", 1.5),
        ("max_attempts", -1),
    ],
)
def test_runner_options_refuse_what_is_not_a_duration_or_a_count(
    runner: type[PubSub | Streams], option: str, value: object
) -> None:
    with pytest.raises(ConfigError, match=option):
        runner(Store("table"), **{option: value})  # type: ignore[arg-type]
    # zero backoff is allowed (retry at once); the options keep what was given
    kept = runner(Store("table"), backoff_base=0, backoff_cap=0.5, liveness_timeout=1)
    assert (kept.backoff_base, kept.backoff_cap, kept.liveness_timeout) == (0.0, 0.5, 1.0)
