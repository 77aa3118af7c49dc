"""RateLimiter on each backend: the algorithms, several limits, peek/reset, bad input, memory."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

import pytest

from tests.ratelimit.conftest import BACKENDS, away_from_minute_end, unique
from zeal_asgi.errors import (
    ConfigError,
    InvalidKeyError,
    KeyTooLongError,
    KeyTypeError,
    UnsupportedOperationError,
)
from zeal_asgi.ratelimit import RateLimit, RateLimiter, limiter as limiter_module
from zeal_asgi.shm.ext import incr_bounded
from zeal_asgi.store import Store

StoreFactory = Callable[[str], Any]


class Clock:
    """The table backend's clock, moved by hand (``limiter._time``)."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, start: float = 1_800_000_000.0) -> None:
        self.now = start
        monkeypatch.setattr(limiter_module, "_time", lambda: self.now)


@pytest.mark.parametrize("kind", BACKENDS)
async def test_fixed_window_admits_exactly_the_amount(
    store_factory: StoreFactory, kind: str
) -> None:
    away_from_minute_end(5)
    store = await store_factory(kind)
    lim = RateLimiter("5/minute", name=unique(), store=store)
    results = [await lim.hit("alice") for _ in range(8)]
    assert [r.allowed for r in results] == [True] * 5 + [False] * 3
    assert [r.remaining for r in results[:5]] == [4, 3, 2, 1, 0]
    refused = results[-1]
    assert refused.limit == 5 and refused.remaining == 0 and refused.error is None
    assert 0 < refused.retry_after <= 60 and 0 < refused.reset_after <= 60
    assert (await lim.hit("bob")).allowed  # keys are independent


@pytest.mark.parametrize("kind", BACKENDS)
async def test_peek_charges_nothing_and_reset_forgets(
    store_factory: StoreFactory, kind: str
) -> None:
    away_from_minute_end(5)
    store = await store_factory(kind)
    lim = RateLimiter("3/minute", name=unique(), store=store)
    assert (await lim.peek("k")).remaining == 3
    await lim.hit("k", cost=2)
    peek = await lim.peek("k")
    assert peek.allowed and peek.remaining == 1
    assert not (await lim.peek("k", cost=2)).allowed
    assert (await lim.hit("k")).remaining == 0
    assert not (await lim.hit("k")).allowed
    await lim.reset("k")
    assert (await lim.hit("k")).remaining == 2


@pytest.mark.parametrize("kind", BACKENDS)
@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window", "token_bucket"])
async def test_several_limits_all_apply_and_a_refusal_charges_none(
    store_factory: StoreFactory, kind: str, algorithm: Any
) -> None:
    away_from_minute_end(5)
    store = await store_factory(kind)
    lim = RateLimiter(
        ["3/hour", RateLimit(10, per=86400)], name=unique(), algorithm=algorithm, store=store
    )
    assert [(await lim.hit("k")).allowed for _ in range(4)] == [True, True, True, False]
    refused = await lim.hit("k")
    assert refused.policy == RateLimit(3, per=3600)
    # The daily limit was charged 3 times, not 5: the refused hits took nothing from it.
    lim2 = RateLimiter(
        ["100/hour", RateLimit(10, per=86400)], name=unique(), algorithm=algorithm, store=store
    )
    for _ in range(10):
        assert (await lim2.hit("k")).allowed
    last = await lim2.hit("k")
    assert not last.allowed and last.policy == RateLimit(10, per=86400)


