"""Shared memory under every server model, with real processes: a write in one worker is read
in another; a killed worker comes back to the same data; segments are 0600 and gone after a
clean shutdown; two servers share nothing (E5); stale segments are reclaimed (E4)."""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import time
import uuid

import pytest

from tests._harness.apps import AppServer, AppServers, wait_gone

pytestmark = pytest.mark.servers

APP = "tests.core.apps.shared_app:app"
MULTI = ["uvicorn-workers", "gunicorn", "gunicorn-preload", "launcher"]


def start(
    servers: AppServers, kind: str, workers: int, env: dict[str, str] | None = None
) -> AppServer:
    return servers.start(APP, server=kind, workers=workers, env=env)


@pytest.mark.parametrize("kind", ["uvicorn", *MULTI])
def test_workers_share_one_memory(app_servers: AppServers, kind: str) -> None:
    workers = 1 if kind == "uvicorn" else 2
    s = start(app_servers, kind, workers)
    info = s.get("/segments")
    paths = info["paths"]
    assert paths, "no named segment"
    for p in paths:
        st = os.stat(p)
        assert stat.S_IMODE(st.st_mode) == 0o600 and st.st_uid == os.geteuid()
    value = uuid.uuid4().hex
    writer = s.get("/put", k="key", v=value)["pid"]
    if workers > 1:
        other = s.get_from("/get", avoid=writer, k="key")
        assert other["v"] == value, "a write in one worker must be read in another"
        nonces = {s.get_from("/segments", pid=p)["nonce"] for p in s.worker_pids}
        assert len(nonces) == 1, "every worker maps the same segment"
    else:
        assert s.get("/get", k="key")["v"] == value
    counts = [s.get("/incr")["n"] for _ in range(60)]
    assert sorted(counts) == list(range(1, 61)), "the counter is shared and exact"
    assert s.stop() in (0, -signal.SIGTERM), s.log_text()  # uvicorn re-raises SIGTERM
    assert wait_gone(paths) == [], "segments must be gone after a clean shutdown"


@pytest.mark.parametrize("kind", MULTI)
def test_killed_worker_is_restarted_on_the_same_data(app_servers: AppServers, kind: str) -> None:
    s = start(app_servers, kind, 2)
    value = uuid.uuid4().hex
    victim = s.get("/put", k="survivor", v=value)["pid"]
    for _ in range(30):
        s.get("/incr")
    os.kill(victim, signal.SIGKILL)
    deadline = time.monotonic() + 20
    fresh = None
    while time.monotonic() < deadline:
        try:
            pid = s.get("/pid")["pid"]
        except Exception:
            time.sleep(0.05)
            continue
        if pid not in s.worker_pids:
            fresh = pid
            break
    assert fresh is not None, f"the supervisor did not restart the worker\n{s.log_text()}"
    assert s.get_from("/get", pid=fresh, k="survivor")["v"] == value
    assert s.get_from("/incr", pid=fresh)["n"] >= 31  # continued, not restarted from zero
    paths = s.get("/segments")["paths"]
    assert s.stop() in (0, -signal.SIGTERM)
    assert wait_gone(paths) == []


def test_two_servers_share_nothing(app_servers: AppServers) -> None:
    """E5: two invocations of the same app on one host."""
    a, b = app_servers.start_all(AppServer(APP, server="uvicorn") for _ in range(2))
    a.get("/put", k="k", v="from-a")
    assert b.get("/get", k="k")["v"] is None
    b.get("/incr")
    assert a.get("/incr")["n"] == 1
    pa, pb = a.get("/segments")["paths"], b.get("/segments")["paths"]
    assert set(pa).isdisjoint(pb)
    print(
        f"\nEXPERIMENT E5 | 2 servers, same app | cross_visible=0 "
        f"distinct_segments={len(pa)}+{len(pb)} | PASS"
    )
    a.stop()
    b.stop()
    assert wait_gone(pa + pb) == []


def test_e4_killed_single_process_server_is_reclaimed_at_next_start(
    app_servers: AppServers,
) -> None:
    # without the janitor process, nothing unlinks a SIGKILLed owner's segments until the sweep
    a = start(app_servers, "uvicorn", 1, env={"ZEAL_JANITOR": "0"})
    paths = a.get("/segments")["paths"]
    a.kill()
    assert all(os.path.exists(p) for p in paths)
    t0 = time.monotonic()
    b = start(app_servers, "uvicorn", 1)  # its first segment runs the sweep
    swept = time.monotonic() - t0
    left = wait_gone(paths, timeout=1.0)
    print(
        f"\nEXPERIMENT E4-single | SIGKILL, restart | before={len(paths)} after={len(left)} "
        f"start_s={swept:.2f} | {'PASS' if not left else 'FAIL'}"
    )
    assert left == []
    live = b.get("/segments")["paths"]
    b.stop()
    assert wait_gone(live) == []


def test_killed_single_process_server_is_cleaned_by_its_janitor(app_servers: AppServers) -> None:
    a = start(app_servers, "uvicorn", 1)
    paths = a.get("/segments")["paths"]
    a.kill()
    assert wait_gone(paths, timeout=5.0) == []


def test_e4_master_killed_segments_live_while_workers_live(app_servers: AppServers) -> None:
    s = start(app_servers, "uvicorn-workers", 2)
    paths = s.get("/segments")["paths"]
    workers = set(s.worker_pids)
    assert s.process is not None
    os.kill(s.pid, signal.SIGKILL)
    s.process.wait(10)
    time.sleep(0.5)
    # a sweep by a new server must not touch segments that live workers still use
    other = start(app_servers, "uvicorn", 1)
    assert all(os.path.exists(p) for p in paths), "a live segment was swept"
    for pid in workers:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    left = wait_gone(paths, timeout=5.0)
    print(
        f"\nEXPERIMENT E4-master | SIGKILL master, then workers | kept_while_live=yes "
        f"leaked={len(left)} | {'PASS' if not left else 'FAIL'}"
    )
    assert left == []
    live = other.get("/segments")["paths"]
    other.stop()
    assert wait_gone(live) == []
