"""Connection options: validated at once, without I/O, with typed errors naming the option."""

from __future__ import annotations

from typing import Any

import pytest

from zeal_asgi._redis.config import RedisConfig
from zeal_asgi.errors import ConfigError
from zeal_asgi.store import Capability, Store, StoreBackend, build_backend
from zeal_asgi.store.backends.redis import RedisBackend


def test_url_fields_and_defaults() -> None:
    cfg = RedisConfig.parse("redis://user:p%40ss@cache.example:6380/3")
    assert (cfg.mode, cfg.host, cfg.port, cfg.db) == ("standalone", "cache.example", 6380, 3)
    assert (cfg.username, cfg.password, cfg.tls) == ("user", "p@ss", False)
    # every knob explicit, with the documented defaults
    assert (cfg.pool_size, cfg.prefix, cfg.retries) == (64, "zeal", 2)
    assert cfg.auto_pipeline is True
    assert (cfg.socket_timeout, cfg.connect_timeout, cfg.acquire_timeout) == (1.0, 1.0, 0.5)
    assert cfg.deadline == pytest.approx(1.5)
    assert "p@ss" not in cfg.describe() and "***" in cfg.describe()
    assert "p@ss" not in repr(cfg)


def test_rediss_verifies_by_default() -> None:
    cfg = RedisConfig.parse("rediss://localhost:6390")
    assert cfg.tls and cfg.ssl_cert_reqs == "required" and cfg.ssl_check_hostname
    assert not cfg.verification_weakened
    weak = RedisConfig.parse({"url": "rediss://h", "ssl_cert_reqs": "none"})
    assert weak.verification_weakened
    assert RedisConfig.parse("rediss://h?ssl_check_hostname=false").verification_weakened


@pytest.mark.parametrize(
    ("conn", "needle"),
    [
        ("redis://", "no host"),
        ("redis:///0", "no host"),
        ("rediss://:pw@/1", "no host"),
        ("http://h:6379", "unsupported URL scheme"),
        ("redis://h:99999", "invalid URL"),
        ("redis://h/abc", "db number"),
        ("redis://h?bogus=1", "unknown URL option 'bogus'"),
        ("redis://h?socket_timeout=soon", "socket_timeout: Input should be a valid number"),
        ("redis://h?socket_timeout=0", "socket_timeout: Input should be greater than 0"),
        ("redis://h?ssl_ca_certs=/ca.pem", "need TLS"),
        ({"url": "redis://h", "pool_sise": 8}, "unknown options ['pool_sise']"),
        (
            {"url": "redis://h", "pool_size": 0},
            "pool_size: Input should be greater than or equal to 1",
        ),
        ({"url": "redis://h", "pool_size": True}, "pool_size: Input should be a valid integer"),
        ({"url": "redis://h", "pool_size": "8"}, "pool_size: Input should be a valid integer"),
        (
            {"url": "redis://h", "acquire_timeout": float("nan")},
            "acquire_timeout: Input should be a finite number",
        ),
        ({"url": "redis://h", "prefix": "a{b}"}, "prefix: String should match"),
        ({"url": "redis://h", "prefix": ""}, "prefix: String should match"),
        ({"url": "redis://h/1", "db": 2}, "given in the URL and as an option"),
        ({"url": "redis://h", "cluster": ["a:1"]}, "give one of url/cluster/sentinel/client"),
        ({"cluster": []}, "non-empty list"),
        ({"cluster": ["host-without-port"]}, "needs host:port"),
        ({"cluster": ["h:0"]}, "port must be 1-65535"),
        ({"sentinel": ["h:26379"]}, "needs 'service'"),
        ({"url": "redis://h", "service": "m"}, "only goes with 'sentinel'"),
        ({"client": object()}, "'client' must be a redis.asyncio.Redis"),
        ({"url": "rediss://h", "ssl_cert_reqs": "maybe"}, "ssl_cert_reqs: Input should be"),
        ({"url": "rediss://h", "ssl_certfile": "/c.pem"}, "go together"),
        ({"url": "redis://h", "tls": True}, "URL scheme (rediss://)"),
        (42, "URL string or an options dict"),
    ],
)
def test_bad_config_is_a_config_error(conn: Any, needle: str) -> None:
    with pytest.raises(ConfigError) as info:
        RedisConfig.parse(conn)
    assert needle in str(info.value)


