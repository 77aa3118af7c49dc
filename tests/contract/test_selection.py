"""Backend selection: ``Store.default_backend(...)``, ``ZEAL_*`` variables, bad configurations.

Every test that touches the process-wide default store restores it afterwards.
"""

from __future__ import annotations

import importlib
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest

from tests._harness.sched import Stopwatch
from tests._harness.servers import Memcached, RedisServer
from zeal_asgi import Counter, Table
from zeal_asgi.errors import ConfigError
from zeal_asgi.settings import ZealSettings
from zeal_asgi.store import Store, StoreBackendKind

from ._support import SECRET, release_shared, unique

# Imported up front so that the "no I/O" timings below never include a first import of redis-py.
importlib.import_module("zeal_asgi.store.backends.tiered")
importlib.import_module("zeal_asgi.store.backends.memcached")
importlib.import_module("zeal_asgi.store.backends.breaker")

UNROUTABLE = "192.0.2.1"
"""TEST-NET-1: a connection attempt would hang, so a fast answer proves no I/O happened."""
NO_IO_LIMIT = 1.0


class Swapper:
    """Stores that a test makes the process-wide default; all closed, old default restored."""

    def __init__(self) -> None:
        self.previous = Store._default
        self.closers: list[Store] = []
        self.backends: list[Any] = []

    def install(self, store: Store) -> Store:
        """Make ``store`` the process-wide default (closed at the end of the test)."""
        Store.set_default(store)
        self.closers.append(store)
        return store

    def remember_backend(self) -> None:
        """Keep the default store's current backend, to unlink its memory at the end."""
        self.backends.append(Store.default().backend)


@pytest.fixture
async def swap() -> AsyncIterator[Swapper]:
    """A :class:`Swapper`; afterwards its stores are closed and the old default is back."""
    swapper = Swapper()
    try:
        yield swapper
    finally:
        for store in swapper.closers:
            swapper.backends.append(store.backend)
            await store.aclose()
        for backend in swapper.backends:
            release_shared(backend)
        Store.set_default(swapper.previous)


@pytest.mark.redis
@pytest.mark.memcached
async def test_default_backend_switches_the_class_level_facade(
    swap: Swapper, redis_url: str, redis_server: RedisServer, memcached_server: Memcached
) -> None:
    swap.install(Store("table", {"namespace": unique()}))
    assert Store.default_backend() is StoreBackendKind.TABLE
    made = Store.make("sel", 16, {"v": (Store.TYPE_INT, 8)})
    assert isinstance(made, Table)
    hits = Counter(5, name="sel_hits")
    await Store.set("sel", "k", {"v": 1})
    assert await hits.increment() == 6
    swap.remember_backend()

    assert Store.default_backend("redis", redis_url) is StoreBackendKind.REDIS
    assert Store.default_backend() == "redis"
    # The table and the counter were declared again on Redis: the same calls now go there.
    assert await Store.get("sel", "k") is False
    await Store.set("sel", "k", {"v": 2})
    assert await hits.increment() == 6  # initial 5 written on the new backend, then +1
    assert redis_server.command("HGET", "zeal:{sel}:k", "v") == b"2"
    assert redis_server.command("GET", "zeal:counter:sel_hits") == b"6"
    await Store.aclose()
    swap.remember_backend()

    host_port = f"{memcached_server.host}:{memcached_server.port}"
    assert Store.default_backend(Store.BACKEND_MEMCACHED, host_port) is StoreBackendKind.MEMCACHED
    prefix = unique()
    Store.default_backend("memcached", {"servers": memcached_server.url, "prefix": prefix})
    await Store.set("sel", "k", {"v": 3})
    assert await Store.get("sel", "k") == {"v": 3}
    assert await hits.increment() == 6
    await Store.aclose()
    swap.remember_backend()

    # A bad setter call changes nothing.
    with pytest.raises(ConfigError):
        Store.default_backend("redis", "redis://")
    with pytest.raises(ConfigError):
        Store.default_backend(conn=redis_url)
    assert Store.default_backend() is StoreBackendKind.MEMCACHED
    assert await Store.get("sel", "k", "v") == 3


ENV_CASES = [
    "table",
    pytest.param("redis", marks=pytest.mark.redis),
    pytest.param("Redis", marks=pytest.mark.redis),
    pytest.param("tiered", marks=pytest.mark.redis),
    pytest.param("memcached", marks=pytest.mark.memcached),
]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[pytest.MonkeyPatch]:
    """No ZEAL_* variable from the outer environment leaks into the test."""
    import os

    for name in list(os.environ):
        if name.startswith("ZEAL_"):
            monkeypatch.delenv(name)
    yield monkeypatch


