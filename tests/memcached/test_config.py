"""Configuration: server lists, URLs, options and environment, validated without any I/O."""

from __future__ import annotations

import socket

import pytest

from zeal_asgi.errors import ConfigError
from zeal_asgi.store import Store, StoreBackendKind, build_backend
from zeal_asgi.store.backends.memcached import MemcachedBackend
from zeal_asgi.store.backends.memcached.conn import ServerAddr, parse_servers


def test_seed_server_list_with_default_port() -> None:
    assert parse_servers("10.0.0.1:11212, cache-2.internal ,[::1]:11213") == (
        ServerAddr("10.0.0.1", 11212),
        ServerAddr("cache-2.internal", 11211),
        ServerAddr("::1", 11213),
    )


def test_memcached_url_and_list_forms() -> None:
    assert parse_servers("memcached://h1:1,h2:2/") == (ServerAddr("h1", 1), ServerAddr("h2", 2))
    assert parse_servers(["h1:1", "h2"]) == (ServerAddr("h1", 1), ServerAddr("h2", 11211))
    assert str(ServerAddr("::1", 5)) == "[::1]:5"


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("", "empty"),
        ("h1,,h2", "empty entry"),
        ("host:0", "outside 1..65535"),
        ("host:65536", "outside 1..65535"),
        ("host:http", "not a number"),
        ("::1:11211", "[addr]:port"),
        ("[::1", "unbalanced"),
        ("[zz::1]:1", "bad IPv6"),
        ("bad host:1", "not a valid host"),
        ("-bad-:1", "not a valid host"),
        ("h\r\nflush_all:1", "not a valid host"),
        ("memcached://user:pw@h:1", "credentials"),
        ("memcached://h:1/0", "a path"),
        ("memcached://h:1?x=1", "options"),
        ("redis://h:1", "only memcached://"),
        ("h:1,h:1", "listed twice"),
    ],
)
def test_bad_server_lists_are_config_errors(spec: str, fragment: str) -> None:
    with pytest.raises(ConfigError, match=None) as info:
        parse_servers(spec)
    assert fragment in str(info.value)


def test_bad_types_and_options() -> None:
    with pytest.raises(ConfigError, match="str or a list"):
        parse_servers(42)  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="unknown options"):
        MemcachedBackend.from_config({"servers": "h:1", "url": "x"})
    with pytest.raises(ConfigError, match="prefix"):
        MemcachedBackend.from_config({"servers": "h:1", "prefix": "a b"})
    with pytest.raises(ConfigError, match="prefix"):
        MemcachedBackend.from_config({"servers": "h:1", "prefix": "a:b"})
    with pytest.raises(ConfigError, match="timeout"):
        MemcachedBackend.from_config({"servers": "h:1", "timeout": 0})
    with pytest.raises(ConfigError, match="cas_timeout"):
        MemcachedBackend.from_config({"servers": "h:1", "cas_timeout": float("nan")})
    with pytest.raises(ConfigError, match="pool_size"):
        MemcachedBackend.from_config({"servers": "h:1", "pool_size": 0})
    with pytest.raises(ConfigError, match="pool_size"):
        MemcachedBackend.from_config({"servers": "h:1", "pool_size": True})


def _unused_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def test_building_does_no_io() -> None:
    # Nothing listens there: building and declaring still succeed, connections open lazily.
    port = _unused_port()
    store = Store(StoreBackendKind.MEMCACHED, f"127.0.0.1:{port}")
    assert store.kind is StoreBackendKind.MEMCACHED
    assert store.make("t", 10, {"n": (Store.TYPE_INT,)}) is None
    assert store.backend.stats()["memcached"]["servers"] == [f"127.0.0.1:{port}"]


def test_default_backend_setter_validates_at_once() -> None:
    store = Store(backend=MemcachedBackend("127.0.0.1:1"))
    assert store.default_backend() is StoreBackendKind.MEMCACHED
    with pytest.raises(ConfigError):
        store.default_backend("memcached", "nohost:99999")
    assert store.default_backend("memcached", {"servers": "a:1,b:2", "prefix": "app"}) == (
        StoreBackendKind.MEMCACHED
    )
    backend = store.backend
    assert isinstance(backend, MemcachedBackend)
    assert [str(s) for s in backend.pool.servers] == ["a:1", "b:2"]
    assert backend.keys.prefix == "app"


def test_environment_and_seed_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZEAL_MEMCACHED_SERVERS", raising=False)
    monkeypatch.delenv("ZEAL_KEY_PREFIX", raising=False)
    default = MemcachedBackend.from_config(None)
    assert [str(s) for s in default.pool.servers] == ["127.0.0.1:11211"]
    assert default.keys.prefix == "zeal"
    with pytest.raises(ConfigError, match="empty"):  # an empty list is refused, never localhost
        MemcachedBackend.from_config("")

    monkeypatch.setenv("ZEAL_MEMCACHED_SERVERS", "m1:1,m2:2")
    monkeypatch.setenv("ZEAL_KEY_PREFIX", "envp")
    from_env = build_backend("memcached", None)
    assert isinstance(from_env, MemcachedBackend)
    assert [str(s) for s in from_env.pool.servers] == ["m1:1", "m2:2"]
    assert from_env.keys.prefix == "envp"
    assert [str(s) for s in MemcachedBackend.from_config({"servers": None}).pool.servers] == [
        "m1:1",
        "m2:2",
    ]

    monkeypatch.setenv("ZEAL_STORE_BACKEND", "memcached")
    assert Store().kind is StoreBackendKind.MEMCACHED

    monkeypatch.setenv("ZEAL_MEMCACHED_SERVERS", "m1:notaport")
    with pytest.raises(ConfigError, match="not a number"):
        MemcachedBackend.from_config(None)
