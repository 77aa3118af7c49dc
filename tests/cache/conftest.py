"""Fixtures of the cache tests: a Store per backend (real servers), caches closed after use."""

from __future__ import annotations

import os
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from zeal_asgi.cache import Cache
from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend

SECRET = "s" * 32
"""A configured secret (32 bytes: enough for pickle too)."""

BACKENDS = ["table", "redis", "tiered", "memcached"]


def unique(prefix: str = "c") -> str:
    """A name no other test uses (table namespaces, Redis prefixes)."""
    return f"{prefix}{uuid.uuid4().hex[:10]}"


async def _make_store(kind: str, request: pytest.FixtureRequest) -> Store:
    """A Store on ``kind``; ``redis+breaker`` and the like: behind the circuit breaker."""
    kind, _, breaker = kind.partition("+")
    if kind == "table":
        return Store(backend=TableBackend(namespace=unique("ct")))
    conn: dict[str, Any] = {"prefix": unique()}
    if kind in ("redis", "tiered"):
        conn["url"] = request.getfixturevalue("redis_server").url
        if kind == "tiered":
            conn["l1_ttl"] = 5.0
    else:
        conn["servers"] = request.getfixturevalue("memcached_server").url
    if breaker:
        conn.update(on_error="fallback_table", breaker={"name": unique("bk")})
    store = Store(kind, conn)
    await store.start()
    return store


async def _close_store(store: Store) -> None:
    await store.aclose()
    close_all = getattr(store.backend, "close_all", None)
    if close_all is not None:
        close_all()  # unlink this test's shared-memory tables
    l1 = getattr(store.backend, "l1", None)
    if l1 is not None and getattr(l1, "close_all", None) is not None:
        l1.close_all()
    close_shared = getattr(store.backend, "close_shared", None)
    if close_shared is not None:
        close_shared()  # the breaker's shared state


@pytest.fixture
async def store_factory(
    request: pytest.FixtureRequest,
) -> AsyncIterator[Callable[[str], Any]]:
    """``await store_factory(kind)``: a fresh Store on that backend, closed after the test."""
    made: list[Store] = []

    async def factory(kind: str) -> Store:
        store = await _make_store(kind, request)
        made.append(store)
        return store

    yield factory
    for store in made:
        await _close_store(store)


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    """A cache directory path (not created: the cache creates it 0700)."""
    return tmp_path / "cache"


@pytest.fixture
def cache_factory(cache_dir: Path) -> Iterator[Callable[..., Cache]]:
    """Factory of Caches (GC off, own namespace, ``cache_dir`` unless given), closed after."""
    made: list[Cache] = []

    def factory(store: Store, **kw: Any) -> Cache:
        kw.setdefault("cache_dir", str(cache_dir))
        kw.setdefault("gc_interval_ms", 0)
        kw.setdefault("namespace", unique("ns"))
        cache = Cache(store=store, **kw)
        made.append(cache)
        return cache

    yield factory
    for cache in made:
        cache.close()


@pytest.fixture(params=BACKENDS)
async def any_cache(
    request: pytest.FixtureRequest,
    store_factory: Callable[[str], Any],
    cache_factory: Callable[..., Cache],
) -> Cache:
    """A cache on each backend in turn (real servers), with a configured secret."""
    store = await store_factory(request.param)
    return cache_factory(store, secret=SECRET)


@pytest.fixture
async def table_cache(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> Cache:
    """A cache on the table backend, with a configured secret."""
    return cache_factory(await store_factory("table"), secret=SECRET)


def entry_files(directory: Path | str) -> list[Path]:
    """The entry files (not temp files) of a cache directory."""
    return sorted(p for p in Path(directory).iterdir() if p.name.endswith(".zc"))


def temp_files(directory: Path | str) -> list[Path]:
    """The temp files of a cache directory."""
    return sorted(p for p in Path(directory).iterdir() if p.name.startswith(".tmp."))


def is_root() -> bool:
    """Tests that chown to another user need root."""
    return os.geteuid() == 0
