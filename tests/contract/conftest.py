"""Fixtures of the contract suite: a ``store`` parametrized over every backend, on real servers.

Only the servers a backend needs are started (the session's ``redis_server`` for redis, tiered and
breaker; ``memcached_server`` for memcached), so ``-k table`` runs without any server.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from zeal_asgi.store import Store

from ._support import Servers, StoreMaker, backend_params, declare_tables


@pytest.fixture(params=backend_params())
def backend(request: pytest.FixtureRequest) -> str:
    """Name of the backend under test (see ``_support.BACKENDS``)."""
    name: str = request.param
    return name


@pytest.fixture
def servers(backend: str, request: pytest.FixtureRequest) -> Servers:
    """The real servers ``backend`` needs, started on first use (session scoped)."""
    if backend in ("redis", "tiered", "breaker"):
        return Servers(redis_url=request.getfixturevalue("redis_server").url)
    if backend == "memcached":
        return Servers(memcached_url=request.getfixturevalue("memcached_server").url)
    return Servers()


@pytest.fixture
async def make_store(backend: str, servers: Servers) -> AsyncIterator[StoreMaker]:
    """Factory of unstarted stores of ``backend``; all closed (and unlinked) after the test."""
    maker = StoreMaker(backend, servers)
    try:
        yield maker
    finally:
        await maker.close_all()


@pytest.fixture
async def store(make_store: StoreMaker) -> Store:
    """A started store of the backend under test, with tables ``t`` and ``bin`` declared."""
    s = make_store()
    declare_tables(s)
    await s.start()
    return s
