"""``zeal.every``: exactly one run per period across the workers (and servers), never two, and
another worker takes over within one period when the runner is SIGKILLed."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest

from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer, running
from tests.conftest import quick_or_long
from tests.locks.conftest import LOCKS_APP, missing_periods, overrun_periods, run_periods
from zeal_asgi.shm.process import process_alive


def _runs(server: AppServer) -> dict[int, int]:
    return run_periods(server.get("/runs")["runs"])[0]


def _is_worker(pid: int) -> bool:
    """A worker of the launcher's supervisor (not its multiprocessing resource tracker)."""
    try:
        return b"multiprocessing.spawn" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False


def _two_live_workers(app: AppServer, timeout: float = 60) -> None:
    """Wait until the master has two live workers (a zombie is dead) that both answer."""
    deadline, answered = time.monotonic() + timeout, set[int]()
    while time.monotonic() < deadline:
        live = {p for p in app.children() if process_alive(p, None) and _is_worker(p)}
        if len(live) == 2 and live <= answered:
            return
        answered.add(app.get("/pid")["pid"])
        time.sleep(0.02)
    raise AssertionError("the supervisor did not restart the killed worker")


def _wait_periods(server: AppServer, want: int, timeout: float) -> dict[int, int]:
    deadline = time.monotonic() + timeout
    counts = _runs(server)
    while len(counts) < want and time.monotonic() < deadline:
        time.sleep(0.2)
        counts = _runs(server)
    return counts


@pytest.mark.parametrize("server", ["launcher", "uvicorn-workers", "gunicorn", "gunicorn-preload"])
def test_two_workers_run_a_50ms_job_once_per_period(server: str) -> None:
    periods = int(quick_or_long(200, 2000))
    with AppServer(LOCKS_APP, server=server, workers=2) as app:
        counts = _wait_periods(app, periods, timeout=periods * 0.05 * 4 + 10)
        runs = app.get("/runs")["runs"]
        counts, pids_of = run_periods(runs)
        pids = set(pids_of.values())
        workers = set(app.children())
    assert len(counts) >= periods
    assert {p: n for p, n in counts.items() if n != 1} == {}, "a period ran twice"
    # a period may pass without a run only when a run of an earlier one outlasted it (a loaded
    # machine can stretch the 5 ms job past a period): the runner took it with it
    taken = overrun_periods(runs, 50)
    missed = [p for p in missing_periods(counts, 50) if p not in taken]
    assert missed == [], "a period passed without a run"
    assert pids <= workers


def test_sigkilled_runner_is_replaced_within_one_period() -> None:
    """A 0.5 s job that runs for 0.3 s: SIGKILL the worker running it, repeatedly; the next
    period runs on another worker (the runner's lock is free at once)."""
    env = {"LOCKS_JOB_SECONDS": "0.5", "LOCKS_JOB_SLEEP": "0.3"}
    kills = int(quick_or_long(5, 30))
    with AppServer(LOCKS_APP, server="launcher", workers=2, env=env) as app:
        for _ in range(kills):
            counts, pids = run_periods(app.get("/runs")["runs"])
            deadline = time.monotonic() + 10
            while not counts and time.monotonic() < deadline:
                time.sleep(0.05)
                counts, pids = run_periods(app.get("/runs")["runs"])
            # Wait for a run that has just started, then kill its worker mid-run.
            last = max(counts)
            while max(counts) == last:
                time.sleep(0.02)
                counts, pids = run_periods(app.get("/runs")["runs"])
            killed_period = max(counts)
            victim = pids[killed_period]
            os.kill(victim, signal.SIGKILL)
            counts = _wait_periods(app, len(counts) + 2, timeout=10)
            _, pids = run_periods(app.get("/runs")["runs"])
            assert killed_period + 500 in counts, "the period after the kill did not run"
            assert pids[killed_period + 500] != victim
            _two_live_workers(app)  # the supervisor restarts the killed one
        counts = _runs(app)
    assert {p: n for p, n in counts.items() if n != 1} == {}
    assert missing_periods(counts, 500) == []


def test_two_servers_on_one_redis_run_a_cluster_job_once_per_period(
    fresh_redis: RedisServer,
) -> None:
    env = {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": fresh_redis.url,
        "LOCKS_SCOPE": "cluster",
        "LOCKS_JOB_SECONDS": "0.25",
    }
    periods = int(quick_or_long(40, 400))
    a_srv, b_srv = AppServer(LOCKS_APP, env=env), AppServer(LOCKS_APP, env=env)
    with running(a_srv, b_srv) as (a, b):
        counts = _wait_periods(a, periods, timeout=periods * 0.25 * 4 + 10)
        pids = set(run_periods(b.get("/runs")["runs"])[1].values())
    assert {p: n for p, n in counts.items() if n != 1} == {}, "a period ran twice"
    assert missing_periods(counts, 250) == []
    assert pids & set(a.worker_pids) and pids & set(b.worker_pids), "one server ran them all"
