"""The breaker wrapper on a real Redis: fallback reads, fast-failing writes, nothing disabled."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer
from zeal_asgi.errors import (
    BackendAuthError,
    BackendResponseError,
    BackendUnavailableError,
    ColumnTypeError,
    ConfigError,
)
from zeal_asgi.settings import ZealSettings
from zeal_asgi.store import Capability, Store, StoreBackendKind
from zeal_asgi.store.backends.breaker import BreakerState, CircuitBreakerBackend
from zeal_asgi.store.backends.tiered import TieredBackend

from .conftest import COLUMNS, MakeStore, breaker_of


def state(store: Store) -> BreakerState:
    """The breaker state, read fresh."""
    return breaker_of(store).state


async def open_it(store: Store, server: RedisServer) -> None:
    """Kill the server and read until the breaker opens."""
    server.kill()
    for _ in range(50):
        await store.get("kv", "any")
        if state(store) is BreakerState.OPEN:
            return
    raise AssertionError("the breaker did not open")


def test_wrap_from_the_facade_and_bad_options() -> None:
    store = Store("redis", {"url": "redis://127.0.0.1:1", "on_error": "fallback_table"})
    b = breaker_of(store)
    assert b.kind is StoreBackendKind.REDIS and b.state is BreakerState.CLOSED
    assert (b.options.failure_threshold, b.options.open_seconds) == (5, 30)
    # the same backend gets the same shared state (every worker builds its own wrapper)
    again = CircuitBreakerBackend.wrap(b.primary)
    assert again.breaker.name == b.breaker.name
    again.close_shared()
    for bad in ({"failure_threshold": "5"}, {"open_seconds": -1}, {"bogus": 1}, "x"):
        with pytest.raises(ConfigError):
            Store(
                "redis",
                {"url": "redis://127.0.0.1:1", "on_error": "fallback_table", "breaker": bad},
            )
    with pytest.raises(ConfigError, match="on_error"):
        Store("redis", {"url": "redis://127.0.0.1:1", "on_error": "ignore"})
    b.close_shared()


@pytest.mark.parametrize("kind", ["redis", "memcached"])
def test_breaker_options_from_the_environment(kind: str) -> None:
    env = {
        "ZEAL_STORE_BACKEND": kind,
        "ZEAL_REDIS_URL": "redis://127.0.0.1:1",
        "ZEAL_MEMCACHED_SERVERS": "127.0.0.1:1",
        "ZEAL_ON_ERROR": "fallback_table",
        "ZEAL_BREAKER_FAILURE_THRESHOLD": "3",
        "ZEAL_BREAKER_FAILURE_WINDOW_SEC": "2.5",
        "ZEAL_BREAKER_OPEN_SECONDS": "0",
        "ZEAL_BREAKER_PROBE_LEASE_SEC": "4",
    }
    settings = ZealSettings.from_env(env)
    store = Store(settings.store_backend, settings.backend_conn())
    b = breaker_of(store)
    o = b.options
    assert (o.failure_threshold, o.failure_window_sec, o.open_seconds, o.probe_lease_sec) == (
        3,
        2.5,
        0.0,
        4.0,
    )
    b.close_shared()
    # unset ones keep the defaults
    settings = ZealSettings.from_env({**env, "ZEAL_BREAKER_OPEN_SECONDS": ""})
    assert "open_seconds" not in settings.breaker_options()
    bad = {
        "ZEAL_BREAKER_FAILURE_THRESHOLD": "0",
        "ZEAL_BREAKER_FAILURE_WINDOW_SEC": "nan",
        "ZEAL_BREAKER_OPEN_SECONDS": "-1",
        "ZEAL_BREAKER_PROBE_LEASE_SEC": "forever",
    }
    for name, value in bad.items():
        with pytest.raises(ConfigError, match=name):
            ZealSettings.from_env({**env, name: value})
    # breaker settings without a breaker are a mistake, not silently ignored
    without = {k: v for k, v in env.items() if k != "ZEAL_ON_ERROR"}
    with pytest.raises(ConfigError, match=r"ZEAL_BREAKER_FAILURE_THRESHOLD.*ZEAL_ON_ERROR"):
        ZealSettings.from_env(without)


async def test_open_reads_fall_back_and_writes_fail_fast(
    make_store: MakeStore, fresh_redis: RedisServer
) -> None:
    store = make_store(fresh_redis.url, {"failure_threshold": 3, "open_seconds": 30})
    await store.start()
    await store.set("kv", "a", {"v": 1, "s": "one"})  # whole row: mirrored
    await store.set("kv", "b", {"v": 2, "s": "two"})
    await store.set("kv", "b", {"s": "deux"})  # partial, merged into the mirrored row
    await store.incr("kv", "a", "v", 10)
    assert await store.get("kv", "c") is False  # a miss stays a miss
    await open_it(store, fresh_redis)

    assert await store.get("kv", "a") == {"v": 11, "s": "one"}
    assert await store.get("kv", "b", "s") == "deux"
    assert await store.exists("kv", "a") and not await store.exists("kv", "c")
    assert await store.mget("kv", ["a", "c"]) == [{"v": 11, "s": "one"}, None]
    assert await store.count("kv") == 2
    assert sorted([k async for k, _ in store.iterate("kv")]) == ["a", "b"]
    for write in (
        store.set("kv", "a", {"v": 2}),
        store.delete("kv", "a"),
        store.incr("kv", "a", "v"),
        store.mset("kv", {"x": {"v": 1}}),
        store.clear("kv"),
        store.compare_and_set("kv", "a", "v", 11, 12),
        store.publish("ch", "x"),
        store.publish_reliable("st", "x"),
        store.eval("return 1", [], []),
    ):
        watch = Stopwatch()
        with pytest.raises(BackendUnavailableError, match="circuit breaker open"):
            await write
        assert watch.own() < 0.005  # refused at once, no network wait
    counter = store.backend.counter("hits", 0)
    with pytest.raises(BackendUnavailableError):
        await counter.increment()
    assert not await store.ping()
    st = store.stats()["breaker"]
    assert st["state"] == "open" and st["opened_total"] >= 1
    assert st["short_circuited_total"] >= 10 and st["fallback_reads_total"] >= 6
    assert "kv" in store.stats()["fallback"]["tables"]


async def test_probe_closes_after_recovery_and_only_one_probe(
    make_store: MakeStore, fresh_redis: RedisServer
) -> None:
    store = make_store(fresh_redis.url, {"failure_threshold": 2, "open_seconds": 0.3})
    await store.start()
    await store.set("kv", "a", {"v": 1, "s": ""})
    await open_it(store, fresh_redis)
    probes = store.stats()["breaker"].get("probes_total", 0)
    await asyncio.sleep(0.35)
    # still down: the single probe fails and re-opens; concurrent callers are refused meanwhile
    results = await asyncio.gather(*(store.get_strict("kv", "a") for _ in range(20)))
    assert all(r == {"v": 1, "s": ""} for r in results)
    assert store.stats()["breaker"]["probes_total"] == probes + 1
    assert state(store) is BreakerState.OPEN
    fresh_redis.start()
    await asyncio.sleep(0.35)
    assert await store.set("kv", "a", {"v": 5, "s": "back"})  # the probe: a write is fine too
    assert state(store) is BreakerState.CLOSED
    assert await store.get("kv", "a") == {"v": 5, "s": "back"}
    st = store.stats()["breaker"]
    assert st["closed_total"] >= 1 and st["failures_in_window"] == 0


async def test_business_errors_never_count(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    store = make_store(redis_server.url, {"failure_threshold": 2})
    await store.start()
    for _ in range(5):
        with pytest.raises(ColumnTypeError):
            await store.set("kv", "a", {"v": "not an int"})
        with pytest.raises(BackendResponseError, match="WRONGTYPE"):  # Redis says no
            await store.eval(
                "redis.call('SET', KEYS[1], 'x'); return redis.call('LPUSH', KEYS[1], 1)",
                ["w"],
                [],
            )
    assert state(store) is BreakerState.CLOSED
    assert store.stats()["breaker"]["failures_in_window"] == 0


async def test_nothing_is_disabled_by_the_wrapper(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    store = make_store(redis_server.url)
    await store.start()
    backend = store.backend
    primary = breaker_of(store).primary
    assert backend.capabilities == primary.capabilities == frozenset(Capability)
    # the link the pub/sub and WebSocket code use is the primary's
    link = backend.redis_link()
    assert link is not None and link is primary.redis_link()
    client = await link.dedicated_client()
    try:
        async with client.pubsub() as ps:
            await ps.subscribe(link.channel_name("news"))
            await ps.get_message(timeout=1)
            assert await store.publish("news", "hi") == 1
            msg = await ps.get_message(timeout=1)
            assert msg is not None and msg["data"] == b"hi"
    finally:
        await client.aclose()
    assert "-" in await store.publish_reliable("jobs", "x")
    assert await store.eval("return ARGV[1]", [], ["ok"]) == b"ok"
    c = backend.counter("n", 5)
    assert await c.increment() == 6 and await c.get() == 6
    assert await c.compare_and_set(6, 1)
    await c.set(3)
    assert await c.get() == 3
    assert await store.ping()
    with pytest.raises(AttributeError):
        backend.no_such_thing  # type: ignore[attr-defined]  # noqa: B018


async def test_unreachable_at_startup_boots_degraded(make_store: MakeStore) -> None:
    store = make_store("redis://127.0.0.1:1", {"failure_threshold": 1})
    await store.start()  # no exception: the app boots and serves what it can
    assert state(store) is BreakerState.OPEN
    assert await store.get("kv", "a") is False
    with pytest.raises(BackendUnavailableError):
        await store.set("kv", "a", {"v": 1})


async def test_wrong_credentials_fail_the_boot(make_store: MakeStore) -> None:
    with RedisServer(password="right-password") as server:
        store = make_store(f"redis://:wrong@127.0.0.1:{server.port}")
        with pytest.raises(BackendAuthError):
            await store.start()


async def test_tiered_behind_the_breaker(make_store: MakeStore, redis_server: RedisServer) -> None:
    store = make_store(
        redis_server.url,
        kind="tiered",
        invalidation_secret="s" * 20,
        l1_namespace=f"bt{time.monotonic_ns()}",
    )
    await store.start()
    assert isinstance(breaker_of(store).primary, TieredBackend)
    for _ in range(200):
        if breaker_of(store).primary.synced:  # type: ignore[attr-defined]
            break
        await asyncio.sleep(0.01)
    await store.set("kv", "a", {"v": 1, "s": ""})
    assert await store.exists_cached("kv", "a")
    assert (await store.get("kv", "a"))["v"] == 1
    assert store.stats()["tiered"]["synced"]


async def test_a_probe_refused_before_any_io_proves_nothing(
    make_store: MakeStore, fresh_redis: RedisServer
) -> None:
    store = make_store(fresh_redis.url, {"failure_threshold": 1, "open_seconds": 0.2})
    await store.start()
    await open_it(store, fresh_redis)
    await asyncio.sleep(0.25)
    probes = store.stats()["breaker"]["probes_total"]
    with pytest.raises(ColumnTypeError):
        await store.set("kv", "a", {"v": "bad"})  # admitted as the probe, refused locally
    assert state(store) is BreakerState.OPEN  # not closed: Redis is still down
    with pytest.raises(BackendUnavailableError):
        await store.set("kv", "a", {"v": 1})  # the very next call probes (and fails)
    assert store.stats()["breaker"]["probes_total"] == probes + 2
    assert state(store) is BreakerState.OPEN


async def test_health_reports_the_breaker(make_store: MakeStore, fresh_redis: RedisServer) -> None:
    from zeal_asgi.health import collect

    store = make_store(fresh_redis.url, {"failure_threshold": 1})
    await store.start()
    await store.set("kv", "a", {"v": 1, "s": ""})
    health = await collect(store)
    assert health.status == "ok" and health.breaker is not None
    assert health.breaker.state == "closed" and "fallback:kv" in health.tables
    await open_it(store, fresh_redis)
    health = await collect(store)
    assert health.status == "unavailable" and "circuit breaker open" in (health.reason or "")
    assert health.breaker is not None and health.breaker.state == "open"
    assert health.host["zeal_breaker_opened_total"] >= 1


async def test_iterate_reads_redis_while_closed_and_falls_back_only_before_the_first_row(
    make_store: MakeStore, fresh_redis: RedisServer
) -> None:
    store = make_store(fresh_redis.url, {"failure_threshold": 5, "open_seconds": 30})
    store.make("big", 2048, COLUMNS)
    await store.start()
    await store.mset("big", {f"k{i}": {"v": i, "s": ""} for i in range(1500)})
    await store.set("kv", "a", {"v": 1, "s": "mirrored"})
    # closed: every row comes from Redis, not from what this host mirrored
    assert len([k async for k, _ in store.iterate("big")]) == 1500
    assert state(store) is BreakerState.CLOSED
    failures0 = breaker_of(store).breaker.failures_in_window()

    # Redis lost after the first rows: the iteration fails, it never mixes in fallback rows
    rows = store.iterate("big")
    seen = [await anext(rows)]
    fresh_redis.kill()
    with pytest.raises(BackendUnavailableError, match="middle of iterating 'big'"):
        async for key, _ in rows:
            seen.append(key)
    assert 1 <= len(seen) < 1500
    assert breaker_of(store).breaker.failures_in_window() == failures0 + 1

    # Redis down before the first row (still closed): the mirrored rows answer, and it counts
    fallback0 = store.stats()["breaker"].get("fallback_reads_total", 0)
    assert [k async for k, _ in store.iterate("kv")] == ["a"]
    assert state(store) is BreakerState.CLOSED
    assert breaker_of(store).breaker.failures_in_window() == failures0 + 2
    assert store.stats()["breaker"]["fallback_reads_total"] == fallback0 + 1
