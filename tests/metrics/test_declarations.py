"""Declaring metrics and using their children in one process: Prometheus' rules as typed errors,
cached children, histogram and summary figures, the max_series bound (drop, count, log once,
never raise)."""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable
from typing import Any

import pytest

from tests.metrics.conftest import MakeRegistry, scrape
from zeal_asgi import metrics
from zeal_asgi.errors import ColumnTypeError, MetricError, NonFiniteFloatError, ZealError
from zeal_asgi.metrics import Registry, registry as registry_module
from zeal_asgi.shm.ext import Cells
from zeal_asgi.shm.hoststats import host_stats


def test_counter_children_are_cached_and_count(registry: Registry) -> None:
    c = metrics.Counter("jobs_total", "Jobs run.", labels=("queue", "status"), registry=registry)
    child = c.labels("mail", "ok")
    assert c.labels("mail", "ok") is child and c.labels(queue="mail", status="ok") is child
    assert c.labels("mail", 200) is c.labels("mail", "200")  # values are str()ed, as usual
    child.inc()
    child.inc(2.5)
    c.labels("sms", "ok").inc(0)
    plain = metrics.Counter("plain", "No labels.", registry=registry)
    plain.inc()
    assert scrape(registry) == {
        'jobs_total{queue="mail",status="200"}': 0,
        'jobs_total{queue="mail",status="ok"}': 3.5,
        'jobs_total{queue="sms",status="ok"}': 0,
        "plain_total": 1,
        "zeal_metrics_dropped_series_total": scrape(registry)["zeal_metrics_dropped_series_total"],
    }


def test_histogram_buckets_are_cumulative_with_count_and_sum(registry: Registry) -> None:
    h = metrics.Histogram("lat_seconds", "Latency.", labels=("route",), registry=registry)
    assert h.buckets[-1] == math.inf and h.buckets[:-1] == metrics.DEFAULT_BUCKETS
    for v in (0.001, 0.2, 0.2, 3.0, 100.0):
        h.labels("/x").observe(v)
    s = scrape(registry)
    assert s['lat_seconds_bucket{route="/x",le="0.005"}'] == 1
    assert s['lat_seconds_bucket{route="/x",le="0.25"}'] == 3
    assert s['lat_seconds_bucket{route="/x",le="5.0"}'] == 4
    assert s['lat_seconds_bucket{route="/x",le="+Inf"}'] == 5
    assert s['lat_seconds_count{route="/x"}'] == 5
    assert s['lat_seconds_sum{route="/x"}'] == pytest.approx(103.401)


def test_custom_buckets_wider_than_a_row(registry: Registry) -> None:
    bounds = [float(b) for b in range(1, 21)]  # 21 buckets and a sum: three rows of cells
    h = metrics.Histogram("wide", "Wide.", buckets=bounds, registry=registry)
    for v in range(25):
        h.observe(v)
    s = scrape(registry)
    assert [s[f'wide_bucket{{le="{b}"}}'] for b in bounds] == list(range(2, 22))
    assert s['wide_bucket{le="+Inf"}'] == 25 and s["wide_sum"] == sum(range(25))


def test_summary_is_count_and_sum(registry: Registry) -> None:
    s = metrics.Summary("job_seconds", "Job time.", labels=("kind",), registry=registry)
    for v in (1.0, 2.5, -0.5):
        s.labels("a").observe(v)
    out = scrape(registry)
    assert out['job_seconds_count{kind="a"}'] == 3 and out['job_seconds_sum{kind="a"}'] == 3.0


def test_timers_observe_durations_of_blocks_and_functions(registry: Registry) -> None:
    h = metrics.Histogram("t", "Timed.", buckets=[0.5], registry=registry)
    g = metrics.Gauge("busy", "In progress.", registry=registry)
    with h.time():
        pass

    @h.time()
    def work() -> int:
        assert scrape(registry)["busy"] == 0
        return 1

    @g.track_inprogress()
    async def job() -> int:
        assert scrape(registry)["busy"] == 1
        return 2

    assert work() == 1 and asyncio.run(job()) == 2
    out = scrape(registry)
    assert out['t_bucket{le="0.5"}'] == 2 and out["t_count"] == 2 and out["busy"] == 0


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda r: metrics.Counter("1bad", "x", registry=r), MetricError),
        (lambda r: metrics.Counter("a-b", "x", registry=r), MetricError),
        (lambda r: metrics.Counter("ok", "x", labels=("__x",), registry=r), MetricError),
        (lambda r: metrics.Counter("ok", "x", labels=("a b",), registry=r), MetricError),
        (lambda r: metrics.Counter("ok", "x", labels=("a", "a"), registry=r), MetricError),
        (lambda r: metrics.Counter("ok", "x", labels="ab", registry=r), MetricError),
        (lambda r: metrics.Histogram("ok", "x", labels=("le",), registry=r), MetricError),
        (lambda r: metrics.Summary("ok", "x", labels=("quantile",), registry=r), MetricError),
        (lambda r: metrics.Histogram("ok", "x", buckets=[2, 1], registry=r), MetricError),
        (lambda r: metrics.Histogram("ok", "x", buckets=["a"], registry=r), MetricError),  # type: ignore[list-item]
        (lambda r: metrics.Gauge("ok", "x", mode="avg", registry=r), MetricError),  # type: ignore[arg-type]
    ],
)
def test_bad_declarations_are_typed_errors(
    registry: Registry, call: object, error: type[Exception]
) -> None:
    with pytest.raises(error) as caught:
        call(registry)  # type: ignore[operator]
    assert isinstance(caught.value, (ZealError, ValueError))