@pytest.mark.parametrize("kind", ENV_CASES)
async def test_environment_selects_the_backend(
    kind: str, clean_env: pytest.MonkeyPatch, swap: Swapper, request: pytest.FixtureRequest
) -> None:
    prefix = unique()
    clean_env.setenv("ZEAL_STORE_BACKEND", kind)
    clean_env.setenv("ZEAL_KEY_PREFIX", prefix)
    redis: RedisServer | None = None
    if kind.lower() in ("redis", "tiered"):
        redis = request.getfixturevalue("redis_server")
        clean_env.setenv("ZEAL_REDIS_URL", redis.url)
        clean_env.setenv("ZEAL_TIERED_INVALIDATION_SECRET", SECRET)
    if kind == "memcached":
        mc: Memcached = request.getfixturevalue("memcached_server")
        clean_env.setenv("ZEAL_MEMCACHED_SERVERS", f"{mc.host}:{mc.port}")
    want = StoreBackendKind.parse(kind)
    settings = ZealSettings.from_env()
    assert settings.store_backend is want
    if redis is not None:
        assert settings.redis_url == redis.url

    store = swap.install(Store())  # no arguments: the environment decides
    assert store.kind is want
    Store.set_default(None)
    assert Store.default().kind is want  # the class-level default is built the same way
    swap.install(Store.default())
    if kind == "table":
        # A private namespace, so no other test of this process can meet these segments.
        store.use_backend(Store("table", {"namespace": prefix}).backend)
    store.make("envt", 8, {"v": (Store.TYPE_INT, 8)})
    await store.start()
    await store.set("envt", "k", {"v": 7})
    assert await store.get("envt", "k") == {"v": 7}
    if redis is not None:
        assert redis.command("HGET", f"{prefix}:{{envt}}:k", "v") == b"7"


@pytest.mark.parametrize("value", ["mongo", "", "redis,table"])
def test_unknown_kind_is_a_config_error(
    value: str, clean_env: pytest.MonkeyPatch, swap: Swapper
) -> None:
    with pytest.raises(ConfigError):
        Store(value or "   ")
    store = swap.install(Store("table", {"namespace": unique()}))
    with pytest.raises(ConfigError):
        store.default_backend(value or "   ", None)
    assert store.kind is StoreBackendKind.TABLE
    if value:
        clean_env.setenv("ZEAL_STORE_BACKEND", value)
        with pytest.raises(ConfigError, match="ZEAL_STORE_BACKEND"):
            ZealSettings.from_env()
        with pytest.raises(ConfigError):
            Store()
    with pytest.raises(ConfigError):
        Store(5)  # type: ignore[arg-type]


BAD_CONNS: list[tuple[str, Any]] = [
    ("redis", "redis://"),
    ("redis", "redis://:6379"),
    ("redis", "rediss://"),
    ("redis", f"http://{UNROUTABLE}:6379"),
    ("redis", f"{UNROUTABLE}:6379"),
    ("redis", f"redis://{UNROUTABLE}:notaport"),
    ("redis", f"redis://{UNROUTABLE}:70000"),
    ("redis", f"redis://{UNROUTABLE}:6379/notadb"),
    ("redis", {"url": 5}),
    ("redis", {"url": f"redis://{UNROUTABLE}", "pool_size": 0}),
    ("redis", {"url": f"redis://{UNROUTABLE}", "no_such_option": 1}),
    ("redis", {"url": f"redis://{UNROUTABLE}", "on_error": "explode"}),
    ("tiered", "redis://"),
    ("tiered", {"url": f"redis://{UNROUTABLE}", "l1_ttl": -1}),
    ("memcached", f"{UNROUTABLE}:notaport"),
    ("memcached", f"{UNROUTABLE}:99999"),
    ("memcached", "memcached://"),
    ("memcached", f"http://{UNROUTABLE}:11211"),
    ("memcached", "bad host:11211"),
    ("memcached", {"servers": 5}),
]


@pytest.mark.parametrize(("kind", "conn"), BAD_CONNS, ids=[f"{k}:{c}" for k, c in BAD_CONNS])
async def test_bad_connection_is_a_config_error_at_once(
    kind: str, conn: Any, swap: Swapper
) -> None:
    watch = Stopwatch()
    with pytest.raises(ConfigError):
        Store(kind, conn)
    store = swap.install(Store("table", {"namespace": unique()}))
    store.make("kept", 4, {"v": (Store.TYPE_INT, 8)})
    with pytest.raises(ConfigError):
        store.default_backend(kind, conn)
    assert watch.own() < NO_IO_LIMIT
    assert store.kind is StoreBackendKind.TABLE  # the failed switch left the store as it was
    await store.set("kept", "k", {"v": 1})
    assert await store.get("kept", "k", "v") == 1


GOOD_UNREACHABLE: list[tuple[str, Any]] = [
    ("redis", f"redis://{UNROUTABLE}:6379/0"),
    ("redis", {"url": f"redis://{UNROUTABLE}:6379", "on_error": "fallback_table"}),
    ("tiered", {"url": f"redis://{UNROUTABLE}:6379", "invalidation_secret": SECRET}),
    ("memcached", f"{UNROUTABLE}:11211,{UNROUTABLE}:11212"),
    ("memcached", f"memcached://{UNROUTABLE}:11211"),
]


@pytest.mark.parametrize(
    ("kind", "conn"), GOOD_UNREACHABLE, ids=[f"{k}:{c}" for k, c in GOOD_UNREACHABLE]
)
async def test_selecting_a_backend_opens_no_connection(kind: str, conn: Any, swap: Swapper) -> None:
    watch = Stopwatch()
    store = swap.install(Store("table", {"namespace": unique()}))
    store.make("lazy", 4, {"v": (Store.TYPE_INT, 8)})
    Counter(0, name=unique("lazy"), store=store)
    swap.remember_backend()
    assert store.default_backend(kind, conn) is StoreBackendKind.parse(kind)
    assert watch.own() < NO_IO_LIMIT


def test_backend_constants_are_the_kind_names() -> None:
    assert Store.BACKEND_TABLE == "table" and Store.BACKEND_REDIS == "redis"
    assert Store.BACKEND_TIERED == "tiered" and Store.BACKEND_MEMCACHED == "memcached"
    assert {str(k) for k in StoreBackendKind} == {"table", "redis", "tiered", "memcached"}
