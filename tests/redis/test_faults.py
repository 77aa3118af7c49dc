"""Faults against real servers: E11 (hang), E12 (pool exhaustion), restarts, auth, boot."""

from __future__ import annotations

import asyncio
import os
import statistics
import time
from typing import Any

import pytest

from tests._harness.proxy import Proxy
from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer, free_port
from tests.conftest import quick_or_long
from zeal_asgi.errors import (
    BackendAuthError,
    BackendTimeoutError,
    BackendUnavailableError,
    PoolTimeoutError,
)
from zeal_asgi.store import Store
from zeal_asgi.store.backends.redis import RedisBackend

from .conftest import unique_prefix


def _store(url: str, **options: Any) -> tuple[Store, RedisBackend]:
    store = Store("redis", {"url": url, "prefix": unique_prefix(), **options})
    store.make("t", 100, {"n": (Store.TYPE_INT, 8)})
    backend = store.backend
    assert isinstance(backend, RedisBackend)
    return store, backend


def _quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _stamp(into: list[float]) -> None:
    into.append(time.monotonic())


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


async def test_e11_redis_hang_is_bounded(fresh_redis: RedisServer) -> None:
    pool, socket_timeout, acquire_timeout, concurrency = 4, 0.3, 0.1, 16
    store, backend = _store(
        fresh_redis.url,
        pool_size=pool,
        socket_timeout=socket_timeout,
        acquire_timeout=acquire_timeout,
    )
    await store.start()
    await asyncio.gather(*(store.set("t", f"k{i}", {"n": i}) for i in range(pool)))
    duration = quick_or_long(1.5, 15.0)
    deadline = socket_timeout + acquire_timeout  # each call's own, from its start
    latencies: list[float] = []
    outcomes: dict[str, int] = {}
    peak_in_use = peak_pending = peak_conns = 0
    stop = time.monotonic() + duration
    loop = asyncio.get_running_loop()
    lateness: list[float] = []

    async def caller() -> None:
        while time.monotonic() < stop:
            # A timer due at this call's deadline: how late the loop ran it is the scheduling
            # delay (a loaded machine) that the call's own end inherits, and not the store's.
            t0, ran = time.monotonic(), list[float]()
            reference = loop.call_at(t0 + deadline, _stamp, ran)
            try:
                await store.get_strict("t", "k1")
                kind = "answered"
            except (BackendTimeoutError, BackendUnavailableError) as exc:
                kind = type(exc).__name__
            end = time.monotonic()
            reference.cancel()
            late = max(0.0, ran[0] - (t0 + deadline)) if ran else 0.0
            lateness.append(late)
            latencies.append(end - t0 - late)
            outcomes[kind] = outcomes.get(kind, 0) + 1

    async def sampler() -> None:
        nonlocal peak_in_use, peak_pending, peak_conns
        while time.monotonic() < stop:
            r = backend.stats()["redis"]
            peak_in_use = max(peak_in_use, r["in_use"])
            # the fast path's own sockets: a hang must not make it open more than pool_size
            peak_conns = max(peak_conns, r["connections"])
            # every pending call is a caller holding a slot or waiting <= acquire_timeout for one
            peak_pending = max(peak_pending, r["in_use"] + r["waiting"])
            await asyncio.sleep(0.005)

    fresh_redis.pause()
    try:
        await asyncio.gather(sampler(), *(caller() for _ in range(concurrency)))
    finally:
        fresh_redis.resume()
    client = await backend.client()
    pool_conns = len(client.connection_pool._in_use_connections) + len(
        client.connection_pool._available_connections
    )
    bound = deadline + 0.010
    p50, p99, worst = _quantile(latencies, 0.5), _quantile(latencies, 0.99), max(latencies)
    passed = (
        p99 <= bound
        and "answered" not in outcomes
        and peak_in_use <= pool
        and peak_pending <= concurrency
        and pool_conns <= pool
        and 0 < peak_conns <= pool
    )
    print(
        f"\nEXPERIMENT E11 redis-hang | SIGSTOP redis, pool={pool} "
        f"socket_timeout={socket_timeout * 1000:.0f}ms "
        f"acquire_timeout={acquire_timeout * 1000:.0f}ms "
        f"concurrency={concurrency} duration={duration}s | calls={len(latencies)} "
        f"outcomes={outcomes} p50={p50 * 1000:.1f}ms p99={p99 * 1000:.1f}ms "
        f"max={worst * 1000:.1f}ms bound={bound * 1000:.0f}ms "
        f"loop_lateness_max={max(lateness) * 1000:.1f}ms peak_in_use={peak_in_use} "
        f"peak_pending={peak_pending} pool_connections={pool_conns} "
        f"direct_connections={peak_conns} | "
        f"{'PASS' if passed else 'FAIL'}"
    )
    assert passed
    # and it serves again as soon as the server does
    deadline = time.monotonic() + 2.0
    while True:
        try:
            assert await store.get_strict("t", "k1", "n") == 1
            break
        except (BackendTimeoutError, BackendUnavailableError):
            assert time.monotonic() < deadline, "no recovery 2 s after SIGCONT"
            await asyncio.sleep(0.05)
    await store.aclose()


