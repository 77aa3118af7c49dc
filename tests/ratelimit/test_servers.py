"""Exactness under real servers: 8 concurrent clients hammer one key of a fixed-window limit of
100/minute; exactly 100 answers are 200 and the rest 429, with 2 workers under ``zeal-asgi
run``, ``uvicorn --workers 2`` and gunicorn, on the table backend and on Redis, and with two
single-process servers ("nodes") on one Redis."""

from __future__ import annotations

import collections
import concurrent.futures
import time
from typing import Any

import httpx
import pytest

from tests._harness.apps import AppServer, AppServers
from tests.ratelimit.conftest import away_from_minute_end, unique

pytestmark = pytest.mark.servers

CLIENTS = 8
PER_CLIENT = 25  # 200 tries for a limit of 100


def hammer(urls: list[str], path: str) -> tuple[collections.Counter[int], set[int]]:
    """``CLIENTS`` threads, each sending ``PER_CLIENT`` GETs on fresh connections (so the
    kernel spreads them over the workers), round-robin over ``urls``; statuses and the pids
    that admitted a request."""

    def client(n: int) -> list[tuple[int, int | None]]:
        out = []
        limits = httpx.Limits(max_keepalive_connections=0)
        with httpx.Client(timeout=10.0, limits=limits) as c:
            for i in range(PER_CLIENT):
                r = c.get(urls[(n + i) % len(urls)] + path)
                out.append((r.status_code, r.json()["pid"] if r.status_code == 200 else None))
        return out

    with concurrent.futures.ThreadPoolExecutor(CLIENTS) as pool:
        answers = [a for batch in pool.map(client, range(CLIENTS)) for a in batch]
    return collections.Counter(s for s, _ in answers), {p for _, p in answers if p is not None}


def start(app_servers: AppServers, kind: str, env: dict[str, str], workers: int) -> AppServer:
    return app_servers.start(
        "tests.ratelimit.apps.limited_app:app", server=kind, workers=workers, env=env
    )


def host_counter(server: AppServer, name: str, want: int) -> int:
    """The host-wide counter ``name`` of ``/health/store``, once it reaches ``want`` (each
    worker adds its counts within a quarter second) or after 5 s."""
    deadline = time.monotonic() + 5.0
    while True:
        value = int(server.get("/health/store")["host"].get(name, 0))
        if value >= want or time.monotonic() > deadline:
            return value
        time.sleep(0.1)


def redis_env(redis_server: Any) -> dict[str, str]:
    return {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": redis_server.url,
        "ZEAL_KEY_PREFIX": unique(),
    }


@pytest.mark.parametrize("backend", ["table", "redis"])
@pytest.mark.parametrize("kind", ["launcher", "uvicorn-workers", "gunicorn"])
@pytest.mark.parametrize("path", ["/dep", "/mw"])
def test_two_workers_admit_exactly_the_limit(
    app_servers: AppServers, request: pytest.FixtureRequest, kind: str, backend: str, path: str
) -> None:
    env = redis_env(request.getfixturevalue("redis_server")) if backend == "redis" else {}
    server = start(app_servers, kind, env, workers=2)
    away_from_minute_end()
    statuses, pids = hammer([server.url], path)
    assert statuses == {200: 100, 429: CLIENTS * PER_CLIENT - 100}
    assert len(pids) == 2, f"one worker admitted everything: {pids}"
    name = path.strip("/")
    assert host_counter(server, f"zeal_ratelimit_{name}_allowed_total", 100) == 100
    assert host_counter(server, f"zeal_ratelimit_{name}_limited_total", 100) == 100


def test_two_nodes_on_one_redis_admit_exactly_the_limit(
    app_servers: AppServers, redis_server: Any
) -> None:
    env = redis_env(redis_server)
    nodes = [start(app_servers, "uvicorn", env, workers=1) for _ in range(2)]
    away_from_minute_end()
    statuses, pids = hammer([n.url for n in nodes], "/dep")
    assert statuses == {200: 100, 429: CLIENTS * PER_CLIENT - 100}
    assert len(pids) == 2  # both nodes admitted some
