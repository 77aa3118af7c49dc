"""``LimitsStorage`` (``zeal://``) through the ``limits`` library's storage interface and
strategies, across processes, and under slowapi with 2 workers (where ``memory://`` lets each
worker admit the whole limit)."""

from __future__ import annotations

import collections
import concurrent.futures
import math
import multiprocessing as mp
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from limits import RateLimitItemPerMinute, RateLimitItemPerSecond, parse
from limits.storage import storage_from_string
from limits.strategies import (
    FixedWindowRateLimiter,
    MovingWindowRateLimiter,
    SlidingWindowCounterRateLimiter,
)

from tests._harness.apps import AppServers
from tests.ratelimit.conftest import away_from_minute_end, unique
from zeal_asgi.errors import ConfigError
from zeal_asgi.ratelimit import LimitsStorage
from zeal_asgi.shm.segments import destroy


@pytest.fixture
def storage() -> Iterator[LimitsStorage]:
    s = storage_from_string("zeal://?max_keys=512")
    assert isinstance(s, LimitsStorage)
    s.reset()
    yield s
    s.reset()


@pytest.fixture(scope="module", autouse=True)
def _unlink_tables() -> Iterator[None]:
    yield
    from zeal_asgi.ratelimit import limits_storage

    for table in limits_storage._tables.values():
        destroy(table)
    limits_storage._tables.clear()


def at_second_start() -> None:
    """Wait for the next whole second (limits' own tests start their windows so)."""
    time.sleep(math.ceil(time.time()) - time.time())


def key() -> str:
    return unique("LIMITER/")


def test_scheme_and_check(storage: LimitsStorage) -> None:
    assert storage.check()
    with pytest.raises(ConfigError):
        storage_from_string("zeal://?max_keys=lots")
    with pytest.raises(ConfigError):
        storage_from_string("zeal://?flavour=1")
    with pytest.raises(NotImplementedError):
        MovingWindowRateLimiter(storage)  # the moving window needs a log of every hit


def test_incr_get_clear_reset(storage: LimitsStorage) -> None:
    limit = RateLimitItemPerMinute(1)
    k = limit.key_for(key())
    assert storage.incr(k, limit.get_expiry(), amount=1) == 1
    assert storage.incr(k, limit.get_expiry(), amount=10) == 11
    assert storage.get(k) == 11
    assert time.time() < storage.get_expiry(k) <= time.time() + 60
    storage.clear(k)
    assert storage.get(k) == 0
    assert storage.get_expiry(k) == pytest.approx(time.time(), abs=1)
    for i in range(10):
        storage.incr(limit.key_for(str(i)), limit.get_expiry())
        storage.incr(RateLimitItemPerMinute(10, namespace="OTHER").key_for(str(i)), 60)
    assert storage.reset() == 20


def test_a_counter_expires_with_its_window(storage: LimitsStorage) -> None:
    at_second_start()
    limit = RateLimitItemPerSecond(1)
    k = limit.key_for(key())
    storage.incr(k, limit.get_expiry())
    assert storage.get(k) == 1
    time.sleep(1.1)
    assert storage.get(k) == 0
    assert storage.incr(k, limit.get_expiry()) == 1  # a new window starts at zero


def test_fixed_window_strategy(storage: LimitsStorage) -> None:
    at_second_start()
    limiter = FixedWindowRateLimiter(storage)
    limit = RateLimitItemPerSecond(10, 2)
    k = key()
    assert limiter.get_window_stats(limit, k).remaining == 10
    assert all(limiter.hit(limit, k) for _ in range(10))
    assert not limiter.hit(limit, k)
    stats = limiter.get_window_stats(limit, k)
    assert stats.remaining == 0 and time.time() < stats.reset_time <= time.time() + 2
    minute = RateLimitItemPerMinute(10)
    assert not limiter.hit(minute, "k1", cost=11)
    assert limiter.hit(minute, "k2", cost=5)
    assert limiter.get_window_stats(minute, "k2").remaining == 5
    assert not limiter.test(minute, "k2", cost=6)
    assert limiter.test(minute, "k2", cost=5)


def test_sliding_window_counter_strategy(storage: LimitsStorage) -> None:
    limiter = SlidingWindowCounterRateLimiter(storage)
    limit = parse("10/hour")
    k = key()
    assert limiter.get_window_stats(limit, k).remaining == 10
    assert all(limiter.hit(limit, k) for _ in range(10))
    assert not limiter.hit(limit, k)
    assert not limiter.test(limit, k)
    assert limiter.get_window_stats(limit, k).remaining == 0
    limiter.clear(limit, k)
    assert limiter.get_window_stats(limit, k).remaining == 10
    assert not limiter.hit(limit, k, cost=11)
    assert limiter.hit(limit, k, cost=4)
    assert not limiter.hit(limit, k, cost=7)
    assert limiter.hit(limit, k, cost=6)


def _hits(uri: str, k: str, out: Any) -> None:
    limiter = FixedWindowRateLimiter(storage_from_string(uri))
    out.put(sum(limiter.hit(parse("100/minute"), k) for _ in range(60)))


@pytest.mark.parametrize("uri", ["zeal://?max_keys=512", "memory://"])
def test_processes_share_zeal_counts_and_not_memory_ones(uri: str) -> None:
    away_from_minute_end(10)
    storage_from_string("zeal://?max_keys=512")  # the table exists before the fork
    ctx: Any = mp.get_context("fork")
    out = ctx.Queue()
    k = key()
    procs = [ctx.Process(target=_hits, args=(uri, k, out)) for _ in range(4)]
    for p in procs:
        p.start()
    admitted = sum(out.get(timeout=60) for _ in procs)
    for p in procs:
        p.join(30)
    assert admitted == (100 if uri.startswith("zeal") else 4 * 60)  # 240 tries


@pytest.mark.servers
@pytest.mark.parametrize("storage_uri", ["zeal://", "memory://"])
def test_slowapi_under_two_workers(storage_uri: str, app_servers: AppServers) -> None:
    server = app_servers.start(
        "tests.ratelimit.apps.slowapi_app:app",
        server="uvicorn-workers",
        env={"RL_STORAGE": storage_uri},
    )
    away_from_minute_end()

    def client(_: int) -> list[tuple[int, int]]:
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(base_url=server.url, timeout=10.0, limits=limits) as c:
            return [
                (r.status_code, r.json()["pid"]) for r in (c.get("/limited") for _ in range(50))
            ]

    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        answers = [a for batch in pool.map(client, range(8)) for a in batch]
    seen = collections.Counter(pid for _, pid in answers)
    admitted = collections.Counter(pid for status, pid in answers if status == 200)
    assert len(seen) == 2
    if storage_uri == "zeal://":
        assert sum(admitted.values()) == 100  # exactly the limit, over both workers
    else:
        # Each worker admits the whole limit on its own: 2x the limit when both saw 100.
        assert all(admitted[pid] == min(100, n) for pid, n in seen.items())
        assert sum(admitted.values()) > 100
