"""Memcached connections of one worker: server list, safe keys, sharding, timeouts, errors.

One aiomcache client per server (aiomcache speaks to a single server), opened lazily in the
running event loop and rebuilt when the loop or the process changes.  Keys are spread over the
servers by rendezvous hashing, so removing a server only moves the keys it held.  Every call has
an explicit timeout (pool wait + connect + command) and aiomcache/socket exceptions are
translated into the :mod:`zeal_asgi.errors` hierarchy here; nothing above sees aiomcache types.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import ipaddress
import os
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TypeVar

import aiomcache
from aiomcache.exceptions import ClientException
from aiomcache.pool import Connection, MemcachePool

from zeal_asgi.errors import (
    BackendResponseError,
    BackendTimeoutError,
    BackendUnavailableError,
    CapacityError,
    ConfigError,
)
from zeal_asgi.store.base import count

DEFAULT_SERVERS = "127.0.0.1:11211"
DEFAULT_PORT = 11211
MAX_KEY_BYTES = 250
"""Memcached's key limit; longer or unsafe keys are hashed."""

T = TypeVar("T")

_LABEL = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?$")
_PREFIX = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
# Printable ASCII without space: nothing a text-protocol parser could split on or end a line at.
_SAFE_KEY = re.compile(rb"^[\x21-\x7e]{1,250}\Z")
_RESERVED_TABLES = frozenset({"h", "counter", "schema"})
"""Table names whose literal keys would share a namespace with hashed keys, counters or schemas."""


