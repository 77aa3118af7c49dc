"""The cache under real servers: stampede across workers and hosts, GC on one worker per host,
a crashed computer, and values surviving a restart (``tests/cache/apps/cache_app.py``)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests._harness.apps import AppServer, AppServers
from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer
from tests.cache.conftest import SECRET

pytestmark = pytest.mark.servers

APP = "tests.cache.apps.cache_app:app"


class Servers:
    """Servers of one test running the cache app, with the file where its computations log."""

    def __init__(self, tmp_path: Path, app_servers: AppServers) -> None:
        self.tmp_path = tmp_path
        self.app_servers = app_servers
        self.calls = tmp_path / "calls"
        self.calls.touch()

    def server(
        self, kind: str = "uvicorn-workers", *, cache_dir: str = "c", **env: str
    ) -> AppServer:
        """A server of the cache app (not started), 2 workers."""
        full = {
            "CACHE_TEST_DIR": str(self.tmp_path / cache_dir),
            "CACHE_TEST_CALLS": str(self.calls),
            **env,
        }
        return AppServer(APP, server=kind, env=full)

    def start(self, kind: str = "uvicorn-workers", **env: str) -> AppServer:
        """A started server of the cache app (cache directory ``c``)."""
        return self.app_servers.start_all([self.server(kind, **env)])[0]

    def call_lines(self) -> list[str]:
        return self.calls.read_text().splitlines()


@pytest.fixture
def servers(tmp_path: Path, app_servers: AppServers) -> Servers:
    """Starts the cache app; every server is stopped after the test (SIGTERM: it unlinks its
    shared memory), then killed with its workers if anything is left."""
    return Servers(tmp_path, app_servers)


async def _burst(urls: list[str], n: int) -> list[dict[str, Any]]:
    """``n`` concurrent GETs spread over ``urls``, each on its own connection."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:

        async def one(i: int) -> dict[str, Any]:
            r = await client.get(urls[i % len(urls)])
            r.raise_for_status()
            out: dict[str, Any] = r.json()
            return out

        return await asyncio.gather(*(one(i) for i in range(n)))


@pytest.mark.parametrize("kind", ["uvicorn-workers", "gunicorn-preload"])
def test_stampede_on_one_host_computes_once(servers: Servers, kind: str) -> None:
    server = servers.start(kind, ZEAL_CACHE_SECRET=SECRET)
    for attempt in range(5):
        key = f"hot{attempt}"
        before = len(servers.call_lines())
        replies = asyncio.run(_burst([f"{server.url}/compute/{key}?sleep=0.5"], 40))
        calls = len(servers.call_lines()) - before
        pids = {r["pid"] for r in replies}
        values = {repr(r["value"]) for r in replies}
        print(f"\nstampede (table, {kind}): 40 requests on {len(pids)} workers, {calls} call(s)")
        assert calls == 1 and len(values) == 1
        if len(pids) == 2:
            return
    pytest.fail("the requests never reached both workers")


@pytest.mark.parametrize("backend", ["redis", "tiered"])
def test_stampede_across_hosts_computes_once(
    servers: Servers, redis_server: RedisServer, backend: str
) -> None:
    env = {
        "ZEAL_STORE_BACKEND": backend,
        "ZEAL_REDIS_URL": redis_server.url,
        "ZEAL_KEY_PREFIX": f"z{uuid.uuid4().hex[:8]}",
        "ZEAL_CACHE_SECRET": SECRET,
    }
    hosts = servers.app_servers.start_all(
        servers.server(cache_dir=f"host{i}", **env) for i in range(2)
    )
    replies = asyncio.run(_burst([f"{h.url}/compute/hot?sleep=0.5" for h in hosts], 40))
    lines = servers.call_lines()
    pids = {r["pid"] for r in replies}
    print(
        f"\nstampede ({backend}, 2 hosts x 2 workers): 40 requests on {len(pids)} workers, "
        f"{len(lines)} call(s)"
    )
    assert len(lines) == 1
    assert len({repr(r["value"]) for r in replies}) == 1
    assert all(pids & h.worker_pids for h in hosts)  # both hosts served some of them


