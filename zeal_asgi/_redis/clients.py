"""Clients of the Redis backend, built with every option explicit (never redis-py's defaults).

:class:`ClientFactory` builds, for one event loop of one worker: the pooled redis-py client
(standalone, Sentinel or Cluster) for pipelines and scans, the way single commands' connections
open (:mod:`zeal_asgi._redis.pipe`: TCP, TLS or a unix socket, to the server, the Sentinel's
current master or one Cluster node, then AUTH and SELECT), and dedicated clients for SUBSCRIBE
and blocking reads.  redis-py's defaults keep moving between releases (timeouts, retries,
hostname checks), so every knob it has is set here from
:class:`~zeal_asgi._redis.config.RedisConfig`.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, ConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.connection import (  # DefaultParser: hiredis's, which the connector requires
    AbstractConnection,
    Connection,
    DefaultParser,
    RedisSSLContext,
    SSLConnection,
    UnixDomainSocketConnection,
)
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from zeal_asgi._redis.config import RedisConfig
from zeal_asgi._redis.errors import translate
from zeal_asgi._redis.pipe import Opener, pack

Address = tuple[str, int]
"""A node's host and port."""

_DEDICATED_MAX = 4


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel master discovery with the bounded, waiting pool of the standalone client."""


# redis-py leaves these constructors unannotated; call them through Any under mypy --strict.
_new_sentinel: Any = Sentinel
_new_sentinel_pool: Any = SentinelConnectionPool
_new_blocking_sentinel_pool: Any = _BlockingSentinelPool


class ClientFactory:
    """Builds the redis-py objects of one backend; ``on_connect`` runs on every new connection."""

    def __init__(
        self, cfg: RedisConfig, on_connect: Callable[[AbstractConnection], Awaitable[None]]
    ) -> None:
        self.cfg = cfg
        self._on_connect = on_connect

    def conn_kwargs(self, socket_timeout: float | None) -> dict[str, Any]:
        """Keyword arguments of one redis-py connection to the configured standalone server."""
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
            "parser_class": DefaultParser,
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
            kw.update(self.tls_kwargs())
        return kw

    def tls_kwargs(self) -> dict[str, Any]:
        """TLS options: verification on unless explicitly weakened (which logs a warning)."""
        cfg = self.cfg
        return {
            "ssl_ca_certs": cfg.ssl_ca_certs,
            "ssl_certfile": cfg.ssl_certfile,
            "ssl_keyfile": cfg.ssl_keyfile,
            "ssl_cert_reqs": cfg.ssl_cert_reqs,
            "ssl_check_hostname": cfg.ssl_check_hostname and cfg.ssl_cert_reqs != "none",
            "ssl_min_version": ssl.TLSVersion.TLSv1_2,
        }

    def _standalone_kwargs(self, socket_timeout: float | None) -> dict[str, Any]:
        cfg = self.cfg
        kw = self.conn_kwargs(socket_timeout)
        kw.setdefault("connection_class", SSLConnection if cfg.tls else Connection)
        if cfg.unix_path is None:
            kw.update(host=cfg.host, port=cfg.port)
        return kw

    def pooled(self) -> tuple[Any, Sentinel | None]:
        """The pooled client of one loop (and its Sentinel, in sentinel mode)."""
        cfg = self.cfg
        if cfg.mode == "client":
            return cfg.client, None
        if cfg.mode == "cluster":
            return self._cluster(), None
        bounded: dict[str, Any] = {"max_connections": cfg.pool_size, "timeout": cfg.acquire_timeout}
        if cfg.mode == "sentinel":
            sentinel = self._sentinel()
            blocking = _new_blocking_sentinel_pool
            return self._on_master(blocking, sentinel, cfg.socket_timeout, **bounded), sentinel
        # Single commands use their own pipelined connection; this pool serves pipelines and
        # scans (within the slots) and callers of client() outside them (Streams consumers): a
        # burst of those waits up to acquire_timeout for one of pool_size connections instead
        # of failing at once, as a plain pool would.  Its connections open on first use.
        pool = BlockingConnectionPool(**bounded, **self._standalone_kwargs(cfg.socket_timeout))
        return Redis.from_pool(pool), None

    def opener(
        self, loop: asyncio.AbstractEventLoop, addr: Address | None, sentinel: Sentinel | None
    ) -> Opener:
        """How a single-command connection to ``addr`` (a Cluster node; ``None``: the server,
        or the master the Sentinels name at that moment) opens."""
        cfg = self.cfg
        ssl_context = None
        if cfg.tls:  # the pooled client's very options (ssl_ca_certs -> ca_certs, ...)
            tls = {k.removeprefix("ssl_"): v for k, v in self.tls_kwargs().items()}
            ssl_context = RedisSSLContext(**tls).get()

        async def open_(protocol: Callable[[], asyncio.Protocol]) -> object:
            if cfg.unix_path is not None:
                return await loop.create_unix_connection(protocol, cfg.unix_path)
            if addr is not None:
                host, port = addr
            elif sentinel is not None:
                host, port = await sentinel.discover_master(cfg.service or "")
            else:
                host, port = cfg.host or "", cfg.port
            name = host if ssl_context is not None else None
            return await loop.create_connection(
                protocol, host, port, ssl=ssl_context, server_hostname=name
            )

        return open_

    def greeting(self, cluster_node: bool) -> list[bytes]:
        """The commands a new connection sends first: AUTH, SELECT (none on a Cluster node)."""
        cfg = self.cfg
        out = []
        if cfg.password is not None:
            user = () if cfg.username is None else (cfg.username,)
            out.append(pack((b"AUTH", *user, cfg.password)))
        if cfg.db and not cluster_node:
            out.append(pack((b"SELECT", cfg.db)))
        return out

    def _on_master(
        self, pool_class: Any, sentinel: Sentinel, socket_timeout: float | None, **size: Any
    ) -> Redis:
        """A client whose pool (a ``pool_class``) connects to the master the Sentinels name at
        each connection."""
        kw = self.conn_kwargs(socket_timeout)
        return Redis.from_pool(
            pool_class(self.cfg.service, sentinel, ssl=self.cfg.tls, **size, **kw)
        )

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
            sentinel_kw.update(ssl=True, **self.tls_kwargs())
        sentinel: Sentinel = _new_sentinel(
            list(cfg.nodes), min_other_sentinels=0, sentinel_kwargs=sentinel_kw
        )
        return sentinel

    def _cluster(self) -> RedisCluster:
        cfg = self.cfg
        kw = self.conn_kwargs(cfg.socket_timeout)
        # The cluster client takes no parser/connect hook arguments; its nodes copy these.
        hooks = {name: kw.pop(name) for name in ("parser_class", "redis_connect_func")}
        client = RedisCluster(
            startup_nodes=[ClusterNode(h, p) for h, p in cfg.nodes],
            require_full_coverage=True,
            load_balancing_strategy=None,  # reads and writes go to the primaries
            dynamic_startup_nodes=True,
            max_connections=cfg.pool_size,
            ssl=cfg.tls,
            **kw,
        )
        client.nodes_manager.connection_kwargs.update(hooks)
        for node in client.nodes_manager.startup_nodes.values():
            node.connection_kwargs.update(hooks)
        return client

    async def dedicated(
        self,
        pooled: Any,
        sentinel: Sentinel | None,
        socket_timeout: float | None,
        for_key: bytes | None,
        where: str,
    ) -> Redis:
        """A client with its own small pool, never a slot of the request pool (caller closes)."""
        cfg = self.cfg
        if cfg.mode == "sentinel":
            assert sentinel is not None
            size = {"max_connections": _DEDICATED_MAX}
            return self._on_master(_new_sentinel_pool, sentinel, socket_timeout, **size)
        if isinstance(pooled, RedisCluster):
            try:
                await pooled.initialize()
            except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                raise translate(exc, f"dedicated connection to {where}") from exc
            node: Any = (
                pooled.get_node_from_key(for_key)  # type: ignore[arg-type]  # bytes keys work
                if for_key is not None
                else pooled.get_default_node()
            )
            kw = {**node.connection_kwargs, "redis_connect_func": self._on_connect}
            kw.update(retry=Retry(NoBackoff(), 0))
            kw.setdefault("connection_class", SSLConnection if cfg.tls else Connection)
        elif cfg.mode == "client":  # the options of the user's own pool
            base = pooled.connection_pool
            kw = {**base.connection_kwargs, "connection_class": base.connection_class}
        else:
            kw = self._standalone_kwargs(socket_timeout)
        kw["socket_timeout"] = socket_timeout
        return Redis.from_pool(ConnectionPool(max_connections=_DEDICATED_MAX, **kw))
