"""Metrics under real servers and their workers: one series for every worker's increments
under each server model, a SIGKILLed worker's livesum share gone at the next scrape while
counters keep every increment, and 200 worker restarts that grow nothing."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests._harness.apps import AppServer, AppServers
from tests._harness.servers import require_binary
from zeal_asgi.shm.process import process_alive

pytestmark = pytest.mark.servers

APP = "tests.metrics.apps.metrics_app:app"
MULTI = ["uvicorn-workers", "gunicorn", "gunicorn-preload", "launcher"]


def samples(text: str) -> dict[str, float]:
    """``{'name{a="x"}': value}``, parsed by prometheus_client."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def scrape_each(server: AppServer) -> dict[int, dict[str, float]]:
    """A scrape answered by every worker, by pid."""
    return {pid: samples(r["text"]) for pid, r in server.on_each_worker("/scrape").items()}


def new_worker(server: AppServer, old: set[int], timeout: float = 30) -> int:
    """The pid of a worker not in ``old`` once it answers (its supervisor restarted one)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for pid in set(server.children()) - old:
            with contextlib.suppress(AssertionError):  # still starting: not serving yet
                return int(server.get_from("/pid", pid=pid, tries=20)["pid"])
        time.sleep(0.02)
    raise AssertionError(f"no new worker within {timeout} s\n{server.log_text()}")


@pytest.mark.parametrize("kind", MULTI)
def test_every_worker_counts_into_one_series(app_servers: AppServers, kind: str) -> None:
    s = app_servers.start(APP, server=kind, workers=2)
    pids = [s.get("/job")["pid"] for _ in range(100)]
    for i in range(50):
        s.get(f"/items/{i}")
    assert len(set(pids)) == 2, f"both workers must have counted: {set(pids)}"
    # The middleware records a request once its answer is sent: the client may be faster.
    last = 'zeal_http_requests_total{method="GET",route="/items/{item_id}",status="200"}'
    deadline = time.monotonic() + 10
    while samples(s.get("/scrape")["text"]).get(last) != 50 and time.monotonic() < deadline:
        time.sleep(0.01)
    for pid, got in scrape_each(s).items():
        assert got['test_jobs_total{kind="a"}'] == 100, pid
        assert got["test_job_seconds_count"] == 100 and got["test_job_seconds_sum"] == 25
        assert got['zeal_http_requests_total{method="GET",route="/job",status="200"}'] == 100
        assert got[last] == 50
    status, text = s.fetch("/metrics")
    assert status == 200
    promtool = require_binary("promtool")
    run = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True)
    assert run.returncode == 0 and not run.stdout.strip(), run


def test_a_killed_workers_share_goes_and_counters_keep_every_increment(
    app_servers: AppServers,
) -> None:
    s = app_servers.start(APP, server="launcher", workers=2)
    s.on_each_worker("/hold")  # each worker holds 1
    for _ in range(50):
        s.get("/job")
    assert all(got["test_held"] == 2 for got in scrape_each(s).values())
    victim = s.get("/pid")["pid"]
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while process_alive(victim, None) and time.monotonic() < deadline:  # the kernel is at it
        time.sleep(0.001)
    survivor = s.get_from("/scrape", avoid=victim)
    assert samples(survivor["text"])["test_held"] == 1, "the dead worker's share is gone"
    fresh = new_worker(s, set(s.children()) | {victim})
    for _ in range(50):
        s.get("/job")
    got = samples(s.get_from("/scrape", pid=fresh)["text"])
    assert got['test_jobs_total{kind="a"}'] == 100, "counts of the dead worker are kept"
    assert got["test_held"] == 1  # the fresh worker holds nothing yet


def test_two_hundred_worker_restarts_grow_nothing(app_servers: AppServers) -> None:
    """SIGKILL a worker 200 times (each one served, held a share and scraped first): the rows
    of shared memory, the series and the workers' memory stay flat."""
    s = app_servers.start(APP, server="gunicorn-preload", workers=2)
    t0 = time.monotonic()
    seen: list[tuple[int, int, int]] = []
    for i in range(200):
        pid = s.get("/job")["pid"]
        s.get_from("/hold", pid=pid)
        before = set(s.children())
        os.kill(pid, signal.SIGKILL)
        new_worker(s, before | {pid})
        if i % 20 == 19:
            series = len(samples(s.get("/scrape")["text"]))  # also retires dead shares
            mem = s.get("/memory")
            seen.append((mem["rows"], series, mem["rss_kib"]))
    print(f"200 restarts in {time.monotonic() - t0:.0f} s; (rows, series, worker RSS KiB): {seen}")
    got = samples(s.get("/scrape")["text"])
    assert got['test_jobs_total{kind="a"}'] == 200
    assert got["test_held"] <= 2, "only live workers' shares count"
    warm = seen[1:]  # after the first 20, every route and series has been seen
    assert len({series for _, series, _ in warm}) == 1, seen
    # a worker restarting right now may still hold its rows: 2 per worker, never more
    assert max(r for r, *_ in warm) - min(r for r, *_ in warm) <= 2, seen
    assert max(rss for *_, rss in warm) - min(rss for *_, rss in warm) < 4096, seen