def test_password_never_in_errors() -> None:
    with pytest.raises(ConfigError) as info:
        RedisConfig.parse("redis://:hunter2@/0")
    assert "hunter2" not in str(info.value)


def test_env_and_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ZEAL_REDIS_URL", raising=False)
    assert RedisConfig.parse(None).describe() == "redis://127.0.0.1:6379/0"
    monkeypatch.setenv("ZEAL_REDIS_URL", "redis://envhost:7000/2")
    assert RedisConfig.parse(None).describe() == "redis://envhost:7000/2"
    assert RedisConfig.parse({"pool_size": 4}).host == "envhost"
    monkeypatch.setenv("ZEAL_REDIS_URL", "redis://")
    with pytest.raises(ConfigError):
        RedisConfig.parse(None)


def test_cluster_sentinel_unix_and_query_options() -> None:
    cl = RedisConfig.parse({"cluster": "127.0.0.1:7000, [::1]:7001", "pool_size": 3})
    assert cl.mode == "cluster" and cl.nodes == (("127.0.0.1", 7000), ("::1", 7001))
    assert cl.describe() == "redis cluster 127.0.0.1:7000,[::1]:7001"
    se = RedisConfig.parse({"sentinel": [("h", 26379)], "service": "mymaster", "password": "x"})
    assert se.mode == "sentinel" and se.service == "mymaster" and se.password == "x"
    ux = RedisConfig.parse("unix:///run/redis.sock?db=4&pool_size=2&retries=0")
    assert (ux.unix_path, ux.db, ux.pool_size, ux.retries) == ("/run/redis.sock", 4, 2, 0)
    assert RedisConfig.parse("valkeys://h").tls
    assert RedisConfig.parse("redis://h?auto_pipeline=false").auto_pipeline is False
    assert RedisConfig.parse({"url": "redis://h", "auto_pipeline": False}).auto_pipeline is False


def test_facade_validates_at_once_without_io() -> None:
    # Nothing listens on port 1: building must not try to connect.
    backend = build_backend("redis", {"url": "redis://127.0.0.1:1/0", "on_error": None})
    assert isinstance(backend, RedisBackend)
    with pytest.raises(ConfigError, match="no host"):
        Store("redis", "redis://")
    store = Store("redis", {"url": "redis://127.0.0.1:1", "prefix": "app1"})
    assert store.make("users", 10, {"n": (Store.TYPE_INT, 4)}) is None
    with pytest.raises(ConfigError, match="braces"):
        store.make("a{b}", 10)


def test_extra_keys_of_a_wrapping_backend() -> None:
    conn = {"url": "redis://h", "l1_ttl": 5, "invalidation_secret": "s"}
    with pytest.raises(ConfigError, match="unknown options"):
        RedisBackend.from_config(conn)
    backend = RedisBackend.from_config(conn, extra_keys=("l1_ttl", "invalidation_secret"))
    assert backend.config.host == "h"


def test_names_for_colleagues() -> None:
    b = RedisBackend.from_config({"url": "redis://h", "prefix": "app"})
    assert b.channel_name("news") == "app:ch:news"
    assert b.stream_key("jobs") == "app:stream:jobs"
    assert b.key("ws", "room", "1") == "app:ws:room:1"
    assert b.key("x", b"\x00") == b"app:x:\x00"
    assert b.row_key("users", "alice") == b"app:{users}:alice"
    assert b.row_key("users", "__keys__") == b"app:{users}:___keys__"
    assert b.layout.members("users") == b"app:{users}:__keys__"
    assert b.layout.scan_pattern("a*b") == rb"app:{a\*b}:*"
    assert b.layout.counter("hits") == b"app:counter:hits"


def test_implements_the_backend_protocols() -> None:
    backend: StoreBackend = RedisBackend.from_config("redis://h")  # checked by mypy too
    assert isinstance(backend, StoreBackend)
    assert backend.capabilities == frozenset(Capability)
    assert isinstance(backend, RedisBackend) and backend.redis_link() is backend
