"""Fixtures of the app tests: the example app served by the real launcher, and stores to test on.

The example app runs as users run it: ``zeal-asgi run example_app.main:app --workers 2`` (the
harness's :class:`~tests._harness.apps.AppServer`, ready once both workers answer
``/health/store``), in its own temp dir as working directory, so its ``.cache`` lands there.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer, require_binary
from zeal_asgi import Store, Zeal
from zeal_asgi.store.backends.table import TableBackend

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
SCREENSHOTS = OUTPUT / "screenshots"
EXAMPLE_APP = "example_app.main:app"


def example_app_server(env: dict[str, str] | None = None) -> AppServer:
    """The example app under the launcher, 2 workers (not started)."""
    return AppServer(EXAMPLE_APP, env=env, ready="/health/store")


@pytest.fixture(scope="session")
def example_server() -> Iterator[AppServer]:
    """The example app, 2 workers, table backend, shared by the session's app tests."""
    with example_app_server() as server:
        yield server


@pytest.fixture(scope="session")
def app_redis() -> Iterator[RedisServer]:
    """A redis-server of the redis-backed example server alone (other tests flush theirs)."""
    require_binary("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def example_server_redis(app_redis: RedisServer) -> Iterator[AppServer]:
    """The example app, 2 workers, on ``ZEAL_STORE_BACKEND=redis``."""
    env = {"ZEAL_STORE_BACKEND": "redis", "ZEAL_REDIS_URL": app_redis.url}
    with example_app_server(env) as server:
        yield server


@pytest.fixture
def table_store() -> Iterator[Store]:
    """A private table-backend Store (unique segment namespace), unmapped after the test."""
    backend = TableBackend(namespace=f"test-{uuid.uuid4().hex[:10]}")
    yield Store(backend=backend)
    backend.close_all()


@pytest.fixture
def table_zeal(table_store: Store) -> Zeal:
    """A Zeal over :func:`table_store`."""
    return Zeal(store=table_store)
