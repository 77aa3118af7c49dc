"""Redis clients per worker and event loop, the bounded pool, timeouts, retries and counters.

asyncio clients are bound to the loop that opened their sockets, and a forked worker must not
reuse its parent's sockets: :class:`RedisConnector` keeps one client per (process, loop), built
lazily on first use, so tests running several loops and gunicorn forks both get fresh ones.

Every call goes through :meth:`RedisConnector.run`: it takes one of ``pool_size`` slots (waiting
at most ``acquire_timeout``, then :class:`~zeal_asgi.errors.PoolTimeoutError`), runs the command
under an overall ``deadline``, retries idempotent commands on connection errors and timeouts with
full-jitter backoff inside that deadline (never INCR, HINCRBY, XADD, PUBLISH or a user script),
and translates redis-py exceptions into the ZealError hierarchy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import ssl
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as rx
from redis._parsers import _AsyncHiredisParser
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import Connection, SSLConnection, UnixDomainSocketConnection
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff
from redis.utils import HIREDIS_AVAILABLE

from .._hoststats import host_stats
from ..errors import BackendTimeoutError, ConfigError, PoolTimeoutError, ZealError
from ._redis_config import RedisConfig
from ._redis_errors import retriable, translate

__all__ = ["COUNTERS", "RedisConnector"]

log = logging.getLogger("zeal_asgi.redis")
T = TypeVar("T")

COUNTERS = ("acquires", "acquire_timeouts", "clients_created", "commands", "errors", "retries")
"""Per-worker counters of :meth:`RedisConnector.stats` (also summed over the host)."""

_BACKOFF_BASE = 0.01
_BACKOFF_CAP = 0.2
_DEDICATED_MAX = 4

if not HIREDIS_AVAILABLE:  # pragma: no cover - the redis extra installs it
    raise ConfigError("the redis backend needs hiredis: pip install 'zeal-asgi[redis]'")


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel master discovery with the bounded, waiting pool of the standalone client."""


# redis-py leaves these constructors unannotated; call them through Any under mypy --strict.
_new_sentinel: Any = Sentinel
_new_sentinel_pool: Any = SentinelConnectionPool
_new_blocking_sentinel_pool: Any = _BlockingSentinelPool


@dataclass
class _LoopState:
    loop: asyncio.AbstractEventLoop
    pid: int
    client: Any
    slots: asyncio.Semaphore
    owned: bool
    sentinel: Sentinel | None = None
    in_use: int = 0
    waiting: int = 0
    booted: bool = False


