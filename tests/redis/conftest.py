"""Fixtures of the Redis backend tests: stores on the session redis-server, closed after use."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest

from tests._harness.servers import RedisServer
from zeal_asgi.store import Store
from zeal_asgi.store.backends.redis import RedisBackend

COLUMNS: dict[str, Any] = {
    "name": (Store.TYPE_STRING, 16),
    "i1": (Store.TYPE_INT, 1),
    "i2": (Store.TYPE_INT, 2),
    "i4": (Store.TYPE_INT, 4),
    "i8": (Store.TYPE_INT, 8),
    "f": (Store.TYPE_FLOAT,),
    "b": (Store.TYPE_BYTES, 8),
}
"""One column of every type and INT size."""


def unique_prefix() -> str:
    """A prefix no other test uses, so tests sharing a server never see each other's keys."""
    return f"zt{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def redis_store(redis_server: RedisServer) -> AsyncIterator[Store]:
    """A Store on the session redis-server (own prefix) with table ``t`` (tracked, COLUMNS)."""
    store = Store("redis", {"url": redis_server.url, "prefix": unique_prefix()})
    store.make("t", 1024, COLUMNS)
    await store.start()
    try:
        yield store
    finally:
        await store.aclose()


@pytest.fixture
async def make_redis(redis_server: RedisServer) -> AsyncIterator[Callable[..., RedisBackend]]:
    """Factory of RedisBackends (default: the session server, own prefix), closed after use."""
    made: list[RedisBackend] = []

    def factory(conn: str | dict[str, Any] | None = None, **options: Any) -> RedisBackend:
        if conn is None:
            conn = {"url": redis_server.url, "prefix": unique_prefix(), **options}
        backend = RedisBackend.from_config(conn)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()


def redis_keys(server: RedisServer, pattern: str = "*") -> list[bytes]:
    """Every key of ``server`` matching ``pattern`` (sorted)."""
    reply = server.command("KEYS", pattern)
    assert isinstance(reply, list)
    return sorted(k for k in reply if isinstance(k, bytes))
