"""The response cache under real servers: one computation per key across workers and nodes,
and invalidations seen by the next request of another worker or node
(``tests/response_cache/apps/rc_app.py``)."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer
from tests.response_cache.conftest import SECRET

pytestmark = pytest.mark.servers

APP = "tests.response_cache.apps.rc_app:app"


class Servers:
    """Servers of one test, all stopped at teardown; their handler runs land in one file."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.calls = tmp_path / "calls"
        self.calls.touch()
        self.started: list[AppServer] = []
        self.clients: dict[AppServer, httpx.Client] = {}

    def start(self, kind: str, *, cache_dir: str = "c", **env: str) -> AppServer:
        full = {
            "RC_TEST_DIR": str(self.tmp_path / cache_dir),
            "RC_TEST_CALLS": str(self.calls),
            "ZEAL_CACHE_SECRET": SECRET,
            **env,
        }
        server = AppServer(APP, server=kind, workers=2, env=full).launch()
        self.started.append(server)
        return server

    def client(self, server: AppServer) -> httpx.Client:
        """A client of ``server`` opening a connection per request, so requests reach every
        worker (closed at teardown)."""
        if server not in self.clients:
            no_keepalive = httpx.Limits(max_keepalive_connections=0)
            self.clients[server] = httpx.Client(
                base_url=server.url, timeout=30.0, limits=no_keepalive
            )
        return self.clients[server]

    def runs(self, key: str) -> list[int]:
        """Pids of the handler runs for ``key``."""
        lines = [line.split() for line in self.calls.read_text().splitlines()]
        return [int(pid) for pid, k in lines if k == key]


@pytest.fixture
def servers(tmp_path: Path) -> Iterator[Servers]:
    s = Servers(tmp_path)
    yield s
    for client in s.clients.values():
        client.close()
    for server in s.started:
        server.stop(timeout=10.0)


def _redis_env(redis_server: RedisServer) -> dict[str, str]:
    return {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": redis_server.url,
        "ZEAL_KEY_PREFIX": f"rc{uuid.uuid4().hex[:8]}",
    }


async def _burst(urls: list[str], n: int) -> list[httpx.Response]:
    """``n`` concurrent GETs spread over ``urls``, each on its own connection."""
    limits = httpx.Limits(max_connections=n, max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=30.0, limits=limits) as client:
        replies = await asyncio.gather(*(client.get(urls[i % len(urls)]) for i in range(n)))
    for r in replies:
        assert r.status_code == 200, r.text
    return list(replies)


def _one_answer(replies: list[httpx.Response]) -> None:
    """Every reply carries the same body and the same ETag."""
    assert len({r.content for r in replies}) == 1
    assert len({r.headers["etag"] for r in replies}) == 1


@pytest.mark.parametrize("kind", ["uvicorn-workers", "launcher"])
def test_fifty_concurrent_misses_on_two_workers_run_the_handler_once(
    servers: Servers, kind: str
) -> None:
    server = servers.start(kind)
    server.wait_ready()
    for attempt in range(5):
        key = f"hot{attempt}"
        replies = asyncio.run(_burst([f"{server.url}/slow/{key}?sleep=0.5"], 50))
        answered_by = {int(r.headers["x-pid"]) for r in replies}
        runs = servers.runs(key)
        print(f"\n{kind}: 50 requests answered by {len(answered_by)} workers, {len(runs)} run(s)")
        assert len(runs) == 1
        _one_answer(replies)
        assert sum("age" not in r.headers for r in replies) == 1  # the computer's own answer
        if len(answered_by) == 2:
            return
    pytest.fail("the requests never reached both workers")


def test_fifty_concurrent_misses_on_two_servers_on_one_redis_run_the_handler_once(
    servers: Servers, redis_server: RedisServer
) -> None:
    env = _redis_env(redis_server)
    nodes = [servers.start("uvicorn-workers", cache_dir=f"node{i}", **env) for i in range(2)]
    for node in nodes:
        node.wait_ready()
    replies = asyncio.run(_burst([f"{n.url}/slow/hot?sleep=0.5" for n in nodes], 50))
    answered_by = {int(r.headers["x-pid"]) for r in replies}
    runs = servers.runs("hot")
    print(f"\nredis, 2 servers x 2 workers: answered by {len(answered_by)} workers, {runs} runs")
    assert len(runs) == 1
    _one_answer(replies)
    assert all(answered_by & n.worker_pids for n in nodes)  # both servers answered some


def _is_miss(servers: Servers, server: AppServer, path: str) -> tuple[bool, int]:
    r = servers.client(server).get(path)
    r.raise_for_status()
    return "age" not in r.headers, int(r.headers["x-pid"])


def test_invalidate_on_one_worker_is_a_miss_on_the_other(servers: Servers) -> None:
    server = servers.start("uvicorn-workers")
    server.wait_ready()
    for attempt in range(40):
        key = f"k{attempt}"
        path = f"/slow/{key}?sleep=0"
        servers.client(server).get(path)  # warm it (on either worker)
        miss, _ = _is_miss(servers, server, path)
        assert not miss, "a warm entry is a hit on every worker"
        inv = servers.client(server).post("/invalidate", params={"tag": f"key:{key}"}).json()
        assert inv["dropped"] == 1
        runs = len(servers.runs(key))
        miss, by = _is_miss(servers, server, path)
        assert miss, "the first request after an invalidation must be a miss"
        assert len(servers.runs(key)) == runs + 1
        if by != inv["pid"]:
            print(f"\ninvalidated on {inv['pid']}, next request on {by}: a miss")
            return
    pytest.fail("the request after the invalidation never reached the other worker")


def test_invalidate_on_one_node_is_a_miss_on_the_other(
    servers: Servers, redis_server: RedisServer
) -> None:
    env = _redis_env(redis_server)
    a, b = (servers.start("uvicorn", cache_dir=f"node{i}", **env) for i in range(2))
    a.wait_ready()
    b.wait_ready()
    path = "/slow/shared?sleep=0"
    assert _is_miss(servers, a, path)[0] is True
    assert _is_miss(servers, b, path)[0] is False  # node A's entry is a hit on node B
    assert servers.client(a).post("/invalidate", params={"tag": "slow"}).json()["dropped"] == 1
    assert _is_miss(servers, b, path)[0] is True
    assert _is_miss(servers, a, path)[0] is False
    assert len(servers.runs("shared")) == 2
