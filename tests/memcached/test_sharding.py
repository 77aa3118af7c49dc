"""Several servers: keys spread by rendezvous hashing, multi-gets per server, stable placement."""

from __future__ import annotations

import pytest

from tests._harness.servers import Memcached
from tests.memcached.conftest import raw_get
from zeal_asgi import Counter
from zeal_asgi.store import Store
from zeal_asgi.store.backends.memcached import MemcachedBackend
from zeal_asgi.store.backends.memcached.conn import ServerAddr, ServerPool

pytestmark = pytest.mark.memcached


async def test_rows_and_counters_spread_over_both_servers(
    two_memcached: tuple[Memcached, Memcached], prefix: str
) -> None:
    a, b = two_memcached
    backend = MemcachedBackend(f"127.0.0.1:{a.port},127.0.0.1:{b.port}", prefix=prefix)
    store = Store(backend=backend)
    try:
        store.make("t", 512, {"n": (Store.TYPE_INT, 4), "s": (Store.TYPE_STRING, 8)})
        keys = [f"k{i}" for i in range(200)]
        assert await store.mset("t", {k: {"n": i} for i, k in enumerate(keys)}) == 200
        on_a = {k for k in keys if raw_get(a.port, f"{prefix}:t:{k}".encode()) is not None}
        on_b = {k for k in keys if raw_get(b.port, f"{prefix}:t:{k}".encode()) is not None}
        print(f"EXPERIMENT memcached sharding | 200 rows, 2 servers | a={len(on_a)} b={len(on_b)}")
        assert on_a.isdisjoint(on_b) and on_a | on_b == set(keys)
        assert 60 <= len(on_a) <= 140  # roughly even

        got = await store.mget("t", ["missing", *reversed(keys)])
        assert got[0] is None
        assert [r["n"] if r else None for r in got[1:]] == list(reversed(range(200)))
        for i, k in enumerate(keys[:50]):
            assert await store.incr("t", k, "n", 1) == i + 1

        counters = [Counter(0, name=f"c{i}", store=store) for i in range(20)]
        for i, c in enumerate(counters):
            assert await c.increment(i) == i
        homes = {
            a.port if raw_get(a.port, f"{prefix}:counter:c{i}".encode()) else b.port
            for i in range(20)
        }
        assert homes == {a.port, b.port}
        assert await store.ping()
    finally:
        await store.aclose()


def test_rendezvous_placement_is_stable() -> None:
    servers = [ServerAddr("10.0.0.1", 11211), ServerAddr("10.0.0.2", 11211)]
    three = ServerPool([*servers, ServerAddr("10.0.0.3", 11211)], timeout=1, pool_size=1)
    two = ServerPool(servers, timeout=1, pool_size=1)
    swapped = ServerPool(list(reversed(servers)), timeout=1, pool_size=1)
    keys = [f"k{i}".encode() for i in range(2000)]
    for key in keys:
        assert str(two.servers[two.index(key)]) == str(swapped.servers[swapped.index(key)])
    moved = 0
    for key in keys:
        home = three.servers[three.index(key)]
        if home.host != "10.0.0.3":
            # Keys that were not on the removed server stay where they were.
            assert two.servers[two.index(key)] == home
        else:
            moved += 1
    assert 500 <= moved <= 850  # about a third