class RedisConnector:
    """Clients, slots, deadline, retries and counters of one Redis backend in this worker."""

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self.where = cfg.describe()
        self._states: dict[int, _LoopState] = {}
        self._local = dict.fromkeys(COUNTERS, 0)

    # -- counters ------------------------------------------------------------------------------

    def _count(self, name: str, by: int = 1) -> None:
        self._local[name] += by
        host_stats().incr(f"redis.{name}", by)

    def stats(self) -> dict[str, Any]:
        """Pool gauges and counters of this worker, and the counters summed over the host."""
        st = self._current()
        host = host_stats().host()
        return {
            "target": self.where,
            "pool_size": self.cfg.pool_size,
            "in_use": st.in_use if st else 0,
            "waiting": st.waiting if st else 0,
            **self._local,
            "host": {name: host.get(f"redis.{name}", 0) for name in COUNTERS},
        }

    # -- per-loop clients ----------------------------------------------------------------------

    def _current(self) -> _LoopState | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        st = self._states.get(id(loop))
        return st if st is not None and st.loop is loop and st.pid == os.getpid() else None

    def state(self) -> _LoopState:
        """The state of the running loop in this process (built on first use, no I/O)."""
        loop = asyncio.get_running_loop()
        st = self._states.get(id(loop))
        if st is not None and st.loop is loop and st.pid == os.getpid():
            return st
        self._forget_dead()
        st = self._build(loop)
        self._states[id(loop)] = st
        return st

    def _forget_dead(self) -> None:
        pid = os.getpid()
        for key, st in list(self._states.items()):
            if st.pid != pid or st.loop.is_closed():
                # A forked child must not close its parent's sockets, and a closed loop cannot
                # run the close: drop the references (aclose() on the right loop avoids this).
                del self._states[key]
                if st.pid == pid and st.owned:
                    log.warning(
                        "zeal_asgi: %s: a client was left open on a closed event loop; call "
                        "Store.aclose() (the lifespan does) before the loop ends",
                        self.where,
                    )

    async def _on_connect(self, conn: Any) -> None:
        self._count("clients_created")
        await conn.on_connect()

    def _conn_kwargs(self, socket_timeout: float | None) -> dict[str, Any]:
        cfg = self.cfg
        kw: dict[str, Any] = {
            "db": cfg.db,
            "username": cfg.username,
            "password": cfg.password,
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": cfg.connect_timeout,
            "health_check_interval": cfg.health_check_interval,
            # redis-py retries whatever failed, INCR included: retries are ours, per command.
            "retry": Retry(NoBackoff(), 0),
            "parser_class": _AsyncHiredisParser,
            "protocol": 2,
            "decode_responses": False,
            "client_name": None,
            "driver_info": None,
            "redis_connect_func": self._on_connect,
        }
        if cfg.unix_path is not None:
            kw.update(connection_class=UnixDomainSocketConnection, path=cfg.unix_path)
            return kw
        kw["socket_keepalive"] = True
        if cfg.tls:
            kw.update(self._tls_kwargs())
        return kw

    def _tls_kwargs(self) -> dict[str, Any]:
        cfg = self.cfg
        return {
            "ssl_ca_certs": cfg.ssl_ca_certs,
            "ssl_certfile": cfg.ssl_certfile,
            "ssl_keyfile": cfg.ssl_keyfile,
            "ssl_cert_reqs": cfg.ssl_cert_reqs,
            "ssl_check_hostname": cfg.ssl_check_hostname and cfg.ssl_cert_reqs != "none",
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }

    def _build(self, loop: asyncio.AbstractEventLoop) -> _LoopState:
        cfg = self.cfg
        slots = asyncio.Semaphore(cfg.pool_size)
        if cfg.mode == "client":
            return _LoopState(loop, os.getpid(), cfg.client, slots, owned=False)
        if cfg.mode == "cluster":
            return _LoopState(loop, os.getpid(), self._cluster(), slots, owned=True)
        kw = self._conn_kwargs(cfg.socket_timeout)
        common: dict[str, Any] = {"max_connections": cfg.pool_size, "timeout": cfg.acquire_timeout}
        if cfg.mode == "sentinel":
            sentinel = self._sentinel()
            kw.pop("db", None)
            pool: ConnectionPool = _new_blocking_sentinel_pool(
                cfg.service, sentinel, ssl=cfg.tls, db=cfg.db, **common, **kw
            )
            st = _LoopState(loop, os.getpid(), Redis.from_pool(pool), slots, owned=True)
            st.sentinel = sentinel
            return st
        kw.setdefault("connection_class", SSLConnection if cfg.tls else Connection)
        if cfg.unix_path is None:
            kw.update(host=cfg.host, port=cfg.port)
        # The slots above already cap this loop's calls at pool_size, so the pool itself never has
        # to block; a plain pool avoids BlockingConnectionPool's lock and timer on every command.
        # The other pool_size connections are for callers that use client() outside the slots
        # (Streams consumers and their reaper, system publishes): a hard bound of 2 x pool_size.
        pool = ConnectionPool(max_connections=2 * cfg.pool_size, **kw)
        return _LoopState(loop, os.getpid(), Redis.from_pool(pool), slots, owned=True)

    def _sentinel(self) -> Sentinel:
        cfg = self.cfg
        sentinel_kw: dict[str, Any] = {
            "socket_timeout": cfg.socket_timeout,
            "socket_connect_timeout": cfg.connect_timeout,
            "retry": Retry(NoBackoff(), 0),
            "protocol": 2,
            "driver_info": None,
            "password": cfg.sentinel_password,
        }
        if cfg.tls:
            sentinel_kw.update(ssl=True, **self._tls_kwargs())
        sentinel: Sentinel = _new_sentinel(
            list(cfg.nodes), min_other_sentinels=0, sentinel_kwargs=sentinel_kw
        )
        return sentinel

    def _cluster(self) -> RedisCluster:
        cfg = self.cfg
        tls: dict[str, Any] = {"ssl": True, **self._tls_kwargs()} if cfg.tls else {}
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in cfg.nodes],
            require_full_coverage=True,
            load_balancing_strategy=None,  # reads and writes go to the primaries
            dynamic_startup_nodes=True,
            max_connections=cfg.pool_size,
            retry=Retry(NoBackoff(), 0),
            username=cfg.username,
            password=cfg.password,
            socket_timeout=cfg.socket_timeout,
            socket_connect_timeout=cfg.connect_timeout,
            socket_keepalive=True,
            health_check_interval=cfg.health_check_interval,
            decode_responses=False,
            protocol=2,
            driver_info=None,
            **tls,
        )
        # The cluster client takes no parser/connect hook arguments; nodes copy these kwargs.
        extra = {"parser_class": _AsyncHiredisParser, "redis_connect_func": self._on_connect}
        client.nodes_manager.connection_kwargs.update(extra)
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_kwargs.update(extra)
        return client

    async def close(self) -> None:
        """Close the client of the running loop (and drop those of dead loops)."""
        self._forget_dead()
        st = self._current()
        if st is None:
            return
        del self._states[id(st.loop)]
        if not st.owned:
            return
        with contextlib.suppress(rx.RedisError, OSError):
            await st.client.aclose()
        if st.sentinel is not None:
            for s in st.sentinel.sentinels:
                with contextlib.suppress(rx.RedisError, OSError):
                    await s.aclose()

    # -- running commands ----------------------------------------------------------------------

    async def _acquire(self, st: _LoopState, what: str) -> None:
        if not st.slots.locked():
            await st.slots.acquire()
            return
        timeout = self.cfg.acquire_timeout
        st.waiting += 1
        try:
            async with asyncio.timeout(timeout):
                await st.slots.acquire()
        except TimeoutError:
            self._count("acquire_timeouts")
            raise PoolTimeoutError(
                f"{what} on {self.where}: all {self.cfg.pool_size} connections stayed busy for "
                f"{timeout * 1000:.0f} ms (acquire_timeout); raise pool_size or find the slow "
                "calls"
            ) from None
        finally:
            st.waiting -= 1

    async def run(self, op: Callable[[Any], Awaitable[T]], *, what: str, idempotent: bool) -> T:
        """Run ``op(client)`` within the slots, the deadline and the retry policy.

        Raises:
            PoolTimeoutError: no slot within ``acquire_timeout``.
            BackendTimeoutError: no answer within ``socket_timeout`` / ``deadline``.
            BackendUnavailableError (and its TLS/auth leaves), BackendResponseError.
        """
        st = self.state()
        loop = st.loop
        deadline = loop.time() + self.cfg.deadline
        await self._acquire(st, what)
        self._count("acquires")
        st.in_use += 1
        try:
            attempt = 0
            while True:
                self._count("commands")
                cm = asyncio.timeout_at(deadline)
                try:
                    async with cm:
                        return await op(st.client)
                except TimeoutError as exc:
                    err: ZealError = (
                        BackendTimeoutError(
                            f"{what} on {self.where}: no answer within the "
                            f"{self.cfg.deadline * 1000:.0f} ms deadline"
                        )
                        if cm.expired()
                        else translate(exc, f"{what} on {self.where}")
                    )
                    cause: BaseException = exc
                except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                    err, cause = translate(exc, f"{what} on {self.where}"), exc
                delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
                if (
                    not idempotent
                    or not retriable(err)
                    or attempt >= self.cfg.retries
                    or loop.time() + delay >= deadline
                ):
                    self._count("errors")
                    raise err from cause
                attempt += 1
                self._count("retries")
                await asyncio.sleep(delay)
        finally:
            st.in_use -= 1
            st.slots.release()

    async def boot(self) -> None:
        """PING once per loop; fails loudly, naming the target (never the password)."""
        st = self.state()
        if st.booted:
            return
        if self.cfg.verification_weakened:
            log.warning(
                "zeal_asgi: TLS to %s does NOT verify the server (ssl_cert_reqs=%s, "
                "ssl_check_hostname=%s): anyone on the path can impersonate it",
                self.where,
                self.cfg.ssl_cert_reqs,
                self.cfg.ssl_check_hostname,
            )
        try:
            await self.run(lambda c: c.ping(), what="boot PING", idempotent=True)
        except ZealError as exc:
            raise type(exc)(f"Redis boot check failed: {exc}") from exc
        st.booted = True

    # -- dedicated connections -----------------------------------------------------------------

    async def dedicated(self, socket_timeout: float | None, for_key: bytes | None) -> Redis:
        """A client with its own small pool, never a slot of the request pool (caller closes)."""
        st = self.state()
        cfg = self.cfg
        kw = self._conn_kwargs(socket_timeout)
        small: dict[str, Any] = {"max_connections": _DEDICATED_MAX}
        if cfg.mode == "sentinel":
            assert st.sentinel is not None
            kw.pop("db", None)
            pool: ConnectionPool = _new_sentinel_pool(
                cfg.service, st.sentinel, ssl=cfg.tls, db=cfg.db, **small, **kw
            )
            return Redis.from_pool(pool)
        client = st.client
        if isinstance(client, RedisCluster):
            try:
                await client.initialize()
            except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                raise translate(exc, f"dedicated connection to {self.where}") from exc
            node: Any = (
                client.get_node_from_key(for_key)  # type: ignore[arg-type]  # bytes keys work
                if for_key is not None
                else client.get_default_node()
            )
            kw = {**node.connection_kwargs, "socket_timeout": socket_timeout}
            kw.update(retry=Retry(NoBackoff(), 0), redis_connect_func=self._on_connect)
            kw.setdefault("connection_class", SSLConnection if cfg.tls else Connection)
            return Redis.from_pool(ConnectionPool(**small, **kw))
        if cfg.mode == "client":
            base = client.connection_pool
            kw = {**base.connection_kwargs, "socket_timeout": socket_timeout}
            kw["connection_class"] = base.connection_class
            return Redis.from_pool(ConnectionPool(**small, **kw))
        kw.setdefault("connection_class", SSLConnection if cfg.tls else Connection)
        if cfg.unix_path is None:
            kw.update(host=cfg.host, port=cfg.port)
        return Redis.from_pool(ConnectionPool(**small, **kw))
