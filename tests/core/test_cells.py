"""Cells: FLOAT columns of rows located once and updated in place with lock-free atomics; no
increment is ever lost between processes, a refused step leaves the cell unchanged."""

from __future__ import annotations

import math
import multiprocessing as mp
import os
import pickle
import signal
from collections.abc import Callable

import pytest

from zeal_asgi import Table
from zeal_asgi.errors import (
    ColumnTypeError,
    MetricError,
    NonFiniteFloatError,
    ShmError,
    TableFullError,
)
from zeal_asgi.shm.ext import Cells
from zeal_asgi.shm.segments import destroy

MakeTable = Callable[..., Table]
FLOATS = {"a": ("float", 8), "b": ("float", 8)}
BOUNDS = (1.0, 2.0, math.inf)
_FORK = mp.get_context("fork")


def test_cells_are_the_float_columns_of_their_rows(make_table: MakeTable) -> None:
    t = make_table(8, FLOATS)
    t.set("x", {"a": 1.5})
    c = Cells(t, ["x", "y"])  # x exists, y is created zeroed
    assert len(c) == 4 and c.values() == [1.5, 0.0, 0.0, 0.0]
    c.inc(2)
    c.inc(0.25)
    c.set(-7.5)
    c.inc()
    assert c.get() == -6.5 and t.get("x") == {"a": -6.5, "b": 0.0}
    assert t.get("y") == {"a": 0.0, "b": 0.0} and len(t) == 2


def test_observe_counts_the_bucket_and_adds_the_sum(make_table: MakeTable) -> None:
    t = make_table(8, FLOATS)
    h = Cells(t, ["h0", "h1"], bounds=BOUNDS)  # 3 buckets, the sum in the 4th cell
    for v in (0.5, 1.0, 1.5, 2.0, 9.0, -3.0):
        h.observe(v)
    assert h.values() == [3.0, 2.0, 1.0, 11.0]  # le 1: 0.5 1.0 -3.0; le 2: 1.5 2.0; +Inf: 9.0


def test_refused_steps_leave_the_cell_unchanged(make_table: MakeTable) -> None:
    t = make_table(8, FLOATS)
    c = Cells(t, ["m"], monotonic=True)
    c.inc(3)
    with pytest.raises(MetricError):
        c.inc(-1)
    with pytest.raises(MetricError):
        c.set(0)
    for bad in (math.nan, math.inf):
        with pytest.raises(NonFiniteFloatError):
            c.inc(bad)
    big = Cells(t, ["big"])
    big.inc(1.7e308)
    with pytest.raises(NonFiniteFloatError):  # a finite step whose sum is not
        big.inc(1.7e308)
    with pytest.raises(ColumnTypeError):
        c.inc("1")  # type: ignore[arg-type]
    assert c.values() == [3.0, 0.0] and big.get() == 1.7e308
    h = Cells(t, ["h"], bounds=(math.inf,))
    with pytest.raises(NonFiniteFloatError):
        h.observe(math.nan)
    with pytest.raises(NonFiniteFloatError):
        h.observe(math.inf)
    assert h.values() == [0.0, 0.0], "a refused observation counts nothing"
    with pytest.raises(MetricError):
        c.observe(1.0)  # no bounds
    with pytest.raises(IndexError):
        c.get(2)


@pytest.mark.parametrize(
    ("keys", "bounds"), [(["k"], (2.0, 1.0, math.inf)), (["k"], (1.0,)), (["k"], (1.0, math.inf))]
)
def test_bounds_must_ascend_to_inf_and_leave_a_sum(
    make_table: MakeTable, keys: list[str], bounds: tuple[float, ...]
) -> None:
    t = make_table(8, {"a": ("float", 8)})
    with pytest.raises(MetricError):
        Cells(t, keys, bounds=bounds)


def test_what_cells_refuse(make_table: MakeTable) -> None:
    with pytest.raises(ColumnTypeError):
        Cells(make_table(4, {"a": ("float", 8), "n": ("int", 8)}), ["k"])
    full = make_table(1, FLOATS)
    Cells(full, ["one"])
    with pytest.raises(TableFullError):
        Cells(full, ["two"])
    assert len(full) == 1
    with pytest.raises(TypeError):
        pickle.dumps(Cells(full, ["one"]))
    expiring = make_table(4, FLOATS, ttl=60)  # an expired row would be reused under the cells
    with pytest.raises(ColumnTypeError, match="never expire"):
        Cells(expiring, ["k"])
    assert len(expiring) == 0


def test_cells_without_a_key_are_refused_instead_of_writing_through_nothing(
    make_table: MakeTable,
) -> None:
    t = make_table(4, FLOATS)
    with pytest.raises(MetricError, match="a key and a column"):
        Cells(t, [])
    assert len(t) == 0


def test_cells_of_a_closed_table_raise_instead_of_touching_freed_memory(
    make_table: MakeTable,
) -> None:
    t = make_table(4, FLOATS)
    c = Cells(t, ["k"])
    destroy(t)
    for op in (c.inc, c.get, c.values, lambda: c.set(1.0)):
        with pytest.raises(ShmError):
            op()


def _hammer(t: Table, n: int, step: float, observe: bool) -> None:
    c = Cells(t, ["h0", "h1"], bounds=BOUNDS) if observe else Cells(t, ["c"], monotonic=True)
    op = c.observe if observe else c.inc
    for _ in range(n):
        op(step)


@pytest.mark.parametrize("observe", [False, True], ids=["inc", "observe"])
def test_no_increment_is_lost_between_processes(make_table: MakeTable, observe: bool) -> None:
    """Two processes (and this one) update the same cells as fast as they can: every step lands."""
    t = make_table(8, FLOATS)
    n, step = 100_000, 0.5  # 0.5 steps: every partial sum is exact, so the total must be too
    procs = [_FORK.Process(target=_hammer, args=(t, n, step, observe)) for _ in range(2)]
    for p in procs:
        p.start()
    _hammer(t, n, step, observe)
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    if observe:
        assert Cells(t, ["h0", "h1"], bounds=BOUNDS).values() == [3 * n, 0.0, 0.0, 3 * n * step]
    else:
        assert Cells(t, ["c"]).get() == 3 * n * step


def _inc_forever(t: Table) -> None:
    c = Cells(t, ["c"])
    while True:
        c.inc(1)


def test_a_process_killed_mid_update_leaves_a_whole_value(make_table: MakeTable) -> None:
    t = make_table(4, FLOATS)
    for _ in range(5):
        p = _FORK.Process(target=_inc_forever, args=(t,))
        p.start()
        while Cells(t, ["c"]).get() < 1000:
            os.sched_yield()
        os.kill(p.pid or 0, signal.SIGKILL)
        p.join(10)
        assert p.exitcode == -signal.SIGKILL
    value = Cells(t, ["c"]).get()
    assert value >= 1000 and value.is_integer(), value
    t.set("c", {"b": 1.0})  # the row's lock was never held by a cell: the table writes it at once
    assert t.get("c", "a") == value
