"""Faults on real servers: SIGSTOP (timeouts), SIGKILL (unavailable), hang-up mid-reply, loops."""

from __future__ import annotations

import asyncio
import time

import pytest

from tests._harness.proxy import Proxy
from tests._harness.servers import Memcached
from zeal_asgi import Counter
from zeal_asgi.errors import (
    BackendError,
    BackendTimeoutError,
    BackendUnavailableError,
    UnsupportedOperationError,
)
from zeal_asgi.store import Store, build_backend
from zeal_asgi.store.backends.breaker import CircuitBreakerBackend
from zeal_asgi.store.backends.memcached import MemcachedBackend

pytestmark = pytest.mark.memcached

TIMEOUT = 0.3


def _store(server: Memcached, prefix: str, **options: object) -> Store:
    conn = {"servers": server.url, "prefix": prefix, "timeout": TIMEOUT, **options}
    return Store(backend=MemcachedBackend.from_config(conn))


async def test_paused_server_times_out_and_connections_stay_in_sync(
    fresh_memcached: Memcached, prefix: str
) -> None:
    store = _store(fresh_memcached, prefix, pool_size=1)
    try:
        store.make("t", 8, {"v": (Store.TYPE_STRING, 8)})
        await store.mset("t", {"one": {"v": "one"}, "two": {"v": "two"}})
        fresh_memcached.pause()
        try:
            start = time.perf_counter()
            with pytest.raises(BackendTimeoutError, match=f"within {TIMEOUT} s") as info:
                await store.get("t", "one")
            elapsed = time.perf_counter() - start
            assert isinstance(info.value, TimeoutError)
            assert isinstance(info.value.__cause__, TimeoutError)
            # A caller's own cancellation midway is handled the same way.
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(store.get("t", "one"), 0.05)
        finally:
            fresh_memcached.resume()
        print(f"EXPERIMENT memcached SIGSTOP | timeout={TIMEOUT}s | raised after {elapsed:.3f}s")
        assert TIMEOUT - 0.01 <= elapsed < TIMEOUT + 1.0  # generous: CI machines are busy
        # The replies to the abandoned commands arrive now; they must not answer later commands.
        for _ in range(3):
            assert await store.get_strict("t", "two") == {"v": "two"}
            assert await store.get_strict("t", "one") == {"v": "one"}
        assert store.stats()["memcached"]["worker"]["timeouts_total"] >= 1
    finally:
        await store.aclose()


async def test_killed_server_is_unavailable_then_recovers(
    fresh_memcached: Memcached, prefix: str
) -> None:
    store = _store(fresh_memcached, prefix)
    try:
        store.make("t", 8, {"n": (Store.TYPE_INT,)})
        counter = Counter(0, name="c", store=store)
        assert await store.incr("t", "k", "n") == 1
        assert await counter.increment() == 1
        fresh_memcached.kill()
        start = time.perf_counter()
        for op in (store.get("t", "k"), store.incr("t", "k", "n"), counter.increment()):
            with pytest.raises(BackendUnavailableError, match=r"memcached 127\.0\.0\.1") as info:
                await op
            assert isinstance(info.value, ConnectionError) and info.value.__cause__ is not None
        assert time.perf_counter() - start < 2.0  # refused at once, no timeout waited
        assert await store.ping() is False
        fresh_memcached.restart()
        assert await store.ping() is True
        assert await store.get_strict("t", "k") is None  # memcached keeps nothing on restart
        assert await store.incr("t", "k", "n") == 1
        assert await counter.increment() == 1
    finally:
        await store.aclose()


@pytest.mark.timeout(20)
async def test_hang_up_mid_reply_fails_fast(hangup_proxy: Proxy, prefix: str) -> None:
    # aiomcache 0.8 spins forever (the loop never yields, so no timeout can fire) when the
    # server closes the connection after reading a command; pytest-timeout catches a regression.
    store = Store(backend=MemcachedBackend(hangup_proxy.address, prefix=prefix, timeout=5.0))
    try:
        store.make("t", 8, {"n": (Store.TYPE_INT,)})
        counter = Counter(0, name="c", store=store)
        assert await store.incr("t", "k", "n") == 1
        hangup_proxy.hangup = True
        start = time.perf_counter()
        for op in (store.set("t", "k", {"n": 5}), store.incr("t", "k", "n"), counter.increment()):
            with pytest.raises(BackendUnavailableError, match="IncompleteReadError"):
                await op
        assert time.perf_counter() - start < 3.0  # well before the 5 s timeout
        hangup_proxy.hangup = False
        assert await store.get_strict("t", "k", "n") == 6  # both commands ran on the server
    finally:
        await store.aclose()


async def test_start_fails_loudly_when_a_server_is_down(
    memcached_server: Memcached, prefix: str
) -> None:
    from tests._harness.servers import free_port

    backend = MemcachedBackend(
        f"{memcached_server.host}:{memcached_server.port},127.0.0.1:{free_port()}",
        prefix=prefix,
        timeout=TIMEOUT,
    )
    try:
        with pytest.raises(BackendError, match="version failed"):
            await backend.start()
    finally:
        await backend.aclose()


def test_backend_follows_the_running_loop(memcached_server: Memcached, prefix: str) -> None:
    backend = MemcachedBackend(memcached_server.url, prefix=prefix)
    store = Store(backend=backend)
    store.make("t", 8, {"n": (Store.TYPE_INT,)})
    first, second = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        assert first.run_until_complete(store.incr("t", "k", "n")) == 1
        # A new loop (the old one still open): connections are rebuilt in it, old ones closed.
        assert second.run_until_complete(store.incr("t", "k", "n")) == 2
        first.run_until_complete(asyncio.sleep(0))  # lets the old transports finish closing
        assert first.run_until_complete(store.incr("t", "k", "n")) == 3
        second.run_until_complete(asyncio.sleep(0))
    finally:
        first.run_until_complete(backend.aclose())
        first.close()
        second.close()


async def test_circuit_breaker_sees_memcached_outages(
    fresh_memcached: Memcached, prefix: str
) -> None:
    breaker = {"failure_threshold": 2, "open_seconds": 60, "name": f"mc-{prefix}"}
    conn = {"servers": fresh_memcached.url, "prefix": prefix, "timeout": TIMEOUT}
    backend = build_backend("memcached", {**conn, "on_error": "fallback_table", "breaker": breaker})
    assert isinstance(backend, CircuitBreakerBackend)
    store = Store(backend=backend)
    try:
        store.make("t", 8, {"n": (Store.TYPE_INT, 4), "s": (Store.TYPE_STRING, 8)})
        await store.set("t", "k", {"n": 1, "s": "x"})
        fresh_memcached.kill()
        # Reads are answered from the host's fallback copy; the outages open the breaker.
        for _ in range(3):
            assert await store.get_strict("t", "k") == {"n": 1, "s": "x"}
        assert backend.state == "open"
        with pytest.raises(BackendUnavailableError, match="circuit breaker open"):
            await store.set("t", "k", {"n": 2})
        with pytest.raises(UnsupportedOperationError, match="memcached"):
            await store.publish("ch", "x")
    finally:
        await store.aclose()
        backend.close_shared()