@dataclass(frozen=True)
class ServerAddr:
    """One memcached server."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


def _parse_server(item: str) -> ServerAddr:
    text = item.strip()
    if not text:
        raise ConfigError("memcached server list has an empty entry (check the commas)")
    bad = f"memcached server {item!r}:"
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket:
            raise ConfigError(f"{bad} unbalanced '[' in the IPv6 address")
        if port_text and not port_text.startswith(":"):
            raise ConfigError(f"{bad} expected [ipv6]:port")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ConfigError(f"{bad} bad IPv6 address") from None
    elif text.count(":") > 1:
        raise ConfigError(f"{bad} write IPv6 addresses as [addr]:port")
    else:
        host, colon, port_text = text.partition(":")
        port_text = colon + port_text  # like the IPv6 form: "" or ":<port>"
        if not host:
            raise ConfigError(f"{bad} the host is empty")
        if len(host) > 253 or not all(_LABEL.match(x) for x in host.rstrip(".").split(".")):
            raise ConfigError(
                f"{bad} {host!r} is not a valid host name or IPv4 address (write IPv6 addresses "
                "as [addr]:port)"
            )
    digits = port_text[1:] if port_text else str(DEFAULT_PORT)
    if not digits.isascii() or not digits.isdigit():
        raise ConfigError(f"{bad} port {digits!r} is not a number")
    if not 1 <= int(digits) <= 65535:
        raise ConfigError(f"{bad} port {int(digits)} is outside 1..65535")
    return ServerAddr(host, int(digits))


def parse_servers(spec: str | Sequence[str]) -> tuple[ServerAddr, ...]:
    """Parse ``host:port[,host:port...]`` (port defaults to 11211) or a ``memcached://`` URL.

    Validation only, no I/O.

    Raises:
        ConfigError: an empty list, a bad host or port, credentials/paths in a URL, duplicates.
    """
    if isinstance(spec, str):
        text = spec.strip()
        if text.lower().startswith("memcached://"):
            text = text[len("memcached://") :].rstrip("/")
            for bad, why in (("@", "credentials"), ("/", "a path"), ("?", "options"), ("#", "")):
                if bad in text:
                    raise ConfigError(
                        f"memcached URL {spec!r}: {why or 'a fragment'} not supported (the text "
                        "protocol has no authentication or database)"
                    )
        elif "://" in text:
            raise ConfigError(f"memcached servers {spec!r}: only memcached:// URLs are understood")
        items: Sequence[str] = text.split(",")
    elif isinstance(spec, Sequence) and all(isinstance(s, str) for s in spec):
        items = spec
    else:
        raise ConfigError(f"memcached servers must be a str or a list of str, got {spec!r}")
    servers = tuple(_parse_server(item) for item in items)
    if not servers:
        raise ConfigError("memcached server list is empty")
    for i, s in enumerate(servers):
        if s in servers[:i]:
            raise ConfigError(f"memcached server {s} is listed twice")
    return servers


class KeyMapper:
    """Memcached keys of rows and counters, safe for the text protocol.

    Rows are ``{prefix}:{table}:{key}``, counters ``{prefix}:counter:{name}``, table declarations
    ``{prefix}:schema:{table}``.  A key longer than
    250 bytes or holding anything but printable ASCII (whitespace, CR/LF, control or non-ASCII
    bytes) becomes ``{prefix}:h:`` + a BLAKE2b-256 hex digest of the full key, so no caller can
    inject protocol commands.  Each kind hashes with its own personalisation, and the
    tables called ``h``, ``counter`` and ``schema`` are always hashed: no literal key can equal
    another's.
    """

    def __init__(self, prefix: str) -> None:
        if not isinstance(prefix, str) or not _PREFIX.match(prefix):
            raise ConfigError(
                f"memcached prefix must be 1-64 characters of A-Z a-z 0-9 _ . -, got {prefix!r}"
            )
        self.prefix = prefix
        self._p = prefix.encode()

    def _safe(self, full: bytes, kind: bytes, always_hash: bool = False) -> bytes:
        """``full``, or ``{prefix}:h:<digest>`` (personalised by ``kind``) when it is unsafe."""
        if always_hash or not _SAFE_KEY.match(full):
            digest = hashlib.blake2b(full, digest_size=32, person=b"zeal-mc-" + kind)
            return b"%s:h:%s" % (self._p, digest.hexdigest().encode())
        return full

    def row(self, table: str, key: bytes) -> bytes:
        """The key of row ``key`` (already validated bytes) of ``table``."""
        full = b"%s:%s:%s" % (self._p, table.encode("utf-8", "surrogatepass"), key)
        return self._safe(full, b"row", table in _RESERVED_TABLES)

    def counter(self, name: str) -> bytes:
        """The key of counter ``name``."""
        full = b"%s:counter:%s" % (self._p, name.encode("utf-8", "surrogatepass"))
        return self._safe(full, b"counter")

    def schema(self, table: str) -> bytes:
        """The key holding the declaration of ``table`` (see ``MemcachedBackend``)."""
        full = b"%s:schema:%s" % (self._p, table.encode("utf-8", "surrogatepass"))
        return self._safe(full, b"schema")


class _Pool(MemcachePool):
    def release(self, conn: Connection) -> None:
        task = asyncio.current_task()
        if task is not None and task.cancelling():
            # Cancelled (e.g. by our timeout) in the middle of a command: its reply may still
            # arrive and would be read as the answer to the next command on this connection.
            # aiomcache only discards a connection on Exception, and CancelledError is not one.
            conn.reader.set_exception(ConnectionAbortedError("command cancelled midway"))
        super().release(conn)

    def close_all(self) -> list[asyncio.StreamWriter]:
        """Close every connection, idle or in use (a command in flight then fails)."""
        conns = list(self._in_use)
        while not self._pool.empty():
            conns.append(self._pool.get_nowait())
        for conn in conns:
            with contextlib.suppress(RuntimeError):  # its event loop is already closed
                self._do_close(conn)
        return [conn.writer for conn in conns]


class _Client(aiomcache.Client):
    """aiomcache 0.8's client with its failure handling fixed.

    A hang-up mid-reply no longer spins the loop forever, ``incr`` of a missing key returns
    ``None`` instead of raising, and (see ``_Pool``) a command cancelled midway no longer leaves
    its connection in the pool out of sync.
    """

    def __init__(self, host: str, port: int, *, pool_size: int) -> None:
        super().__init__(host, port, pool_size=pool_size, pool_minsize=1)
        self.connections = self._pool = _Pool(host, port, minsize=1, maxsize=pool_size)

    async def _execute_simple_command(self, conn: Connection, raw_command: bytes) -> bytes:
        # aiomcache loops on readline() until a line ends with CRLF; at EOF readline() returns b""
        # at once without yielding, so a server that hangs up mid-reply spins the event loop
        # forever and no timeout can fire.  readuntil() raises IncompleteReadError instead.
        conn.writer.write(raw_command)
        await conn.writer.drain()
        line = await conn.reader.readuntil(b"\r\n")
        return line[:-2]

    async def _incr_decr(
        self, conn: Connection, command: bytes, key: bytes, delta: int
    ) -> int | None:
        # aiomcache raises on NOT_FOUND although it documents None; a miss is routine for us.
        resp = await self._execute_simple_command(conn, b"%s %s %d\r\n" % (command, key, delta))
        if resp == b"NOT_FOUND":
            return None
        if resp.isdigit():
            return int(resp)
        if b"non-numeric" in resp:  # a CLIENT_ERROR answer: ServerPool.run reports it as such
            why = "is not a number written by zeal_asgi (another program, or a changed schema?)"
            raise ClientException(f"the stored value {why}", resp)
        raise ClientException(f"memcached {command.decode()} failed", resp)


Op = Callable[["_Client"], Awaitable[T]]


def put_op(key: bytes, value: bytes, token: int | None, exptime: int) -> Op[bool]:
    """The write of a read-modify-write as an operation for :meth:`ServerPool.run` (binding its
    arguments now): ``cas`` with the ``gets`` token, or ``add`` when nothing was there (token
    ``None``).  Either is refused when another write got in first."""
    if token is None:
        return lambda c: c.add(key, value, exptime)
    return lambda c: c.cas(key, value, token, exptime)


class ServerPool:
    """The clients of one worker, one per server, with sharding, timeouts and error translation."""

    def __init__(self, servers: Sequence[ServerAddr], *, timeout: float, pool_size: int) -> None:
        self.servers = tuple(servers)
        self.timeout = timeout
        self.pool_size = pool_size
        self._seeds = [hashlib.blake2b(str(s).encode(), digest_size=32).digest() for s in servers]
        self._clients: dict[int, _Client] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid = os.getpid()
        self._inherited: list[_Client] = []

    def index(self, key: bytes) -> int:
        """The server holding ``key`` (rendezvous hashing: highest keyed digest wins)."""
        if len(self._seeds) == 1:
            return 0
        scores = [hashlib.blake2b(key, digest_size=8, key=seed).digest() for seed in self._seeds]
        return scores.index(max(scores))

    def _client(self, i: int) -> _Client:
        loop = asyncio.get_running_loop()
        if self._pid != os.getpid():
            # Forked: the sockets belong to the parent's event loop; touching them here could
            # unregister them from the parent's epoll.  Keep them referenced and start afresh.
            self._inherited.extend(self._clients.values())
            self._clients = {}
            self._pid = os.getpid()
        elif loop is not self._loop:
            for c in self._clients.values():
                c.connections.close_all()
            self._clients = {}
        self._loop = loop
        client = self._clients.get(i)
        if client is None:
            s = self.servers[i]
            client = self._clients[i] = _Client(s.host, s.port, pool_size=self.pool_size)
        return client

    async def run(self, i: int, what: str, fn: Callable[[_Client], Awaitable[T]]) -> T:
        """Run ``fn(client)`` on server ``i`` within the timeout, translating failures.

        Raises:
            BackendTimeoutError: no answer within ``timeout`` (pool wait, connect and command).
            BackendUnavailableError: connection refused/reset/closed or a reply we can't parse.
            BackendResponseError: the server answered with an error.
            CapacityError: the server refused a value for its size.
        """
        client = self._client(i)
        count("memcached", "ops")
        server = self.servers[i]
        try:
            async with asyncio.timeout(self.timeout):
                return await fn(client)
        except TimeoutError as exc:
            count("memcached", "timeouts")
            raise BackendTimeoutError(
                f"memcached {server}: {what} got no answer within {self.timeout} s"
            ) from exc
        except ClientException as exc:
            text = str(exc)
            if "too large" in text or "out of memory" in text:
                count("memcached", "too_large")
                raise CapacityError(
                    f"memcached {server} refused {what}: {text} (a row must fit memcached's item "
                    "size, 1 MiB unless the server runs with -I)"
                ) from exc
            count("memcached", "errors")
            if "ERROR" in text:  # ERROR / CLIENT_ERROR / SERVER_ERROR: it answered, and refused
                raise BackendResponseError(f"memcached {server}: {what} failed: {text}") from exc
            raise BackendUnavailableError(f"memcached {server}: {what} failed: {text}") from exc
        except (OSError, EOFError, asyncio.LimitOverrunError, ValueError, IndexError) as exc:
            count("memcached", "errors")
            raise BackendUnavailableError(
                f"memcached {server}: {what} failed: {type(exc).__name__}: {exc}"
            ) from exc

    async def aclose(self) -> None:
        """Close this worker's connections (call it in the loop that used them)."""
        writers = [w for c in self._clients.values() for w in c.connections.close_all()]
        self._clients = {}
        if self._loop is asyncio.get_running_loop():
            # Closed transports release their sockets in a callback of the next loop iteration.
            await asyncio.gather(*(w.wait_closed() for w in writers), return_exceptions=True)
        self._loop = None
