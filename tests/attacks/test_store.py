"""Store defects found by black-box testing (issue 12), each reproduced through the public API."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from pydantic import BaseModel, Field

from zeal_asgi import Store, health
from zeal_asgi.errors import (
    BackendResponseError,
    BackendUnavailableError,
    ConfigError,
    IntegerOverflowError,
    InvalidKeyError,
    ModelValidationError,
    SchemaError,
    SerializationError,
    UnsupportedOperationError,
    ZealError,
)

SECRET = "attack-store-secret-0123456789abcdef"
NETWORK = ["redis", "tiered", "memcached"]
EVERY = ["table", *NETWORK]
FAST = {"connect_timeout": 0.2, "socket_timeout": 0.2, "retries": 0}
"""Redis options that make an unreachable server show quickly."""

MakeStore = Callable[..., Store]


def _unique(prefix: str) -> str:
    return f"{prefix}{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def make_store(request: pytest.FixtureRequest) -> AsyncIterator[MakeStore]:
    """``make_store(kind, prefix=None)``: an unstarted Store on real servers, closed afterwards.

    Stores given the same ``prefix`` share their keys, like two apps on one server.
    """
    made: list[Store] = []

    def factory(kind: str, prefix: str | None = None) -> Store:
        prefix = prefix or _unique("atk")
        conn: dict[str, Any]
        if kind == "table":
            conn = {"namespace": prefix}
        elif kind == "memcached":
            conn = {"servers": request.getfixturevalue("memcached_server").url, "prefix": prefix}
        else:
            conn = {"url": request.getfixturevalue("redis_server").url, "prefix": prefix}
            if kind == "tiered":
                conn.update(invalidation_secret=SECRET, l1_namespace=_unique("l1"))
        store = Store(kind, conn)
        made.append(store)
        return store

    yield factory
    for store in made:
        await store.aclose()
        store.backend.close_shared()


# -- item 11: two apps on one server -------------------------------------------------------------


@pytest.mark.parametrize("kind", NETWORK)
async def test_two_apps_declaring_one_table_differently_are_refused(
    make_store: MakeStore, kind: str
) -> None:
    """Item 11: app 2 declares ``users{age}`` where app 1 made ``users{name}``: a SchemaError
    naming both declarations, and app 1's row stays as it was."""
    prefix = _unique("two")
    app1, app2 = make_store(kind, prefix), make_store(kind, prefix)
    app1.make("users", 64, {"name": (Store.TYPE_STRING, 16)})
    app2.make("users", 64, {"age": (Store.TYPE_INT, 8)})
    await app1.set("users", "k", {"name": "alice"})
    for call in (lambda: app2.get("users", "k"), lambda: app2.set("users", "k", {"age": 7})):
        with pytest.raises(SchemaError) as info:
            await call()
        assert '"name","STRING",16' in str(info.value) and '"age","INT",8' in str(info.value)
    assert await app1.get_strict("users", "k") == {"name": "alice"}


@pytest.mark.parametrize("kind", NETWORK)
async def test_two_apps_declaring_one_table_alike_share_it(
    make_store: MakeStore, kind: str
) -> None:
    """Item 11: the same declaration in two apps is one table."""
    prefix = _unique("same")
    app1, app2 = make_store(kind, prefix), make_store(kind, prefix)
    for app in (app1, app2):
        app.make("users", 64, {"name": (Store.TYPE_STRING, 16)})
    await app1.set("users", "k", {"name": "alice"})
    assert await app2.get_strict("users", "k") == {"name": "alice"}


# -- item 13: one rule per input on every backend --------------------------------------------


@pytest.mark.parametrize("kind", EVERY)
async def test_incr_by_an_int_beyond_any_double_is_an_integer_overflow_error(
    make_store: MakeStore, kind: str
) -> None:
    """Item 13: ``incr(k, FLOAT column, 10**400)`` was a raw OverflowError on the table, and
    a different error on each backend; the INT column's rule is the same."""
    store = make_store(kind)
    store.make("t", 16, {"f": (Store.TYPE_FLOAT,), "i": (Store.TYPE_INT, 4)})
    await store.start()
    for column in ("f", "i"):
        for by in (10**400, -(10**400)):
            with pytest.raises(IntegerOverflowError):
                await store.incr("t", "k", column, by)
            with pytest.raises(IntegerOverflowError):
                await store.decr("t", "k", column, by)
    assert await store.get_strict("t", "k") is None


@pytest.mark.parametrize("kind", EVERY)
async def test_publish_checks_channel_and_payload_alike_on_every_backend(
    make_store: MakeStore, kind: str
) -> None:
    """Item 13: a lone surrogate in a channel or payload (raw UnicodeEncodeError on Redis), the
    256-byte channel limit (table backend only) and bytearray payloads (refused by Redis) follow
    one rule, checked before any backend."""
    store = make_store(kind)
    await store.start()
    bad: list[tuple[Any, Any, type[ZealError]]] = [
        ("\udc80", "p", InvalidKeyError),
        ("c", "\udc80", SerializationError),
        ("x" * 257, "p", InvalidKeyError),
        ("é" * 129, "p", InvalidKeyError),  # 258 bytes
        ("", "p", InvalidKeyError),
        ("c", 12, SerializationError),
    ]
    for channel, payload, error in bad:
        with pytest.raises(error):
            await store.publish(channel, payload)
    good: list[tuple[str, Any]] = [("x" * 256, "p"), ("c", bytearray(b"ba")), ("c", b"b")]
    for channel, payload in good:
        if kind == "memcached":
            with pytest.raises(UnsupportedOperationError, match="memcached"):
                await store.publish(channel, payload)
        else:
            assert await store.publish(channel, payload) == 0  # nobody subscribed


