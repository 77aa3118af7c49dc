"""Two separate server processes sharing one Redis: counters add up, rows cross nodes.

Node A is ``uvicorn`` with one worker, node B the project's launcher with two workers; both run
``apps/node_app.py`` with the same ``ZEAL_REDIS_URL`` and ``ZEAL_KEY_PREFIX``. On the tiered
backend each node also has its own L1 (shared memory of its own server), kept coherent by the
invalidations that cross through Redis.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
import pytest_asyncio

from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer, start_all, stop_all

from ._support import SECRET, unique

pytestmark = [pytest.mark.servers, pytest.mark.redis, pytest.mark.asyncio(loop_scope="module")]

APP = "tests.contract.apps.node_app:app"

HITS = 300
CONCURRENCY = 12
"""Requests in flight: at most 6 per node, within one worker's 8 pooled connections (the
default 0.1 s pool wait would otherwise shed load on a busy 2-core box)."""
L1_TTL = 30.0
"""Long enough that only an invalidation (never expiry) can refresh a node's L1 in a test."""
INVALIDATION_LIMIT = 3.0


class Node:
    """A server of ``apps/node_app.py`` and an HTTP client that opens a connection per request
    (so that the kernel hands requests to every worker of the node)."""

    def __init__(self, server: AppServer) -> None:
        self.server = server
        self.client = httpx.AsyncClient(
            base_url=server.url, timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.pids = set(server.worker_pids)
        """Every worker that answered (at startup or to a call)."""

    async def call(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        """One request; the JSON reply (HTTP errors raise)."""
        reply = await self.client.request(method, path, params=params)
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        self.pids.add(body["pid"])
        return body


@dataclass
class Pair:
    """Two nodes of one app on one backend."""

    backend: str
    a: Node
    b: Node


@pytest_asyncio.fixture(scope="module", loop_scope="module", params=["redis", "tiered"])
async def pair(request: pytest.FixtureRequest, redis_server: RedisServer) -> AsyncIterator[Pair]:
    """Nodes A and B on one backend (own key prefix), stopped cleanly after the module."""
    backend: str = request.param
    env = {
        "ZEAL_STORE_BACKEND": backend,
        "ZEAL_REDIS_URL": redis_server.url,
        "ZEAL_KEY_PREFIX": unique("mn"),
        "ZEAL_TIERED_INVALIDATION_SECRET": SECRET,
        "ZEAL_L1_TTL": str(L1_TTL),
    }

    def synced(reply: dict[str, Any]) -> bool:  # on tiered, the worker trusts its L1
        return bool(reply["synced"])

    servers = [
        AppServer(APP, server="uvicorn", env=env, ready="/info", ready_when=synced),
        AppServer(APP, server="launcher", workers=2, env=env, ready="/info", ready_when=synced),
    ]
    try:
        await asyncio.to_thread(start_all, servers)
        a, b = (Node(s) for s in servers)
        try:
            yield Pair(backend, a, b)
        finally:
            await a.client.aclose()
            await b.client.aclose()
        statuses = [await asyncio.to_thread(s.stop) for s in servers]
    finally:
        await asyncio.to_thread(stop_all, servers)
    for server, status in zip(servers, statuses, strict=True):
        log = server.log_text()
        # uvicorn re-raises the SIGTERM it handled once it has shut down cleanly.
        assert status in (0, -signal.SIGTERM), f"node exited with {status}:\n{log}"
        assert "Traceback" not in log, log


async def test_counter_adds_up_exactly_across_nodes(pair: Pair) -> None:
    start = (await pair.a.call("GET", "/totals"))["counter"]
    gate = asyncio.Semaphore(CONCURRENCY)

    async def one(i: int) -> dict[str, int]:
        async with gate:
            node = pair.a if i % 2 else pair.b
            return await node.call("GET", "/hit")

    replies = await asyncio.gather(*(one(i) for i in range(HITS)))
    counters = sorted(r["counter"] - start for r in replies)
    # Every increment got its own value: none lost, none duplicated, on either node.
    assert counters == list(range(1, HITS + 1))
    a_totals = await pair.a.call("GET", "/totals")
    b_totals = await pair.b.call("GET", "/totals")
    assert a_totals["counter"] == b_totals["counter"] == start + HITS
    assert a_totals["row"] == b_totals["row"] == a_totals["counter"]
    served = {r["pid"] for r in replies}
    assert served & pair.a.pids and served & pair.b.pids and not pair.a.pids & pair.b.pids
    print(
        f"\n{pair.backend}: {HITS} hits over 2 nodes and {len(served)} workers -> "
        f"counter +{b_totals['counter'] - start}, row total {b_totals['row']}"
    )


async def test_rows_cross_nodes(pair: Pair) -> None:
    key = unique("row")
    assert (await pair.b.call("GET", f"/row/{key}"))["row"] is None
    await pair.a.call("PUT", f"/row/{key}", v="from-a")
    assert (await pair.b.call("GET", f"/row/{key}"))["row"] == {"v": "from-a", "n": 0}
    await pair.b.call("PUT", f"/row/{key}", v="from-b ✓")
    assert (await pair.a.call("GET", f"/row/{key}"))["row"] == {"v": "from-b ✓", "n": 0}
    assert (await pair.a.call("DELETE", f"/row/{key}"))["deleted"] is True
    assert (await pair.b.call("GET", f"/row/{key}"))["row"] is None
    assert (await pair.b.call("DELETE", f"/row/{key}"))["deleted"] is False


@pytest.mark.parametrize("pair", ["tiered"], indirect=True)
async def test_tiered_invalidation_crosses_nodes(pair: Pair) -> None:
    assert pair.backend == "tiered"
    key = unique("inv")
    await pair.a.call("PUT", f"/row/{key}", v="v1")
    # Node B reads the row until its L1 holds a fresh copy: from then on B answers from L1.
    deadline = time.monotonic() + 5.0
    while not (await pair.b.call("GET", f"/cached/{key}"))["cached"]:
        assert time.monotonic() < deadline, "node B never cached the row in its L1"
        assert (await pair.b.call("GET", f"/row/{key}"))["row"]["v"] == "v1"
    written = time.monotonic()
    await pair.a.call("PUT", f"/row/{key}", v="v2")
    while True:
        reply = await pair.b.call("GET", f"/row/{key}")
        if reply["synced"] and reply["row"]["v"] == "v2":
            break
        elapsed = time.monotonic() - written
        assert elapsed < INVALIDATION_LIMIT, f"node B still serves {reply['row']} after {elapsed}s"
        await asyncio.sleep(0.005)
    delay = time.monotonic() - written
    # Node B's L1 is shared by its workers: none of them may still serve the old row.
    later = [await pair.b.call("GET", f"/row/{key}") for _ in range(10)]
    assert all(r["row"]["v"] == "v2" for r in later)
    print(f"\ntiered: a write on node A reached node B's L1 in {delay * 1000:.1f} ms")