def test_a_name_is_declared_once_per_registry(registry: Registry) -> None:
    metrics.Counter("dup_total", "x", registry=registry)
    with pytest.raises(MetricError):
        metrics.Gauge("dup", "x", registry=registry)  # the counter's family name
    metrics.Gauge("h", "x", registry=registry)
    with pytest.raises(MetricError):
        metrics.Histogram("h", "x", registry=registry)
    metrics.Histogram("lat", "x", registry=registry)
    with pytest.raises(MetricError):
        metrics.Gauge("lat_count", "x", registry=registry)  # one of the histogram's lines


def test_bad_calls_are_typed_errors_and_change_nothing(registry: Registry) -> None:
    c = metrics.Counter("c", "x", labels=("a",), registry=registry)
    h = metrics.Histogram("h", "x", registry=registry)
    g = metrics.Gauge("g", "x", registry=registry)
    with pytest.raises(MetricError):
        c.labels("1", "2")
    with pytest.raises(MetricError):
        c.labels(b="1")
    with pytest.raises(MetricError):
        c.inc()  # labelled: needs .labels()
    with pytest.raises(MetricError):
        c.labels("x").inc(-1)
    with pytest.raises(NonFiniteFloatError):
        c.labels("x").inc(math.nan)
    with pytest.raises(NonFiniteFloatError):
        h.observe(math.nan)
    with pytest.raises(NonFiniteFloatError):
        g.set(math.inf)
    with pytest.raises(ColumnTypeError):
        g.dec("1")  # type: ignore[arg-type]
    with pytest.raises(MetricError):
        c.labels("x" * 300)  # longer than a series key
    s = scrape(registry)
    assert s['c_total{a="x"}'] == 0 and s["h_count"] == 0 and s["g"] == 0


def test_past_max_series_new_series_are_dropped_counted_and_logged_once(
    make_registry: MakeRegistry, caplog: pytest.LogCaptureFixture
) -> None:
    small = make_registry(10)
    c = metrics.Counter("c", "x", labels=("id",), registry=small)
    before = host_stats().host().get("metrics_dropped_series", 0)
    with caplog.at_level(logging.WARNING, "zeal_asgi.metrics"):
        for i in range(25):
            c.labels(str(i)).inc()  # never raises
    assert len(small.table) == 10
    s = scrape(small)
    assert sum(1 for k in s if k.startswith("c_total")) == 10
    assert s['c_total{id="9"}'] == 1 and 'c_total{id="10"}' not in s
    assert host_stats().host()["metrics_dropped_series"] - before == 15
    assert s["zeal_metrics_dropped_series_total"] >= 15
    assert len([r for r in caplog.records if "full" in r.getMessage()]) == 1
    c.labels("3").inc()  # existing series keep counting
    g = metrics.Gauge("g", "x", registry=small)
    g.inc()  # dropped too: does nothing, raises nothing
    assert scrape(small)['c_total{id="3"}'] == 2 and scrape(small)["g"] == 0


Use = Callable[[Any], object]
KINDS: dict[str, tuple[Callable[[Registry], Any], Use, str]] = {
    # kind: (declaration with one label "id", a use of a child, the sample a use shows as)
    "counter": (
        lambda r: metrics.Counter("m", "x", ("id",), registry=r),
        lambda c: c.inc(),
        "m_total",
    ),
    "histogram": (
        lambda r: metrics.Histogram("m", "x", ("id",), registry=r),
        lambda c: c.observe(1),
        "m_count",
    ),
    "summary": (
        lambda r: metrics.Summary("m", "x", ("id",), registry=r),
        lambda c: c.observe(1),
        "m_count",
    ),
    "gauge": (lambda r: metrics.Gauge("m", "x", ("id",), registry=r), lambda c: c.inc(), "m"),
    "mostrecent": (
        lambda r: metrics.Gauge("m", "x", ("id",), mode="mostrecent", registry=r),
        lambda c: c.set(1),
        "m",
    ),
}


