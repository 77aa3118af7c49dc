"""Fixtures of the memcached tests: backends on real servers, a raw client, a fault proxy."""

from __future__ import annotations

import socket
import uuid
from collections.abc import AsyncIterator, Iterator

import pytest

from tests._harness.proxy import Proxy
from tests._harness.servers import HOST, Memcached, require_binary
from zeal_asgi.store import Store
from zeal_asgi.store.backends.memcached import MemcachedBackend
from zeal_asgi.store.backends.table import TableBackend


def raw_command(port: int, command: bytes, *, end: tuple[bytes, ...] = (b"END\r\n",)) -> bytes:
    """Send one text-protocol command to memcached on its own socket; the whole reply."""
    reply = b""
    with socket.create_connection((HOST, port), timeout=2.0) as sock:
        sock.sendall(command)
        while not reply.endswith(end):
            chunk = sock.recv(65536)
            if not chunk:
                break
            reply += chunk
    return reply


def raw_get(port: int, key: bytes) -> bytes | None:
    """The value stored at ``key``, read without zeal_asgi or aiomcache."""
    reply = raw_command(port, b"get " + key + b"\r\n")
    if reply == b"END\r\n":
        return None
    header, _, rest = reply.partition(b"\r\n")
    size = int(header.split()[3])
    return rest[:size]


def raw_set(port: int, key: bytes, value: bytes) -> None:
    """Store ``value`` at ``key`` behind zeal_asgi's back."""
    cmd = b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value)
    assert raw_command(port, cmd, end=(b"STORED\r\n",)) == b"STORED\r\n"


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test only, so tests sharing the session server never meet."""
    return f"t{uuid.uuid4().hex[:12]}"


@pytest.fixture
async def backend(memcached_server: Memcached, prefix: str) -> AsyncIterator[MemcachedBackend]:
    """A memcached backend on the session server, closed after the test."""
    b = MemcachedBackend(memcached_server.url, prefix=prefix, timeout=2.0)
    yield b
    await b.aclose()


@pytest.fixture
def store(backend: MemcachedBackend) -> Store:
    """A Store served by ``backend``."""
    return Store(backend=backend)


@pytest.fixture
def table_backend() -> Iterator[TableBackend]:
    """The shared-memory reference backend, for comparisons; segments unlinked afterwards."""
    tb = TableBackend(namespace=f"mcref-{uuid.uuid4().hex[:10]}")
    yield tb
    tb.close_all()


@pytest.fixture(scope="module")
def two_memcached() -> Iterator[tuple[Memcached, Memcached]]:
    """Two memcached servers, for sharding."""
    require_binary("memcached")
    with Memcached() as a, Memcached() as b:
        yield a, b


@pytest.fixture
async def hangup_proxy(memcached_server: Memcached) -> AsyncIterator[Proxy]:
    """A :class:`~tests._harness.proxy.Proxy` in front of the session memcached."""
    proxy = await Proxy(memcached_server.port).start()
    yield proxy
    await proxy.aclose()
