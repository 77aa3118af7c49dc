"""``Counter`` on every backend: arithmetic, initial written once, signed 64-bit range, races."""

from __future__ import annotations

import asyncio

import pytest

from zeal_asgi import Atomic, Counter
from zeal_asgi.errors import (
    ColumnTypeError,
    ConfigError,
    IntegerOverflowError,
    UnsupportedOperationError,
)
from zeal_asgi.store import Store

from ._support import StoreMaker, raises_exact, unique

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
TASKS = 200


async def test_counter_arithmetic(store: Store) -> None:
    c = Counter(0, name=unique("c"), store=store)
    assert await c.get() == 0
    assert await c.increment() == 1
    assert await c.increment(5) == 6
    assert await c.decrement() == 5
    assert await c.decrement(10) == -5
    assert await c.increment(0) == -5
    await c.set(42)
    value = await c.get()
    assert value == 42 and type(value) is int
    assert await c.compare_and_set(41, 1) is False
    assert await c.get() == 42
    assert await c.compare_and_set(42, 7) is True
    assert await c.get() == 7
    await c.reset()
    assert await c.get() == 0


async def test_initial_is_applied_only_once(store: Store, make_store: StoreMaker) -> None:
    name = unique("c")
    first = Counter(10, name=name, store=store)
    assert await first.get() == 10
    assert await first.increment() == 11
    again = Counter(10, name=name, store=store)  # the same declaration, again
    assert await again.get() == 11
    # Another store on the same name space, as another worker or node would build it.
    other = make_store(make_store.space_of(store))
    await other.start()
    elsewhere = Counter(99, name=name, store=other)
    assert await elsewhere.get() == 11
    assert await elsewhere.increment() == 12
    assert await first.get() == 12


async def test_initial_is_the_starting_value_everywhere(store: Store) -> None:
    c = Counter(7, name=unique("c"), store=store)
    assert await c.compare_and_set(7, 8) is True
    d = Counter(-3, name=unique("c"), store=store)
    assert await d.increment() == -2
    e = Counter(INT64_MIN, name=unique("c"), store=store)
    assert await e.get() == INT64_MIN
    await raises_exact(IntegerOverflowError, e.decrement())


async def test_counters_are_independent(store: Store, make_store: StoreMaker) -> None:
    name = unique("c")
    a = Counter(0, name=name, store=store)
    b = Counter(0, name=unique("c"), store=store)
    other = make_store()  # another prefix / namespace: another app
    await other.start()
    c = Counter(0, name=name, store=other)
    await a.increment(3)
    assert (await a.get(), await b.get(), await c.get()) == (3, 0, 0)


async def test_overflow_raises_and_leaves_the_value(store: Store) -> None:
    c = Counter(0, name=unique("c"), store=store)
    await c.set(INT64_MAX)
    assert await c.get() == INT64_MAX
    exc = await raises_exact(IntegerOverflowError, c.increment())
    assert c.name in str(exc)
    await raises_exact(IntegerOverflowError, c.decrement(-1))
    assert await c.get() == INT64_MAX
    await c.set(INT64_MIN)
    assert await c.get() == INT64_MIN
    await raises_exact(IntegerOverflowError, c.decrement())
    await raises_exact(IntegerOverflowError, c.increment(-1))
    await raises_exact(IntegerOverflowError, c.decrement(INT64_MIN))
    assert await c.get() == INT64_MIN
    assert await c.increment(INT64_MAX) == -1  # the whole range is usable
    await raises_exact(IntegerOverflowError, c.increment(2**63))
    await raises_exact(IntegerOverflowError, c.set(2**63))
    await raises_exact(IntegerOverflowError, c.compare_and_set(-1, INT64_MIN - 1))
    assert await c.get() == -1


async def test_bad_values_are_typed_errors(store: Store) -> None:
    c = Counter(5, name=unique("c"), store=store)
    for bad in (1.5, True, "1", None):
        await raises_exact(ColumnTypeError, c.increment(bad))  # type: ignore[arg-type]
        await raises_exact(ColumnTypeError, c.set(bad))  # type: ignore[arg-type]
        await raises_exact(ColumnTypeError, c.compare_and_set(5, bad))  # type: ignore[arg-type]
    assert await c.get() == 5
    with pytest.raises(IntegerOverflowError):
        Counter(2**63, name=unique("c"), store=store)
    with pytest.raises(ColumnTypeError):
        Counter(1.0, name=unique("c"), store=store)  # type: ignore[arg-type]


async def test_concurrent_increments_add_up_exactly(store: Store) -> None:
    c = Counter(0, name=unique("c"), store=store)
    results = await asyncio.gather(*(c.increment() for _ in range(TASKS)))
    assert sorted(results) == list(range(1, TASKS + 1))
    await asyncio.gather(*(c.decrement(2) for _ in range(TASKS // 2)), c.increment(0))
    assert await c.get() == 0


async def test_concurrent_compare_and_set_has_one_winner(store: Store) -> None:
    c = Counter(0, name=unique("c"), store=store)
    wins = await asyncio.gather(*(c.compare_and_set(0, i) for i in range(1, 51)))
    assert wins.count(True) == 1
    assert await c.get() == wins.index(True) + 1


async def test_anonymous_counters_only_on_the_table_backend(store: Store, backend: str) -> None:
    if backend == "table":
        c = Counter(3, store=store)
        assert await c.increment() == 4
        assert isinstance(c.atomic, Atomic)
        assert c.atomic.get() == 4  # the sync face of the same counter
    else:
        with pytest.raises(ConfigError):
            Counter(3, store=store)
        named = Counter(3, name=unique("c"), store=store)
        with pytest.raises(UnsupportedOperationError):
            named.atomic  # noqa: B018 - the property raises


async def test_counter_follows_the_class_level_default(store: Store) -> None:
    previous = Store._default
    Store.set_default(store)
    try:
        name = unique("c")
        c = Counter(1, name=name)  # no store=: the process-wide default
        assert c.store is store
        assert await c.increment() == 2
        assert await Counter(0, name=name, store=store).get() == 2
    finally:
        Store.set_default(previous)