# -- item 14: seed and contract gaps -------------------------------------------------------------


def test_tls_scheme_is_the_seeds_spelling_of_rediss() -> None:
    """Item 14: ``tls://`` was refused; it is TLS with verification, like ``rediss://``."""
    for kind in ("redis", "tiered"):
        link = Store(kind, "tls://cache.example:6380/1").backend.redis_link()
        assert link is not None
        cfg = link.config
        assert (cfg.tls, cfg.host, cfg.port, cfg.db) == (True, "cache.example", 6380, 1)
        assert cfg.ssl_cert_reqs == "required" and cfg.ssl_check_hostname


def test_an_empty_url_or_server_list_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """Item 14: an empty URL or server list silently became localhost; it is a ConfigError,
    as a bare ``redis://`` is."""
    monkeypatch.delenv("ZEAL_REDIS_URL", raising=False)
    monkeypatch.delenv("ZEAL_MEMCACHED_SERVERS", raising=False)
    empty: list[tuple[str, Any]] = [
        ("redis", ""),
        ("redis", " "),
        ("redis", {"url": ""}),
        ("tiered", ""),
        ("tiered", {"url": "", "l1_ttl": 1}),
        ("memcached", ""),
        ("memcached", {"servers": ""}),
        ("memcached", {"servers": []}),
    ]
    for kind, conn in empty:
        with pytest.raises(ConfigError, match="empty"):
            Store(kind, conn)
    monkeypatch.setenv("ZEAL_REDIS_URL", "")
    with pytest.raises(ConfigError, match="ZEAL_REDIS_URL"):
        Store("redis")
    monkeypatch.setenv("ZEAL_MEMCACHED_SERVERS", "")
    with pytest.raises(ConfigError, match="empty"):
        Store("memcached")


class User(BaseModel):
    """A model with limits a plain dict must keep too."""

    age: int = Field(ge=0, le=150)
    name: str = Field(max_length=3)


@pytest.mark.parametrize("kind", EVERY)
async def test_dict_writes_to_a_model_table_keep_the_models_limits(
    make_store: MakeStore, kind: str
) -> None:
    """Item 14: a dict written to a table made from a model skipped the model's limits."""
    store = make_store(kind)
    store.make("users", 16, model=User)
    await store.start()
    await store.set("users", "ok", {"age": 30, "name": "bob"})
    for row in ({"age": -5}, {"age": 30, "name": "abcd"}):  # both fit the columns
        with pytest.raises(ModelValidationError):
            await store.set("users", "k", row)
        with pytest.raises(ModelValidationError):
            await store.mset("users", {"m": {"age": 1}, "k": row})
    assert await store.get_strict("users", "k") is None
    assert await store.get_strict("users", "m") is None
    assert await store.get_model("users", "ok") == User(age=30, name="bob")


@pytest.mark.parametrize("kind", EVERY)
async def test_get_model_of_a_row_the_model_refuses_is_a_zeal_error(
    make_store: MakeStore, kind: str
) -> None:
    """Item 14: a stored row that the model refuses raised pydantic's ValidationError."""
    prefix = _unique("gm")
    store = make_store(kind, prefix)
    store.make("users", 16, model=User)
    await store.start()
    if kind == "table":
        store.table("users").set("k", {"age": -5})  # the raw table: no model in the way
    else:  # another app, declaring the same columns without the model
        other = make_store(kind, prefix)
        other.make("users", 16, {"age": (Store.TYPE_INT, 2), "name": (Store.TYPE_STRING, 12)})
        await other.set("users", "k", {"age": -5})
    with pytest.raises(BackendResponseError, match="User"):
        await store.get_model("users", "k")


# -- item 10: Redis down at boot -----------------------------------------------------------------


async def test_redis_down_at_boot_behind_the_breaker_starts_degraded(
    make_store: MakeStore,
) -> None:
    """Item 10: with ``on_error="fallback_table"`` the store starts without Redis, reads come
    from the fallback and the health check reports the outage."""
    conn = {"url": "redis://127.0.0.1:1/0", "prefix": _unique("down"), **FAST}
    conn.update(on_error="fallback_table", breaker={"name": _unique("cb")})
    store = Store("redis", conn)
    store.make("t", 16, {"v": (Store.TYPE_INT, 8)})
    try:
        await store.start()
        assert await store.get("t", "k") is False  # the fallback's answer
        with pytest.raises(BackendUnavailableError):
            await store.set("t", "k", {"v": 1})
        report = await health.collect(store)
        assert report.status == "unavailable" and report.breaker is not None
    finally:
        await store.aclose()
        store.backend.close_shared()


@pytest.mark.parametrize(
    ("kind", "conn", "variable"),
    [
        ("redis", {"url": "redis://127.0.0.1:1/0", **FAST}, "ZEAL_REDIS_URL"),
        ("tiered", {"url": "redis://127.0.0.1:1/0", **FAST}, "ZEAL_REDIS_URL"),
        ("memcached", {"servers": "127.0.0.1:1", "timeout": 0.5}, "ZEAL_MEMCACHED_SERVERS"),
    ],
)
async def test_backend_down_at_boot_without_the_breaker_names_the_setting(
    kind: str, conn: dict[str, Any], variable: str
) -> None:
    """Item 10: without the breaker the boot check is fatal; its error names the setting."""
    store = Store(kind, {**conn, "prefix": _unique("down")})
    try:
        with pytest.raises(BackendUnavailableError, match=variable):
            await store.start()
    finally:
        await store.aclose()
        store.backend.close_shared()
