"""Counter on memcached: signed 64-bit on native incr, initial written with add."""

from __future__ import annotations

import pytest

from tests._harness.servers import Memcached
from tests.memcached.conftest import raw_get
from zeal_asgi import Counter
from zeal_asgi.errors import ColumnTypeError, ConfigError, IntegerOverflowError
from zeal_asgi.store import Store
from zeal_asgi.store.backends.memcached import MemcachedBackend

pytestmark = pytest.mark.memcached

MAX, MIN = 2**63 - 1, -(2**63)


async def test_counter_basics_and_below_zero(store: Store) -> None:
    c = Counter(3, name="hits", store=store)
    assert await c.get() == 3
    assert await c.increment() == 4
    assert await c.decrement(10) == -6  # no clamp at 0
    assert await c.decrement() == -7
    assert await c.increment(7) == 0
    await c.set(-100)
    assert await c.get() == -100
    await c.reset()
    assert await c.get() == 0
    assert await c.compare_and_set(1, 5) is False
    assert await c.compare_and_set(0, -5) is True
    assert await c.get() == -5


async def test_initial_never_clobbers(memcached_server: Memcached, prefix: str) -> None:
    first = Store(backend=MemcachedBackend(memcached_server.url, prefix=prefix))
    second = Store(backend=MemcachedBackend(memcached_server.url, prefix=prefix))
    try:
        a = Counter(10, name="shared", store=first)
        assert await a.increment(5) == 15
        # Another worker declaring the same counter (another initial) joins it.
        b = Counter(99, name="shared", store=second)
        assert await b.get() == 15
        assert await b.increment() == 16
    finally:
        await first.aclose()
        await second.aclose()


async def test_missing_counter_counts_as_zero(
    store: Store, backend: MemcachedBackend, memcached_server: Memcached, prefix: str
) -> None:
    c = Counter(0, name="gone", store=store)
    assert await c.increment(2) == 2
    # Evicted / flushed behind our back: it restarts from 0, and compare_and_set agrees.
    await backend.pool.run(0, "delete", lambda cl: cl.delete(f"{prefix}:counter:gone".encode()))
    assert await c.get() == 0
    assert await c.compare_and_set(0, 4) is True
    await backend.pool.run(0, "delete", lambda cl: cl.delete(f"{prefix}:counter:gone".encode()))
    assert await c.decrement(3) == -3
    assert raw_get(memcached_server.port, f"{prefix}:counter:gone".encode()) == (
        str(2**63 - 3).encode()
    )


async def test_overflow_raises_and_leaves_the_value(store: Store) -> None:
    c = Counter(MAX - 1, name="top", store=store)
    assert await c.increment() == MAX
    with pytest.raises(IntegerOverflowError, match="unchanged"):
        await c.increment()
    assert await c.get() == MAX
    with pytest.raises(IntegerOverflowError):
        await c.increment(MAX)
    assert await c.get() == MAX

    low = Counter(MIN + 1, name="bottom", store=store)
    assert await low.decrement() == MIN
    with pytest.raises(IntegerOverflowError, match="unchanged"):
        await low.decrement()
    with pytest.raises(IntegerOverflowError):
        await low.increment(MIN)
    assert await low.get() == MIN
    assert await low.increment(MAX) == -1


async def test_bad_arguments(store: Store, backend: MemcachedBackend) -> None:
    c = Counter(0, name="args", store=store)
    with pytest.raises(ColumnTypeError):
        await c.increment(1.5)  # type: ignore[arg-type]
    with pytest.raises(IntegerOverflowError):
        await c.increment(2**63)
    with pytest.raises(IntegerOverflowError):
        await c.decrement(MIN)
    with pytest.raises(ConfigError, match="needs a name"):
        Counter(0, store=store)
    with pytest.raises(ColumnTypeError):
        await c.increment(True)
    with pytest.raises(IntegerOverflowError):
        await c.set(2**64)
    assert await c.get() == 0
