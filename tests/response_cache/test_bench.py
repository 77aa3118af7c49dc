"""``python -m bench response_cache --quick`` as a test: every row and target has a figure.

Throughput is printed, never asserted (timings are not pass/fail).  What is asserted: every
route of every server was measured with no transport error, every target has a figure, the
TestClient latency ran for every candidate on both backends, and the exact count holds: over
the distinct keys asked on both workers, zeal ran each key's handler exactly once.
"""

from __future__ import annotations

import pytest

from bench import response_cache
from bench._harness import Config
from tests._harness.servers import require_binary


@pytest.mark.servers
@pytest.mark.redis
def test_every_row_of_the_response_cache_suite_is_measured() -> None:
    require_binary("wrk")
    require_binary("redis-server")
    report = response_cache.run(Config.smoke())
    print(report.markdown())
    failed = [f"{r.candidate}: {r.status}" for r in report.results if r.status != "ok"]
    assert not failed, "rows not measured:\n" + "\n".join(failed)
    assert not report.extra["errors"], report.extra["errors"]
    for rows in report.extra["runs"].values():
        assert all(r["errors"] == 0 and r["non_2xx"] == 0 for r in rows), rows
    unmeasured = [t["target"] for t in report.extra["targets"] if t["met"] is None]
    assert not unmeasured, f"targets without a figure: {unmeasured}"
    for kind in ("memory", "redis"):
        assert set(report.extra["latency_us"][kind]) == set(response_cache.CANDIDATES)
    spread = report.extra["spread"]
    assert spread["misses"]["zeal"] == spread["keys"]  # once per key, whichever worker asked