async def test_e12_pool_exhaustion(redis_server: RedisServer) -> None:
    pool, acquire_timeout, latency, concurrency = 4, 0.1, 0.2, 16
    proxy = await Proxy(redis_server.port, latency).start()
    store, _ = _store(
        f"redis://{proxy.address}",
        pool_size=pool,
        acquire_timeout=acquire_timeout,
        socket_timeout=2.0,
    )
    try:
        await store.start()
        loop = asyncio.get_running_loop()
        errors_at: list[float] = []
        answered = 0

        async def call() -> None:
            nonlocal answered
            t0 = loop.time()
            try:
                await store.get_strict("t", "k")
                answered += 1
            except PoolTimeoutError:
                errors_at.append(loop.time() - t0)

        async def round_() -> None:
            await asyncio.gather(*(call() for _ in range(concurrency)))

        await round_()  # warm-up: connections, allocator arenas
        errors_at.clear()
        answered = 0
        rss_before = _rss()
        rounds = int(quick_or_long(10, 100))
        for _ in range(rounds):
            await round_()
        rss_after = _rss()
    finally:
        await store.aclose()
        await proxy.aclose()
    growth = (rss_after - rss_before) / rss_before
    worst = max(abs(e - acquire_timeout) for e in errors_at)
    expected_errors = rounds * (concurrency - pool)
    passed = len(errors_at) == expected_errors and worst <= 0.020 and growth < 0.05
    print(
        f"\nEXPERIMENT E12 pool-exhaustion | pool={pool} concurrency={concurrency} "
        f"proxy_latency={latency * 1000:.0f}ms acquire_timeout={acquire_timeout * 1000:.0f}ms "
        f"rounds={rounds} | pool_timeouts={len(errors_at)}/{expected_errors} answered={answered} "
        f"time_to_error_mean={statistics.mean(errors_at) * 1000:.1f}ms "
        f"max_deviation={worst * 1000:.1f}ms rss_growth={growth * 100:.2f}% | "
        f"{'PASS' if passed else 'FAIL'}"
    )
    assert passed


async def test_reads_retry_through_a_restart_writes_do_not(fresh_redis: RedisServer) -> None:
    store, backend = _store(fresh_redis.url, retries=10, deadline=5.0)
    try:
        await store.start()
        await store.set("t", "k", {"n": 1})
        fresh_redis.kill()
        restart = asyncio.create_task(asyncio.to_thread(_start_later, fresh_redis, 0.3))
        t0 = time.monotonic()
        assert await store.get_strict("t", "k") is None  # no persistence: the row is gone
        waited = time.monotonic() - t0
        await restart
        stats = backend.stats()["redis"]
        assert stats["retries"] >= 1 and waited >= 0.2
        # an INCR whose reply is lost may have run: never retried, fails fast instead
        fresh_redis.kill()
        before = backend.stats()["redis"]["retries"]
        watch = Stopwatch()
        with pytest.raises(BackendUnavailableError):
            await store.incr("t", "k", "n", 1)
        assert watch.own() < 0.5
        assert backend.stats()["redis"]["retries"] == before
        fresh_redis.start()
        assert await store.incr("t", "k", "n", 1) == 1
    finally:
        await store.aclose()


def _start_later(server: RedisServer, delay: float) -> None:
    time.sleep(delay)
    server.start()


async def test_auth_errors_are_typed_and_never_echo_secrets() -> None:
    with RedisServer(password="s3cret-pw") as server:
        for url in (
            f"redis://:wrong-pw@127.0.0.1:{server.port}",
            f"redis://127.0.0.1:{server.port}",
        ):
            backend = RedisBackend.from_config({"url": url, "prefix": unique_prefix()})
            try:
                with pytest.raises(BackendAuthError) as info:
                    await backend.start()
                assert "s3cret" not in str(info.value) and "wrong-pw" not in str(info.value)
                assert isinstance(info.value, PermissionError)
            finally:
                await backend.aclose()
        backend = RedisBackend.from_config({"url": server.url, "prefix": unique_prefix()})
        try:
            await backend.start()
            assert await backend.ping()
        finally:
            await backend.aclose()


async def test_boot_ping_fails_loudly_and_fast() -> None:
    port = free_port()  # nothing listens
    backend = RedisBackend.from_config(f"redis://:topsecret@127.0.0.1:{port}/0")
    try:
        watch = Stopwatch()
        with pytest.raises(BackendUnavailableError) as info:
            await backend.start()
        assert watch.own() < 0.5
        msg = str(info.value)
        assert "boot check failed" in msg and f"redis://:***@127.0.0.1:{port}/0" in msg
        assert "topsecret" not in msg
        assert backend.stats()["redis"]["errors"] == 1
    finally:
        await backend.aclose()
