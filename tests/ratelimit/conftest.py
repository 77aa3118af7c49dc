"""Fixtures of the rate-limit tests: a Store per backend (real servers), unique names."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend

BACKENDS = ["table", "redis", "tiered"]


def unique(prefix: str = "rl") -> str:
    """A name no other test uses (limiters, namespaces, Redis prefixes)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


def away_from_minute_end(margin: float = 20.0) -> None:
    """Wait until ``margin`` seconds or more remain in the current minute, so a burst that
    takes less than that sees one fixed window of a per-minute limit (windows are aligned)."""
    left = 60.0 - time.time() % 60.0
    if left < margin:
        time.sleep(left + 0.05)


@pytest.fixture
async def store_factory(request: pytest.FixtureRequest) -> AsyncIterator[Callable[[str], Any]]:
    """``await store_factory(kind)``: a fresh Store on that backend, closed after the test."""
    made: list[Store] = []

    async def factory(kind: str) -> Store:
        if kind == "table":
            store = Store(backend=TableBackend(namespace=unique("rt")))
        else:
            server = request.getfixturevalue("redis_server")
            conn: dict[str, Any] = {"url": server.url, "prefix": unique()}
            if kind == "tiered":
                conn["l1_ttl"] = 5.0
            store = Store(kind, conn)
        await store.start()
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()
        for name in ("close_all", "close_shared"):
            close = getattr(store.backend, name, None)
            if close is not None:
                close()  # unlink this test's shared-memory tables