async def test_a_refusal_gives_back_only_to_the_window_it_charged(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A hit at second 59 charges "2/second", is refused by "3/minute" and gives the second's
    # charge back.  If another worker's hit at second 60 restarted that row for its own window
    # in between, the give-back must leave the new window's count whole.  (A sliding window
    # keeps seconds 59 and 60 in two rows: its give-back cannot meet the next second's hit.)
    store = await store_factory("table")
    start = 1_800_000_000.0  # a whole minute
    clock = Clock(monkeypatch, start + 57.1)
    lim = RateLimiter(["2/second", "3/minute"], name=unique(), store=store)
    assert [lim.hit_now("k", 1).allowed for _ in range(2)] == [True, True]  # type: ignore[union-attr]
    clock.now = start + 58.1
    assert lim.hit_now("k", 1).allowed  # type: ignore[union-attr]  # the minute's 3 are used
    other: list[bool] = []

    def racing(*args: Any) -> tuple[int, bool]:
        value, ok = incr_bounded(*args)
        if not ok and not other:  # the minute refused the hit at 59.9: the next second begins
            clock.now = start + 60.1
            other.append(lim.hit_now("k", 1).allowed)  # type: ignore[union-attr]
        return value, ok

    monkeypatch.setattr(limiter_module, "incr_bounded", racing)
    clock.now = start + 59.9
    assert not lim.hit_now("k", 1).allowed  # type: ignore[union-attr]
    monkeypatch.setattr(limiter_module, "incr_bounded", incr_bounded)
    assert other == [True]
    clock.now = start + 60.2
    later = [lim.hit_now("k", 1).allowed for _ in range(3)]  # type: ignore[union-attr]
    assert later == [True, False, False]  # 2 in second 60 with the other worker's


@pytest.mark.parametrize("kind", BACKENDS)
async def test_token_bucket_allows_a_burst_of_the_amount(
    store_factory: StoreFactory, kind: str
) -> None:
    store = await store_factory(kind)
    lim = RateLimiter("10/hour", name=unique(), algorithm="token_bucket", store=store)
    results = [await lim.hit("k") for _ in range(11)]
    assert [r.allowed for r in results] == [True] * 10 + [False]
    assert results[9].remaining == 0
    assert 350 < results[10].retry_after <= 360  # one token: 3600 / 10 seconds


async def test_sliding_window_weighs_the_previous_window(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch, start=1_800_000_000.0)  # a multiple of 60: a window starts
    store = await store_factory("table")
    lim = RateLimiter("10/minute", name=unique(), algorithm="sliding_window", store=store)
    for _ in range(10):
        assert (await lim.hit("k")).allowed
    assert not (await lim.hit("k")).allowed
    clock.now += 60 + 15  # a quarter into the next window: floor(10 * 0.75) = 7 still count
    assert [(await lim.hit("k")).allowed for _ in range(4)] == [True, True, True, False]
    refused = await lim.hit("k")
    assert refused.remaining == 0 and 0 < refused.retry_after <= 45
    clock.now += refused.retry_after + 0.01
    assert (await lim.hit("k")).allowed
    clock.now += 120  # two windows later nothing counts
    assert (await lim.hit("k")).remaining == 9


async def test_fixed_window_starts_again_each_window(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    store = await store_factory("table")
    lim = RateLimiter("2/second", name=unique(), store=store)
    assert [(await lim.hit("k")).allowed for _ in range(3)] == [True, True, False]
    clock.now += 1
    assert [(await lim.hit("k")).allowed for _ in range(3)] == [True, True, False]


async def test_token_bucket_refills_one_token_per_interval(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    clock = Clock(monkeypatch)
    store = await store_factory("table")
    lim = RateLimiter("4/minute", name=unique(), algorithm="token_bucket", store=store)
    assert [(await lim.hit("k")).allowed for _ in range(5)] == [True] * 4 + [False]
    clock.now += 15  # one token
    assert [(await lim.hit("k")).allowed for _ in range(2)] == [True, False]
    clock.now += 60
    assert (await lim.hit("k")).remaining == 3


@pytest.mark.parametrize("kind", ["table", "redis"])
async def test_bad_input_is_a_typed_error(store_factory: StoreFactory, kind: str) -> None:
    store = await store_factory(kind)
    lim = RateLimiter("5/minute", name=unique(), store=store, key_size=16)
    for cost in (0, -1, 1.5, True, "2"):
        with pytest.raises(ConfigError, match="cost"):
            await lim.hit("k", cost=cost)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="above the limit"):
        await lim.hit("k", cost=6)
    with pytest.raises(KeyTooLongError, match="key_size=16"):
        await lim.hit("k" * 17)
    with pytest.raises(KeyTooLongError):
        await lim.hit("é" * 9)  # 18 bytes
    with pytest.raises(InvalidKeyError):
        await lim.hit("")
    with pytest.raises(KeyTypeError):
        await lim.hit(b"k")  # type: ignore[arg-type]
    assert (await lim.hit("k")).remaining == 4  # nothing was charged by the refused calls


@pytest.mark.parametrize(
    "options",
    [
        {"limits": "5 per fortnight"},
        {"limits": "0/minute"},
        {"limits": "5/minute", "algorithm": "leaky"},
        {"limits": "5/minute", "max_keys": 0},
        {"limits": "5/minute", "on_backend_error": "maybe"},
        {"limits": "5/minute", "name": "has space"},
    ],
)
def test_bad_declarations_are_config_errors(options: dict[str, Any]) -> None:
    options.setdefault("name", unique())
    with pytest.raises(ConfigError):
        RateLimiter(**options)


def test_one_name_one_set_of_limits() -> None:
    name = unique()
    RateLimiter("5/minute", name=name)
    RateLimiter("5/minute", name=name)  # the same declaration again (a module re-imported)
    with pytest.raises(ConfigError, match="already exists"):
        RateLimiter("6/minute", name=name)


async def test_memcached_is_refused_at_declaration(memcached_server: Any) -> None:
    store = Store("memcached", {"servers": memcached_server.url, "prefix": unique()})
    with pytest.raises(UnsupportedOperationError, match="table backend"):
        RateLimiter("5/minute", name=unique(), store=store)


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_a_table_full_of_live_keys_is_the_policy_counted_and_logged_once(
    store_factory: StoreFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    policy: Any,
) -> None:
    Clock(monkeypatch)
    store = await store_factory("table")
    lim = RateLimiter("5/minute", name=unique(), max_keys=4, on_backend_error=policy, store=store)
    for i in range(4):
        assert (await lim.hit(f"k{i}")).allowed
    with caplog.at_level(logging.WARNING, logger="zeal_asgi.ratelimit"):
        over = [await lim.hit(f"new{i}") for i in range(3)]
    assert all(r.error == "table_full" for r in over)
    assert all(r.allowed is (policy == "allow") for r in over)
    assert len([r for r in caplog.records if "full of live keys" in r.message]) == 1
    stats = lim.stats()
    assert stats["table_full"] == 3
    assert stats["fail_open" if policy == "allow" else "fail_closed"] == 3
    assert stats["allowed"] == 4
    assert (await lim.hit("k0")).allowed  # live keys keep working


@pytest.mark.parametrize("algorithm", ["fixed_window", "sliding_window"])
async def test_a_key_hit_in_every_window_keeps_its_rows(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch, algorithm: Any
) -> None:
    # max_keys=1: the table holds one key's rows; a key that goes on being hit, window after
    # window, restarts its rows in place and never needs another one (nor a sweep).
    clock = Clock(monkeypatch)
    store = await store_factory("table")
    lim = RateLimiter(
        RateLimit(2, per=0.25), name=unique(), algorithm=algorithm, max_keys=1, store=store
    )
    for _ in range(8):
        results = [await lim.hit("k") for _ in range(3)]
        assert all(r.error is None for r in results)
        if algorithm == "fixed_window":
            assert [r.allowed for r in results] == [True, True, False]
        clock.now += 0.5  # two windows later: the sliding window's weight is gone too
    assert lim.stats()["table_full"] == 0


async def test_rows_expire_and_a_full_table_takes_them_back(store_factory: StoreFactory) -> None:
    store = await store_factory("table")
    algorithms: tuple[Any, ...] = limiter_module.ALGORITHMS
    limiters = [
        RateLimiter(RateLimit(5, per=1), name=unique(), algorithm=a, max_keys=4, store=store)
        for a in algorithms
    ]
    filled = []
    for lim in limiters:
        n = 0
        while (await lim.hit(f"old{n}")).error is None:
            n += 1
        # 4 keys; a sliding window's key has a row for the current window only, so 8 fit
        assert n == (8 if lim.algorithm == "sliding_window" else 4)
        filled.append(n)
    # Every row expires at most 3 s after its last write (a sliding window's row is kept two
    # periods and a second): new keys take their places, with no sweep in between.
    await asyncio.sleep(3.2)
    for lim, n in zip(limiters, filled, strict=True):
        for i in range(n):
            r = await lim.hit(f"new{i}")
            assert r.allowed and r.error is None and r.remaining == 4
        assert lim.stats()["table_full"] == 1
        assert len(store.table(lim.table_name)) == n
        assert (await lim.peek("old0")).remaining == 5  # expired: forgotten, a full limit


async def test_stats_reach_the_store_and_the_host(store_factory: StoreFactory) -> None:
    away_from_minute_end(5)
    store = await store_factory("table")
    lim = RateLimiter("2/minute", name=unique(), store=store)
    for _ in range(5):
        await lim.hit("k")
    section = store.stats()["ratelimit"][lim.name]
    assert section["allowed"] == 2 and section["limited"] == 3


async def test_counters_in_health_and_prometheus(store_factory: StoreFactory) -> None:
    from zeal_asgi.health import collect, prometheus_text

    away_from_minute_end(5)
    store = await store_factory("table")
    lim = RateLimiter("2/minute", name=unique(), store=store)
    for _ in range(5):
        await lim.hit("k")
    health = await collect(store)
    assert health.host[f"zeal_ratelimit_{lim.name}_allowed_total"] == 2
    assert health.host[f"zeal_ratelimit_{lim.name}_limited_total"] == 3
    text = prometheus_text(health)
    assert f"zeal_ratelimit_{lim.name}_limited_total 3\n" in text
    assert f"# TYPE zeal_ratelimit_{lim.name}_allowed_total counter" in text


async def test_redis_cluster_keys_spread_over_the_shards(redis_cluster: Any) -> None:
    from tests.redis.test_topologies import _owner

    store = Store("redis", redis_cluster.routing_conn(prefix=unique()))  # where, not how fast
    try:
        await store.start()  # inside: a failed boot still closes what it opened
        lim = RateLimiter(
            ["3/hour", "5/day"], name=unique(), algorithm="sliding_window", store=store
        )
        keys = [f"user{i}" for i in range(12)]
        for k in keys:
            assert [(await lim.hit(k)).allowed for _ in range(4)] == [True] * 3 + [False]
        prefix = store.backend.prefix  # type: ignore[attr-defined]
        owners = set()
        for k in keys:
            name = f"{prefix}:rl:{{{lim.name}:{k}}}"
            owner = _owner(redis_cluster, name)
            assert owner.command("EXISTS", name) == 1  # every limit of the key in one hash
            owners.add(owner.port)
        assert len(owners) >= 2  # each key's hash on its own slot: spread over the shards
    finally:
        await store.aclose()


def test_counts_reach_the_host_when_an_event_loop_ends_before_its_flush(
    store_factory: StoreFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    from zeal_asgi.shm.hoststats import host_stats

    clock = Clock(monkeypatch)
    with asyncio.Runner() as runner:
        store = runner.run(store_factory("table"))
        lim = RateLimiter("5/hour", name=unique(), store=store)
        key = f"ratelimit_{lim.name}_allowed_total"
        for _ in range(3):  # each loop ends with its flush still pending
            with asyncio.Runner() as other:
                other.run(lim.hit("k"))
            clock.now += 2  # the next hit sees that the pending flush never ran
        assert host_stats().host().get(key, 0) == 3  # each later hit flushed all before it
        assert lim.stats()["allowed"] == 3
