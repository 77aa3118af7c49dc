"""Fixtures of the response-cache tests: a Cache on a fresh Store, and an ASGI client."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
import pytest

from tests.cache import conftest as cache_fixtures
from zeal_asgi.cache import Cache
from zeal_asgi.shm.hoststats import host_stats

# The cache tests' fixtures: a Store per backend on real servers, Caches closed after use.
SECRET = cache_fixtures.SECRET
cache_dir = cache_fixtures.cache_dir
cache_factory = cache_fixtures.cache_factory
store_factory = cache_fixtures.store_factory


def client(app: Any) -> httpx.AsyncClient:
    """An HTTP client calling ``app`` in this process (no server, no lifespan)."""
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")


def counters() -> dict[str, int]:
    """This host's response-cache counters (``hits``, ``misses``, ...)."""
    pre = "response_cache_"
    return {k[len(pre) :]: v for k, v in host_stats().host().items() if k.startswith(pre)}


@pytest.fixture
async def cache(store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]) -> Cache:
    """A cache on a fresh table-backend Store."""
    return cache_factory(await store_factory("table"), secret=SECRET)


@pytest.fixture(params=["table", "redis"])
async def any_cache(
    request: pytest.FixtureRequest,
    store_factory: Callable[[str], Any],
    cache_factory: Callable[..., Cache],
) -> Cache:
    """A cache on the table backend, then on Redis (a real redis-server)."""
    return cache_factory(await store_factory(request.param), secret=SECRET)
