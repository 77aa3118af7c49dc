"""Every backend, with and without the circuit breaker, through what is built on the Store.

Each combination declares its capabilities; ``Cache.get_or_compute`` and ``Counter`` work on all
of them; pub/sub (a publish reaching a subscriber) and ``eval`` either work or raise
UnsupportedOperationError naming the backend, raised by the Store at the call before any backend
is touched, never from inside a backend or a wrapper.
"""

from __future__ import annotations

import asyncio
import traceback
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from zeal_asgi import Counter
from zeal_asgi.cache import Cache
from zeal_asgi.errors import UnsupportedOperationError
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.store import Capability, Store
from zeal_asgi.store.backends.breaker import CircuitBreakerBackend

from ._support import Servers, release_shared, store_conn, unique

KINDS = ("table", "redis", "tiered", "memcached")
DECLARED = {
    "table": {Capability.LISTING, Capability.PUBSUB},
    "redis": set(Capability),
    "tiered": set(Capability),
    "memcached": set(),
}
NEEDS = {"redis": "redis", "tiered": "redis", "memcached": "memcached"}


def _params() -> list[Any]:
    return [
        pytest.param(
            (kind, wrapped),
            id=f"{kind}{'+breaker' if wrapped else ''}",
            marks=[getattr(pytest.mark, NEEDS[kind])] if kind in NEEDS else [],
        )
        for kind in KINDS
        for wrapped in (False, True)
    ]


@pytest.fixture(params=_params())
async def combo(request: pytest.FixtureRequest) -> AsyncIterator[tuple[str, Store]]:
    """``(kind, started store)``: one backend, behind the breaker or not, closed afterwards."""
    kind, wrapped = request.param
    servers = Servers()
    if kind in ("redis", "tiered"):
        servers = Servers(redis_url=request.getfixturevalue("redis_server").url)
    elif kind == "memcached":
        servers = Servers(memcached_url=request.getfixturevalue("memcached_server").url)
    name, conn = store_conn(kind, servers, unique())
    if wrapped:
        conn.update(on_error="fallback_table", breaker={"name": unique("cb")})
    store = Store(name, conn)
    await store.start()
    try:
        yield kind, store
    finally:
        await store.aclose()
        release_shared(store.backend)
        close_host_bus()


def _raised_in_the_store(exc: BaseException) -> bool:
    """Whether the Store facade raised ``exc`` at the call: its innermost frame is
    ``store/facade.py``, and no backend or wrapper (the breaker) ran on the way."""
    frames = [Path(f.filename) for f in traceback.extract_tb(exc.__traceback__)]
    inner = frames[-1]
    return (inner.parent.name, inner.name) == ("store", "facade.py") and not any(
        "backends" in f.parts for f in frames
    )


def test_capabilities_are_declared_and_a_wrapper_declares_its_primarys(
    combo: tuple[str, Store],
) -> None:
    kind, store = combo
    backend = store.backend
    assert backend.capabilities == DECLARED[kind]
    if isinstance(backend, CircuitBreakerBackend):
        assert backend.capabilities == backend.primary.capabilities
        assert backend.redis_link() is backend.primary.redis_link()
    assert (backend.redis_link() is not None) == (kind in ("redis", "tiered"))


async def test_get_or_compute_computes_once_on_every_combination(
    combo: tuple[str, Store], tmp_path: Path
) -> None:
    _, store = combo
    cache = Cache(
        max_rows=64,
        cache_dir=str(tmp_path / "cache"),
        gc_interval_ms=0,
        memory_value_bytes=256,
        namespace=unique("cc"),
        store=store,
    )
    calls = 0

    async def compute() -> dict[str, int]:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.05)
        return {"answer": 42}

    try:
        got = await asyncio.gather(*(cache.get_or_compute("k", compute, ttl=30) for _ in range(8)))
        assert got == [{"answer": 42}] * 8
        assert calls == 1
        assert await cache.get_or_compute("k", compute, ttl=30) == {"answer": 42}
        assert calls == 1
    finally:
        cache.close()


async def test_counter_counts_on_every_combination(combo: tuple[str, Store]) -> None:
    _, store = combo
    c = Counter(5, name=unique("n"), store=store)
    assert await c.increment(2) == 7
    assert await c.decrement() == 6
    assert await c.compare_and_set(6, 10)
    assert not await c.compare_and_set(6, 11)
    assert await c.get() == 10


async def test_pubsub_reaches_a_subscriber_or_is_refused_at_the_call(
    combo: tuple[str, Store],
) -> None:
    kind, store = combo
    if Capability.PUBSUB not in store.backend.capabilities:
        with pytest.raises(UnsupportedOperationError, match=kind) as info:
            await store.publish("news", "hi")
        assert _raised_in_the_store(info.value)
        ps = PubSub(store)
        ps.subscribe("news", lambda p, c: None)
        with pytest.raises(UnsupportedOperationError, match=kind):
            await ps.start()  # a subscriber is refused when it starts, not at its first message
        return
    got: list[tuple[str, str]] = []
    arrived = asyncio.Event()

    def handler(payload: str, channel: str) -> None:
        got.append((payload, channel))
        arrived.set()

    ps = PubSub(store)
    ps.subscribe("news", handler)
    ps.prepare()
    await ps.start()
    try:
        assert await ps.wait_ready(10.0)
        assert await store.publish("news", "hi") == 1
        await asyncio.wait_for(arrived.wait(), 10)
        assert got == [("hi", "news")]
    finally:
        await ps.stop()


async def test_eval_runs_or_is_refused_at_the_call(combo: tuple[str, Store]) -> None:
    kind, store = combo
    script = "return redis.call('INCRBY', KEYS[1], ARGV[1])"
    if Capability.EVAL in store.backend.capabilities:
        assert await store.eval(script, ["e"], [3]) == 3
        return
    with pytest.raises(UnsupportedOperationError, match=kind) as info:
        await store.eval(script, ["e"], [3])
    assert _raised_in_the_store(info.value)
    if isinstance(store.backend, CircuitBreakerBackend):
        assert store.stats()["breaker"]["state"] == "closed"  # nothing reached the breaker
