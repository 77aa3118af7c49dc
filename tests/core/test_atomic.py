"""Atomic: a lock-free shared int64 whose overflow raises and leaves the value unchanged."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from zeal_asgi import Atomic
from zeal_asgi.errors import ColumnTypeError, IntegerOverflowError, ZealError

MakeAtomic = Callable[..., Atomic]
MAX, MIN = 2**63 - 1, -(2**63)


def test_api(make_atomic: MakeAtomic) -> None:
    a = make_atomic(5)
    assert a.get() == 5
    assert a.increment() == 6
    assert a.increment(10) == 16
    assert a.decrement(20) == -4
    assert a.compare_and_set(-4, 100) is True
    assert a.compare_and_set(-4, 1) is False
    assert a.get() == 100
    a.set(7)
    assert a.get() == 7
    a.reset()
    assert a.get() == 0
    assert "value=0" in repr(a)


def test_attach_keeps_value_and_ignores_initial(make_atomic: MakeAtomic) -> None:
    a = make_atomic(41, name="shared-attach-test")
    a.increment()
    b = Atomic(0, name="shared-attach-test")  # same name: same memory, initial ignored
    try:
        assert b.get() == 42
        b.increment()
        assert a.get() == 43
        assert a.nonce == b.nonce
    finally:
        b.close()


@pytest.mark.parametrize(
    ("start", "op", "arg"),
    [
        (MAX, "increment", 1),
        (MIN, "decrement", 1),
        (0, "increment", 2**63),
        (0, "decrement", MIN),
        (-1, "increment", MIN),
        (MAX - 5, "increment", 6),
    ],
)
def test_overflow_raises_and_keeps_value(
    make_atomic: MakeAtomic, start: int, op: str, arg: int
) -> None:
    a = make_atomic(start)
    with pytest.raises(IntegerOverflowError) as info:
        getattr(a, op)(arg)
    assert isinstance(info.value, OverflowError) and isinstance(info.value, ZealError)
    assert a.get() == start


@pytest.mark.parametrize("bad", [1.0, True, "1", None, 2**64])
def test_bad_values(make_atomic: MakeAtomic, bad: object) -> None:
    a = make_atomic(3)
    with pytest.raises((ColumnTypeError, IntegerOverflowError)):
        a.set(bad)  # type: ignore[arg-type]
    with pytest.raises((ColumnTypeError, IntegerOverflowError)):
        a.increment(bad)  # type: ignore[arg-type]
    assert a.get() == 3


def test_bounds_are_reachable(make_atomic: MakeAtomic) -> None:
    a = make_atomic(MAX - 1)
    assert a.increment() == MAX
    a.set(MIN + 1)
    assert a.decrement() == MIN
