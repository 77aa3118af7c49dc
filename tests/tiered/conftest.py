"""Fixtures of the tiered tests: "nodes" (tiered backends with their own L1) sharing one Redis.

Two backends in one process with different ``l1_namespace`` behave like two hosts: each has its
own shared-memory L1 and its own origin, and they meet only through Redis.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any, Protocol

import pytest

from tests._harness.servers import RedisServer
from zeal_asgi.store import Store
from zeal_asgi.store.backends.tiered import TieredBackend

SECRET = "tiered-test-secret-0123456789"
COLUMNS: dict[str, Any] = {"v": (Store.TYPE_INT, 8), "s": (Store.TYPE_STRING, 16)}


def unique(prefix: str) -> str:
    """A name no other test uses."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


class MakeNode(Protocol):
    def __call__(
        self, *, start: bool = True, prefix: str | None = None, **options: Any
    ) -> Coroutine[Any, Any, Store]: ...


async def wait_for(predicate: Callable[[], bool], limit: float = 5.0, what: str = "") -> None:
    """Poll ``predicate`` on the event loop until it is true (AssertionError after ``limit`` s)."""
    deadline = time.monotonic() + limit
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or predicate}")
        await asyncio.sleep(0.002)


def tiered(store: Store) -> TieredBackend:
    """The tiered backend of ``store``."""
    backend = store.backend
    assert isinstance(backend, TieredBackend)
    return backend


async def settle(*stores: Store, limit: float = 5.0) -> None:
    """Wait until every node has received every invalidation any of them published."""
    backends = [tiered(s) for s in stores]
    await wait_for(
        lambda: all(b.subscriber.received >= sum(x.sent for x in backends) for b in backends),
        limit,
        "invalidations to arrive",
    )


@pytest.fixture
def prefix() -> str:
    """The Redis prefix shared by the nodes of one test."""
    return unique("tt")


@pytest.fixture
async def make_node(redis_server: RedisServer, prefix: str) -> AsyncIterator[MakeNode]:
    """Factory of tiered nodes on the session redis-server, with table ``kv`` (COLUMNS).

    Nodes are started (subscribed, L1 trusted) unless ``start=False``; everything is closed and
    the L1 segments unlinked after the test.
    """
    made: list[Store] = []

    async def factory(*, start: bool = True, prefix: str | None = None, **options: Any) -> Store:
        conn: dict[str, Any] = {
            "url": redis_server.url,
            "prefix": prefix or prefix_default,
            "l1_namespace": unique("l1-"),
            "invalidation_secret": SECRET,
            "l1_ttl": 30.0,
        }
        conn.update(options)
        if "cluster" in conn or "sentinel" in conn:
            del conn["url"]  # another topology than the session's standalone server
        table_opts = conn.pop("table", {})
        store = Store("tiered", conn)
        made.append(store)
        store.make("kv", table_opts.pop("max_rows", 256), COLUMNS, **table_opts)
        if start:
            await store.start()
            await wait_for(lambda: tiered(store).synced, what="the subscriber")
        return store

    prefix_default = prefix
    yield factory
    for store in made:
        await store.aclose()
        tiered(store).close_shared()
