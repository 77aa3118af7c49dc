"""The benchmark suites (``python -m bench --quick``) as tests: every peer runs, nothing is lost.

A few seconds per suite in smoke mode.  What is asserted is that every row of every suite was
measured (a peer that fails to install, start or answer shows up here, not months later in a
publishable run), that every target has a figure, and that zeal's multi-process increments end
exactly at the expected count.  Throughput is printed, never asserted: timings are not pass/fail.
The HTTP suite has its own test (tests/app/test_bench_http.py).
"""

from __future__ import annotations

import pytest

from bench import load_suite
from bench._harness import Config
from tests._harness.servers import require_binary

SUITES = ["table", "store", "cache", "pubsub", "ratelimit", "locks", "metrics"]


@pytest.mark.redis
@pytest.mark.memcached
@pytest.mark.parametrize("name", SUITES)
# a peer calls a deprecated API (aiocache closes redis-py with close(), not aclose())
@pytest.mark.filterwarnings("ignore:Call to deprecated close:DeprecationWarning")
def test_every_row_of_the_suite_is_measured(name: str) -> None:
    require_binary("redis-server")
    require_binary("memcached")
    if name == "ratelimit":
        require_binary("wrk")
    report = load_suite(name).run(Config.smoke())
    print(report.markdown())
    assert report.results, f"{name}: no results"
    failed = [
        f"{r.candidate} / {r.op} / {r.mode}: {r.status}" for r in report.results if r.status != "ok"
    ]
    assert not failed, f"{name}: rows not measured:\n" + "\n".join(failed)
    unmeasured = [t["target"] for t in report.extra["targets"] if t["met"] is None]
    assert not unmeasured, f"{name}: targets without a figure: {unmeasured}"
    inexact = [
        f"{r.candidate} / {r.op}"
        for r in report.results
        if r.candidate_id.startswith("zeal") and r.exact is False
    ]
    assert not inexact, f"{name}: zeal lost or invented increments: {inexact}"
