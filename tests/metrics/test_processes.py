"""Metrics across real processes (forked, as gunicorn and the launcher fork workers): one series
for every process's increments, per-worker gauge shares and what becomes of a dead worker's,
and nothing that grows as workers come and go."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
from collections.abc import Callable
from multiprocessing.synchronize import Event

import pytest

from tests.metrics.conftest import scrape
from zeal_asgi import metrics
from zeal_asgi.metrics import Registry

_FORK = mp.get_context("fork")


def _run(target: Callable[[], None]) -> None:
    p = _FORK.Process(target=target)
    p.start()
    p.join(30)
    assert p.exitcode == 0


def _holding(act: Callable[[], None]) -> tuple[mp.process.BaseProcess, Event]:
    """A process that runs ``act`` and then waits (to be killed); returned once ``act`` ran."""
    ready = _FORK.Event()

    def body() -> None:
        act()
        ready.set()
        signal.pause()

    p = _FORK.Process(target=body, daemon=True)
    p.start()
    assert ready.wait(30)
    return p, ready


def _kill(p: mp.process.BaseProcess) -> None:
    os.kill(p.pid or 0, signal.SIGKILL)
    p.join(10)


def test_every_process_counts_into_one_series(registry: Registry) -> None:
    c = metrics.Counter("done", "x", labels=("k",), registry=registry)
    h = metrics.Histogram("lat", "x", buckets=[1.0], registry=registry)
    inherited = c.labels("before-fork")  # resolved here, used by the children too
    n = 20_000

    def work() -> None:
        for _ in range(n):
            inherited.inc()
            c.labels("after-fork").inc(0.5)
            h.observe(2.0)

    procs = [_FORK.Process(target=work) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = scrape(registry)
    assert s['done_total{k="before-fork"}'] == 2 * n
    assert s['done_total{k="after-fork"}'] == n
    assert s['lat_bucket{le="1.0"}'] == 0 and s['lat_bucket{le="+Inf"}'] == 2 * n
    assert s["lat_sum"] == 4 * n


def test_a_killed_workers_livesum_share_disappears_at_the_next_scrape(registry: Registry) -> None:
    g = metrics.Gauge("in_flight", "x", registry=registry)  # livesum
    g.inc()
    a, _ = _holding(lambda: g.inc(2))
    b, _ = _holding(lambda: g.inc(4))
    assert scrape(registry)["in_flight"] == 7
    rows = len(registry.table)
    _kill(a)
    assert scrape(registry)["in_flight"] == 5, "the dead worker's share is gone at once"
    assert len(registry.table) == rows - 1, "and so is its row"
    _kill(b)
    assert scrape(registry)["in_flight"] == 1


def test_a_forked_child_has_a_share_of_its_own(registry: Registry) -> None:
    g = metrics.Gauge("g", "x", registry=registry)
    g.set(5)  # the parent's share, resolved before the fork
    _run(lambda: g.set(1))  # must not overwrite the parent's share
    assert scrape(registry)["g"] == 5


@pytest.mark.parametrize(
    ("mode", "dead_values", "live_value", "expected", "rows_after"),
    [
        ("sum", [3, 7, -2], 10, 18, 2),  # dead shares folded into one "retired" row
        ("max", [3, 7, -2], 1, 7, 2),  # the largest dead share kept, the others removed
        ("min", [3, 7, -2], 1, -2, 2),
        ("livesum", [3, 7, -2], 10, 10, 1),
        ("mostrecent", [3, 7, -2], 10, 10, 1),  # one shared value: the last set wins
    ],
)
def test_gauge_modes_over_live_and_dead_workers(
    registry: Registry,
    mode: metrics.kinds.GaugeMode,
    dead_values: list[float],
    live_value: float,
    expected: float,
    rows_after: int,
) -> None:
    g = metrics.Gauge("g", "x", mode=mode, registry=registry)
    for v in dead_values:
        _run(lambda v=v: g.set(v))  # type: ignore[misc]
    live, _ = _holding(lambda: g.set(live_value))
    try:
        assert scrape(registry)["g"] == expected
        assert scrape(registry)["g"] == expected, "a second scrape does not count twice"
        assert len(registry.table) == rows_after
    finally:
        _kill(live)


def test_two_hundred_worker_restarts_leave_rows_and_memory_flat(registry: Registry) -> None:
    """Each "worker" counts, observes and holds an in-flight share, then is SIGKILLed."""
    c = metrics.Counter("requests", "x", labels=("route",), registry=registry)
    h = metrics.Histogram("lat", "x", labels=("route",), registry=registry)
    g = metrics.Gauge("in_flight", "x", registry=registry)

    def serve() -> None:
        c.labels("/x").inc()
        h.labels("/x").observe(0.1)
        g.inc()

    def rss_kib() -> int:
        with open(f"/proc/{os.getpid()}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    rows, rss = [], []
    for i in range(200):
        worker, _ = _holding(serve)
        _kill(worker)
        if i % 20 == 19:
            scrape(registry)
            rows.append(len(registry.table))
            rss.append(rss_kib())
    s = scrape(registry)
    print(f"rows after every 20 restarts: {rows}; scraper RSS KiB: {rss}")
    assert s['requests_total{route="/x"}'] == 200, "every increment of every dead worker kept"
    assert s['lat_count{route="/x"}'] == 200 and s["in_flight"] == 0
    assert len(set(rows)) == 1, "the rows do not grow with restarts"
    assert rss[-1] - rss[1] < 2048, "nor does the scraping process"
