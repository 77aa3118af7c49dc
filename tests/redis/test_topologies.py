"""Redis Cluster and TLS against real servers (the Sentinel failover is in test_failover)."""

from __future__ import annotations

import logging
import socket

import pytest
from redis.crc import key_slot
from redis.exceptions import MovedError

from tests._harness.servers import RedisCluster, RedisServer, free_port
from zeal_asgi import Counter
from zeal_asgi.errors import BackendTLSError, BackendUnavailableError
from zeal_asgi.store import Store
from zeal_asgi.store.backends.redis import RedisBackend

from .conftest import COLUMNS, unique_prefix


def _owner(cluster: RedisCluster, key: str) -> RedisServer:
    """The master that serves ``key`` (the others answer MOVED)."""
    for server in cluster.servers:
        try:
            server.command("EXISTS", key)
        except MovedError:
            continue
        return server
    raise AssertionError(f"no master serves {key!r}")


async def test_cluster_all_operations(redis_cluster: RedisCluster) -> None:
    store = Store("redis", redis_cluster.routing_conn(prefix=unique_prefix()))
    backend = store.backend
    assert isinstance(backend, RedisBackend)
    p = backend.prefix
    for name in ("users", "orders", "carts"):
        store.make(name, 100, COLUMNS)
    store.make("sessions", 100, {"n": (Store.TYPE_INT, 8)}, mode="ttl", ttl=60)
    try:
        await store.start()
        # rows of one table, and its membership set, live in the slot of the hash tag
        for name in ("users", "orders", "carts"):
            await store.mset(name, {f"k{i}": {"i4": i} for i in range(50)})
            await store.set(name, "solo", {"name": "s"})
            slot = key_slot(name.encode())
            owner = _owner(redis_cluster, f"{p}:{{{name}}}:k7")
            assert owner.command("CLUSTER", "KEYSLOT", f"{p}:{{{name}}}:k7") == slot
            # 51 rows, the membership set and the declaration
            assert owner.command("CLUSTER", "COUNTKEYSINSLOT", slot) == 53
            assert owner.command("SCARD", f"{p}:{{{name}}}:__keys__") == 51
            assert owner.command("HGET", f"{p}:{{{name}}}:k7", "i4") == b"7"
        owners = {
            _owner(redis_cluster, f"{p}:{{{n}}}:x").port for n in ("users", "orders", "carts")
        }
        assert len(owners) >= 2  # the tables really are spread over the shards
        assert await store.get_strict("users", "k7", "i4") == 7
        assert await store.incr("users", "k7", "i4", 3) == 10
        assert await store.compare_and_set("users", "k7", "i4", 10, 11)
        assert await store.count("users") == 51
        got = await store.mget("orders", ["k1", "nope", "k2"])
        assert [r and r["i4"] for r in got] == [1, None, 2]
        assert len([k async for k, _ in store.iterate("carts")]) == 51
        assert await store.delete("carts", "solo") and await store.count("carts") == 50
        assert await store.clear("carts") == 50 and await store.count("carts") == 0
        # ttl tables: SCAN runs on the node that owns the table's slot
        await store.mset("sessions", {f"s{i}": {"n": i} for i in range(30)})
        assert await store.count("sessions") == 30
        assert len([k async for k, _ in store.iterate("sessions")]) == 30
        assert await store.clear("sessions") == 30
        # counters hash to their own slots; eval keys are prefixed; messaging works
        for name in ("a", "b", "c", "d"):
            c = Counter(1, name=name, store=store)
            assert await c.increment() == 2
        assert await store.eval("return redis.call('INCR', KEYS[1])", ["x"]) == 1
        assert await store.publish("news", "hi") == 0
        entry = await store.publish_reliable("jobs", "payload", max_len=100)
        reader = await backend.dedicated_client(for_key=backend.stream_key("jobs"))
        try:
            streams = await reader.xrange(backend.stream_key("jobs"))
            assert [e[0].decode() for e in streams] == [entry]
        finally:
            await reader.aclose()
        assert store.stats()["redis"]["errors"] == 0
    finally:
        await store.aclose()


async def test_cluster_unreachable_is_unavailable() -> None:
    backend = RedisBackend.from_config({"cluster": [f"127.0.0.1:{free_port()}"]})
    try:
        with pytest.raises(BackendUnavailableError) as info:
            await backend.start()
        assert "boot check failed" in str(info.value)
    finally:
        await backend.aclose()


# -- TLS -------------------------------------------------------------------------------------


async def test_tls_with_the_ca(
    redis_tls_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    conn = {"url": redis_tls_server.url, "ssl_ca_certs": str(redis_tls_server.ca_path)}
    backend = RedisBackend.from_config({**conn, "prefix": unique_prefix()})
    caplog.set_level(logging.WARNING, logger="zeal_asgi.redis")
    try:
        await backend.start()
        assert await backend.ping()
        client = await backend.client()
        kwargs = client.connection_pool.connection_kwargs
        # the effective settings, not just our intent
        assert kwargs["ssl_cert_reqs"] == "required" and kwargs["ssl_check_hostname"] is True
        assert kwargs["ssl_ca_certs"] == str(redis_tls_server.ca_path)
        assert not caplog.records
    finally:
        await backend.aclose()


async def test_tls_without_the_ca_is_refused(redis_tls_server: RedisServer) -> None:
    backend = RedisBackend.from_config({"url": redis_tls_server.url, "prefix": unique_prefix()})
    try:
        with pytest.raises(BackendTLSError) as info:
            await backend.start()
        assert "boot check failed" in str(info.value)
        assert "certificate verify failed" in str(info.value)
        assert isinstance(info.value, BackendUnavailableError)
    finally:
        await backend.aclose()


async def test_tls_checks_the_host_name(redis_tls_server: RedisServer) -> None:
    # "127.1" reaches 127.0.0.1 but is not a name the certificate was issued for
    # (localhost, IP 127.0.0.1): the certificate chains to the CA, the name does not match.
    assert socket.gethostbyname("127.1") == "127.0.0.1"
    url = f"rediss://127.1:{redis_tls_server.port}"
    ca = str(redis_tls_server.ca_path)
    backend = RedisBackend.from_config({"url": url, "ssl_ca_certs": ca, "prefix": unique_prefix()})
    try:
        with pytest.raises(BackendTLSError) as info:
            await backend.start()
        assert "hostname" in str(info.value).lower() or "match" in str(info.value).lower()
    finally:
        await backend.aclose()


async def test_tls_weakened_verification_warns_every_start(
    redis_tls_server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="zeal_asgi.redis")
    conn = {"url": redis_tls_server.url, "ssl_cert_reqs": "none", "prefix": unique_prefix()}
    backend = RedisBackend.from_config(conn)
    try:
        await backend.start()
        assert await backend.ping()
    finally:
        await backend.aclose()
    try:
        await backend.start()
    finally:
        await backend.aclose()
    warnings = [r for r in caplog.records if "does NOT verify" in r.getMessage()]
    assert len(warnings) == 2
