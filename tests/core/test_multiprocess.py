"""N processes x M increments on one row and on one Atomic end at exactly N x M."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

import pytest

from zeal_asgi import Atomic, Table

N, M = 4, 20_000


def _row_worker(name: str, m: int) -> None:
    t = Table(16, {"hits": ("int", 8), "other": ("string", 8)}, name=name)
    for i in range(m):
        t.incr("hot", "hits")
        if i % 1000 == 0:
            t.set("hot", {"other": str(i % 7)})  # interleaved merges must not lose increments
    t.close()


def _atomic_worker(name: str, m: int) -> None:
    a = Atomic(0, name=name)
    for _ in range(m):
        a.increment()
    for _ in range(m // 2):
        a.decrement(2)
        a.increment(2)
    a.close()


def _run(target: Callable[[str, int], None], name: str, method: str) -> None:
    ctx: Any = mp.get_context(method)
    procs = [ctx.Process(target=target, args=(name, M)) for _ in range(N)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_row_increments_are_exact(make_table: Callable[..., Table], method: str) -> None:
    t = make_table(16, {"hits": ("int", 8), "other": ("string", 8)})
    _run(_row_worker, t.name, method)
    assert t.get("hot", "hits") == N * M
    assert len(t) == 1


@pytest.mark.parametrize("method", ["spawn", "fork"])
def test_atomic_increments_are_exact(make_atomic: Callable[..., Atomic], method: str) -> None:
    a = make_atomic(0)
    _run(_atomic_worker, a.name, method)
    assert a.get() == N * M


def _mixed_worker(name: str, seed: int) -> None:
    import random

    t = Table(200, {"v": ("int", 8)}, name=name)
    rnd = random.Random(seed)
    for _ in range(20_000):
        k = f"k{rnd.randrange(150)}"
        op = rnd.random()
        if op < 0.4:
            t.incr(k, "v")
        elif op < 0.6:
            t.delete(k)
        elif op < 0.8:
            t.get(k)
        else:
            sum(1 for _ in t.items()) if rnd.random() < 0.01 else t.exists(k)
    t.close()


def test_mixed_structural_churn_keeps_the_table_consistent(
    make_table: Callable[..., Table],
) -> None:
    t = make_table(200, {"v": ("int", 8)})
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_mixed_worker, args=(t.name, s)) for s in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    rows = dict(t.items())
    assert len(rows) == len(t)  # the O(1) count agrees with what iteration finds
    for k, r in rows.items():
        assert t.get(k) == r  # every row is reachable through the index
    st = t.stats()
    assert st["lock_recoveries"] == 0 and st["rows_lost"] == 0
