"""``incr_bounded``: an add that applies only within a bound, in one locked step."""

from __future__ import annotations

import logging
import multiprocessing as mp
import signal
from collections.abc import Callable
from typing import Any

import pytest

from tests.core import crashpoints
from zeal_asgi import Table
from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    NonFiniteFloatError,
    TableFullError,
    UnknownColumnError,
)
from zeal_asgi.shm import _shmtable
from zeal_asgi.shm.ext import incr_bounded

COLS = {"n": ("int", 8), "small": ("int", 1), "f": ("float", 8), "s": ("string", 8)}


def test_applies_up_to_the_bound_then_refuses(make_table: Callable[..., Table]) -> None:
    t = make_table(16, COLS)
    assert incr_bounded(t, "k", "n", 3, 5) == (3, True)
    assert incr_bounded(t, "k", "n", 3, 5) == (3, False)  # 6 > 5: refused, value as it is
    assert incr_bounded(t, "k", "n", 2, 5) == (5, True)
    assert incr_bounded(t, "k", "n", 1, 5) == (5, False)
    assert t.get("k", "n") == 5


def test_a_refused_add_creates_no_row(make_table: Callable[..., Table]) -> None:
    t = make_table(16, COLS)
    assert incr_bounded(t, "k", "n", 6, 5) == (0, False)
    assert t.get("k") is None and len(t) == 0


def test_floor_raises_a_stale_value_first(make_table: Callable[..., Table]) -> None:
    t = make_table(16, COLS)
    assert incr_bounded(t, "k", "f", 1.5, 200.0, floor=100.0) == (101.5, True)  # new row
    assert incr_bounded(t, "k", "f", 1.5, 103.0, floor=100.0) == (103.0, True)  # above floor
    assert incr_bounded(t, "k", "f", 1.5, 103.0, floor=100.0) == (103.0, False)
    assert incr_bounded(t, "k", "f", 1.0, 1000.0, floor=500.0) == (501.0, True)  # below floor
    assert incr_bounded(t, "k", "n", 1, 10, floor=-5) == (1, True)  # a zero row is above -5


def test_reset_replaces_a_value_below_the_floor(make_table: Callable[..., Table]) -> None:
    t = make_table(16, COLS)
    # a deadline-and-count in one int: a row whose deadline (the high part) has passed starts
    # again from `reset`; a live one keeps counting
    assert incr_bounded(t, "k", "n", 1, 10**9, floor=100, reset=500) == (501, True)
    assert incr_bounded(t, "k", "n", 1, 10**9, floor=100, reset=500) == (502, True)
    assert incr_bounded(t, "k", "n", 1, 10**9, floor=600, reset=900) == (901, True)
    assert incr_bounded(t, "k", "n", 1, 900, floor=1000, reset=900) == (901, False)
    assert incr_bounded(t, "k", "f", 2.0, 10.0, floor=1.0, reset=5.0) == (7.0, True)
    with pytest.raises(ColumnTypeError, match="pass a floor"):
        incr_bounded(t, "k", "n", 1, 10, reset=5)


def test_bad_arguments_name_the_column(make_table: Callable[..., Table]) -> None:
    t = make_table(16, COLS)
    with pytest.raises(ColumnTypeError, match="'s'"):
        incr_bounded(t, "k", "s", 1, 2)
    with pytest.raises(ColumnTypeError, match="by is an int"):
        incr_bounded(t, "k", "n", 1.0, 2)
    with pytest.raises(ColumnTypeError, match="bound is an int"):
        incr_bounded(t, "k", "n", 1, 2.5)
    with pytest.raises(UnknownColumnError):
        incr_bounded(t, "k", "nope", 1, 2)
    with pytest.raises(NonFiniteFloatError):
        incr_bounded(t, "k", "f", float("nan"), 2.0)
    assert t.get("k") is None


def test_overflow_raises_and_leaves_the_row(make_table: Callable[..., Table]) -> None:
    t = make_table(16, COLS)
    assert incr_bounded(t, "k", "small", 100, 1000) == (100, True)
    with pytest.raises(IntegerOverflowError, match="stays 100"):
        incr_bounded(t, "k", "small", 100, 1000)
    with pytest.raises(IntegerOverflowError):
        incr_bounded(t, "new", "small", 200, 1000)
    assert t.get("k", "small") == 100 and t.get("new") is None


def test_full_table(make_table: Callable[..., Table]) -> None:
    t = make_table(1, COLS)
    incr_bounded(t, "a", "n", 1, 5)
    with pytest.raises(TableFullError):
        incr_bounded(t, "b", "n", 1, 5)
    assert incr_bounded(t, "b", "n", 9, 5) == (0, False)  # refused before a row is needed


N, M, BOUND = 4, 5_000, 7_777


def _worker(name: str, out: Any) -> None:
    t = Table(16, COLS, name=name)
    applied = sum(incr_bounded(t, "hot", "n", 1, BOUND)[1] for _ in range(M))
    out.put(applied)
    t.close()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_processes_never_pass_the_bound_together(
    make_table: Callable[..., Table], method: str
) -> None:
    t = make_table(16, COLS)
    ctx: Any = mp.get_context(method)
    out = ctx.Queue()
    procs = [ctx.Process(target=_worker, args=(t.name, out)) for _ in range(N)]
    for p in procs:
        p.start()
    counts = [out.get(timeout=120) for _ in procs]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert sum(counts) == BOUND  # N x M = 20,000 tries, exactly BOUND applied
    assert t.get("hot", "n") == BOUND


def _delete_and_die(table: Table) -> None:
    _shmtable._set_crashpoint(crashpoints.DELETE_FREED, 1, int(signal.SIGKILL))
    table.delete("gone")


def test_an_add_that_recovers_a_dead_writers_lock_applies_and_logs_it(
    make_table: Callable[..., Table], caplog: pytest.LogCaptureFixture
) -> None:
    """The first call to take a lock whose holder was SIGKILLed repairs it, applies its add
    and logs the recovery once, like every other row operation."""
    crashpoints.require()
    t = make_table(16, COLS)
    t.set("gone", {"n": 1})
    child = mp.get_context("fork").Process(target=_delete_and_die, args=(t,))
    child.start()
    child.join(10)
    assert child.exitcode == -signal.SIGKILL
    with caplog.at_level(logging.WARNING, logger="zeal_asgi"):
        assert incr_bounded(t, "new", "n", 2, 5) == (2, True)  # an insert: the global lock
    assert t.stats()["lock_recoveries"] >= 1
    assert [r for r in caplog.records if "recovered a lock whose holder died" in r.message]
    assert t.get("new", "n") == 2 and t.get("gone") is None