def _sweeps(server: AppServer) -> dict[int, int]:
    """Sweeps per live worker: pid 0's row holds dead workers' folded counts, and it grows
    when a dead worker's row is folded into it, not when anything sweeps."""
    return {int(p): n for p, n in server.get("/stats")["gc_sweeps"].items() if int(p) != 0}


def test_gc_runs_on_exactly_one_worker_and_fails_over(servers: Servers) -> None:
    server = servers.start(ZEAL_CACHE_SECRET=SECRET, CACHE_TEST_GC_MS="100")
    time.sleep(1.2)
    first = _sweeps(server)
    time.sleep(0.8)
    second = _sweeps(server)
    active = {p for p in second if second[p] > first.get(p, 0)}
    print(f"\nGC: sweeps per worker {second} (workers {sorted(server.worker_pids)})")
    assert len(active) == 1 and second[next(iter(active))] >= 5
    (holder,) = active
    os.kill(holder, signal.SIGKILL)
    time.sleep(1.2)
    third = _sweeps(server)
    time.sleep(0.8)
    fourth = _sweeps(server)
    active_after = {p for p in fourth if fourth[p] > third.get(p, 0)}
    print(f"GC after SIGKILL of {holder}: sweeps per worker {fourth}")
    assert len(active_after) == 1 and holder not in active_after


def test_crashed_computer_does_not_block_the_others(servers: Servers) -> None:
    server = servers.start(ZEAL_CACHE_SECRET=SECRET)

    async def scenario() -> tuple[float, dict[str, Any]]:
        async with httpx.AsyncClient(timeout=30.0) as client:
            stuck = asyncio.create_task(client.get(f"{server.url}/compute/k?sleep=60"))
            for _ in range(500):  # until the computation has started (it logs its pid)
                if servers.call_lines():
                    break
                await asyncio.sleep(0.02)
            computer = int(servers.call_lines()[0].split()[0])
            os.kill(computer, signal.SIGKILL)
            with contextlib.suppress(httpx.HTTPError):
                await stuck
            # the CPU wait of this thread and of the live workers is left out
            watch = Stopwatch(*(server.worker_pids - {computer}))
            async with httpx.AsyncClient(timeout=30.0) as fresh:
                r = await fresh.get(f"{server.url}/compute/k?sleep=0")
            return watch.own(), r.json()

    elapsed, reply = asyncio.run(scenario())
    lines = servers.call_lines()
    print(f"\ncrashed computer: next caller served in {elapsed * 1000:.0f} ms (less CPU wait)")
    assert len(lines) == 2 and lines[0].split()[0] != lines[1].split()[0]
    assert reply["value"]["by"] == int(lines[1].split()[0])
    assert elapsed < 3.0  # the lock of a dead pid is taken over at once, not after the lease


def test_values_survive_a_restart_only_with_a_secret(servers: Servers) -> None:
    sizes = {f"s{i}": 10 for i in range(10)} | {f"b{i}": 20_000 for i in range(5)}
    first = servers.start("launcher", ZEAL_CACHE_SECRET=SECRET)
    for key, size in sizes.items():
        assert first.get(f"/put/{key}", size=size)["stored"] is True
    first.stop()
    second = servers.start("launcher", ZEAL_CACHE_SECRET=SECRET)
    got = {key: second.get(f"/get/{key}") for key in sizes}
    hits_file = second.get("/stats")["cache"]["hits_file"]
    second.stop()
    print(f"\nrestart with a secret: {sum(g['found'] for g in got.values())}/{len(sizes)} served")
    for key, size in sizes.items():
        assert got[key]["found"] and got[key]["value"] == {"key": key, "pad": "p" * size}
    assert hits_file == len(sizes)
    # without a secret each server run has its own random key: earlier files are unreadable
    third = servers.start("uvicorn-workers")
    assert not any(third.get(f"/get/{key}")["found"] for key in sizes)
    # ...but every worker of the run shares that key: a file written by one is read by another
    writer = third.get("/put/big", size=20_000)["pid"]
    reply = third.get_from("/get/big", avoid=writer)
    assert reply["found"] and reply["value"]["pad"] == "p" * 20_000