def dropped_series() -> int:
    return host_stats().host().get("metrics_dropped_series", 0)


def full_registry(make_registry: MakeRegistry, dead_shares: int) -> Registry:
    """A registry of 4 rows, full: ``dead_shares`` of them a dead worker's gauge share (freed by
    the next scrape), the others a counter's series."""
    small = make_registry(4)
    small.shared_by_worker()  # this process's first look for dead shares is done: not later
    metrics.Gauge("dead", "x", registry=small)
    for i in range(dead_shares):  # pid 999999999 is above any pid_max: dead
        Cells(small.table, [small.key("dead", f"999999999:{i + 1}", ())]).inc(1)
    filler = metrics.Counter("filler", "x", ("id",), registry=small)
    for i in range(4 - dead_shares):
        filler.labels(str(i)).inc()
    assert len(small.table) == 4
    return small


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_dropped_series_counts_once_however_often_it_is_used(
    make_registry: MakeRegistry, monkeypatch: pytest.MonkeyPatch, kind: str
) -> None:
    declare, use, sample = KINDS[kind]
    small = full_registry(make_registry, 0)
    m = declare(small)
    before = dropped_series()
    use(m.labels("late"))  # refused: counted
    assert dropped_series() - before == 1
    attempts: list[object] = []
    cells = small.cells

    def attempt(*args: Any, **kwargs: Any) -> object:
        attempts.append(args)
        return cells(*args, **kwargs)

    monkeypatch.setattr(small, "cells", attempt)
    for _ in range(100):
        use(m.labels("late"))  # the same series: not counted again, not even tried again
    assert dropped_series() - before == 1 and attempts == []
    use(m.labels("later"))  # another series: counted
    use(m.labels("later"))
    assert dropped_series() - before == 2
    s = scrape(small)
    assert f'{sample}{{id="late"}}' not in s and f'{sample}{{id="later"}}' not in s


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_dropped_series_is_made_once_rows_are_freed(
    make_registry: MakeRegistry, kind: str
) -> None:
    declare, use, sample = KINDS[kind]
    small = full_registry(make_registry, 2)  # a histogram series takes two rows
    m = declare(small)
    before = dropped_series()
    held = m.labels("late")  # a child kept by the caller, and one asked for at each use
    use(held)
    use(m.labels("late"))
    assert dropped_series() - before == 1
    assert f'{sample}{{id="late"}}' not in scrape(small)  # this scrape retires the dead shares
    assert len(small.table) == 2
    use(m.labels("late"))  # made now, and counts from now on
    use(m.labels("late"))
    # A gauge's child kept from before is made too; a counter's stays the child that does nothing.
    use(held)
    counted = {"mostrecent": 1, "gauge": 3}.get(kind, 2)
    assert scrape(small)[f'{sample}{{id="late"}}'] == counted
    assert dropped_series() - before == 1


def test_an_unlabelled_metric_refused_at_declaration_is_made_once_rows_are_freed(
    make_registry: MakeRegistry,
) -> None:
    small = full_registry(make_registry, 1)
    before = dropped_series()
    plain = metrics.Counter("plain", "x", registry=small)  # its series is refused at once
    for _ in range(10):
        plain.inc()
    assert dropped_series() - before == 1
    assert scrape(small)["plain_total"] == 0  # an unlabelled metric is always exposed
    plain.inc()
    assert scrape(small)["plain_total"] == 1 and dropped_series() - before == 1


def test_refused_series_remembered_are_bounded(
    make_registry: MakeRegistry, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(registry_module, "REFUSALS_KEPT", 8)
    small = full_registry(make_registry, 0)
    c = metrics.Counter("c", "x", ("id",), registry=small)
    before = dropped_series()
    for i in range(20):
        c.labels(str(i)).inc()
    assert dropped_series() - before == 20
    for i in range(12, 20):  # the 8 remembered: not counted again
        c.labels(str(i)).inc()
    assert dropped_series() - before == 20
    c.labels("0").inc()  # forgotten: counted once more
    c.labels("0").inc()
    assert dropped_series() - before == 21


def test_a_dropped_series_another_process_made_meanwhile_is_used(
    make_registry: MakeRegistry,
) -> None:
    small = full_registry(make_registry, 1)
    c = metrics.Counter("c", "x", ("id",), registry=small)
    before = dropped_series()
    c.labels("late").inc()
    # Another worker frees the dead share's row and takes it for this very series: the table is
    # full again, but the series exists now.
    assert small.table.delete(small.key("dead", "999999999:1", ()))
    Cells(small.table, [small.key("c", 0, ("late",))]).inc(5)
    assert len(small.table) == 4
    c.labels("late").inc()
    assert scrape(small)['c_total{id="late"}'] == 6 and dropped_series() - before == 1
