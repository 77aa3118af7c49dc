"""Fixtures of the messaging tests: the WebSocket registry on each of its stores."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.messaging.helpers import redis_link
from zeal_asgi.messaging.ws.rooms import RedisRegistry, Registry, ShmRegistry
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.store import Store

MSG_APP = "tests.messaging.apps.msg_app:app"
"""The app of the tests that run real servers."""


@pytest.fixture
def host_bus_cleanup() -> Iterator[None]:
    """Unlink this process's host bus after the test."""
    yield
    close_host_bus()


@pytest.fixture(params=["table", "redis"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    """A WebSocket registry on shared memory, then on a real Redis."""
    if request.param == "table":
        reg = ShmRegistry(owner_capacity=64, room_capacity=64)
        yield reg
        reg.close()
        return
    url = request.getfixturevalue("redis_url")
    store = Store("redis", {"url": url})
    await store.start()
    yield RedisRegistry(redis_link(store))
    await store.aclose()
