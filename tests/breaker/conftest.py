"""Fixtures of the breaker tests: Redis stores behind the breaker, unlinked after use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any, Protocol

import pytest

from zeal_asgi.store import Store
from zeal_asgi.store.backends.breaker import CircuitBreakerBackend

COLUMNS: dict[str, Any] = {"v": (Store.TYPE_INT, 8), "s": (Store.TYPE_STRING, 16)}
FAST = {"socket_timeout": 0.5, "connect_timeout": 0.5, "retries": 0}
"""Redis options that make an outage show quickly."""


class MakeStore(Protocol):
    def __call__(
        self, url: str, breaker: dict[str, Any] | None = None, **options: Any
    ) -> Store: ...


def breaker_of(store: Store) -> CircuitBreakerBackend:
    """The breaker wrapper of ``store``."""
    backend = store.backend
    assert isinstance(backend, CircuitBreakerBackend)
    return backend


@pytest.fixture
async def make_store() -> AsyncIterator[MakeStore]:
    """Factory of stores (redis by default) behind a breaker with its own name and prefix."""
    made: list[Store] = []

    def factory(url: str, breaker: dict[str, Any] | None = None, **options: Any) -> Store:
        kind = options.pop("kind", "redis")
        conn = {
            "url": url,
            "prefix": f"bk{uuid.uuid4().hex[:8]}",
            "on_error": "fallback_table",
            "breaker": {"name": f"t{uuid.uuid4().hex[:12]}", **(breaker or {})},
            **FAST,
            **options,
        }
        store = Store(kind, conn)
        store.make("kv", 256, COLUMNS)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()
        breaker_of(store).close_shared()  # the primary's shared memory too
