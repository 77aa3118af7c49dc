"""The Redis/Valkey backend: the same rows and counters as the shared table, across hosts.

Select it with ``Store.default_backend("redis", "redis://host:6379/0")`` (or ``rediss://`` for
TLS, verified; or an options dict: ``url``, ``pool_size`` (8), ``prefix`` ("zeal"),
``socket_timeout``, ``connect_timeout``, ``acquire_timeout``, ``deadline``, ``retries``,
``health_check_interval``, ``ssl_ca_certs``/``ssl_certfile``/``ssl_keyfile``; ``cluster:
["host:port", ...]``; ``sentinel: ["host:port", ...]`` with ``service``; or ``client``: a ready
``redis.asyncio`` client), or ``ZEAL_STORE_BACKEND=redis`` with ``ZEAL_REDIS_URL``.  Options are
validated at once, without I/O; connections open lazily in each worker (``start()`` PINGs).

Layout (every key and channel carries the prefix, ``zeal`` by default)::

    zeal:{users}:alice       hash, one field per column: a row of table "users", key "alice"
    zeal:{users}:__keys__    set of the keys of a tracked table ("users"): count() is SCARD
    zeal:counter:requests    string, Counter "requests" (INCRBY)
    zeal:ch:news             pub/sub channel "news" (Store.publish)
    zeal:stream:jobs         stream "jobs" (Store.publish_reliable)
    zeal:<key>               keys given to Store.eval (KEYS[i] = prefix + ":" + key)

The braces around the table name are a Redis Cluster hash tag: Cluster hashes only
``users``, so every row of a table and its membership set live in one slot, and one Lua script
updates a row and its membership atomically (a table is therefore served by one shard).  A user
key that reads ``__keys__`` (or that with more leading underscores) is stored with one more
leading ``_`` so it cannot collide with the membership set.  Field values are encoded by
:mod:`zeal_asgi.store.codec` (INT decimal, FLOAT ``repr``, STRING UTF-8, BYTES raw).

Semantics are the shared table's: merge on set, zero defaults, typed values, range-checked
``incr`` (Lua; INT(8) through HINCRBY), ``compare_and_set`` where a missing row compares as
zeros.  ``mode="tracked"`` keeps the membership set in the same script as every write;
``mode="ttl"`` sets ``EXPIRE ttl`` on every write and counts by SCAN of the exact table pattern.
Errors are the ZealError hierarchy (redis-py exceptions never escape).  Run Redis with
``maxmemory-policy noeviction`` for tracked tables: an evicted row leaves its key in the
membership set, so count() would over-count.

Every call takes one of ``pool_size`` connections (waiting at most ``acquire_timeout``, then
PoolTimeoutError) and ends within ``deadline`` (default ``acquire_timeout + socket_timeout``);
each attempt waits at most ``socket_timeout`` for its reply.  On a standalone server single
commands skip redis-py's client layers (one hiredis-packed write on the worker's own connection;
the time limits of all calls share one timer); pipelines, Cluster and Sentinel go through
redis-py's clients.
Idempotent commands (reads, merges, deletes) are retried on connection errors and timeouts with
full-jitter backoff inside that deadline; INCR/HINCRBY scripts, compare-and-set, PUBLISH, XADD and
``eval`` never are, since a lost reply does not mean the command did not run.  Clients are per
worker process and event loop (rebuilt after a fork or on a new loop): call ``Store.aclose()`` on
the loop that used them (the lifespan does).
"""

from __future__ import annotations

import hashlib
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, TypeVar, overload

from redis.exceptions import NoScriptError

from zeal_asgi._redis.config import RedisConfig
from zeal_asgi._redis.errors import translate
from zeal_asgi._redis.scripts import Script
from zeal_asgi._redis.subscriber import publish
from zeal_asgi.errors import (
    ConfigError,
    InvalidKeyError,
    KeyTypeError,
    SerializationError,
    ZealError,
)
from zeal_asgi.store.backends.redis.counter import RedisCounter
from zeal_asgi.store.backends.redis.tables import RedisTables
from zeal_asgi.store.base import Key, StoreBackendKind

__all__ = ["RedisBackend", "RedisCounter"]

T = TypeVar("T")
_PUBLISH = "PUBLISH"


class RedisBackend(RedisTables):
    """Store backend over Redis, Valkey, Redis Cluster or Sentinel (``Store.BACKEND_REDIS``).

    For code built on it (tiered backend, pub/sub, streams, WebSockets): :meth:`key`,
    :meth:`channel_name`, :meth:`stream_key` (prefixing), :meth:`client` (the pooled client of
    this loop), :meth:`dedicated_client` (its own connection, for SUBSCRIBE or XREADGROUP
    BLOCK), :meth:`publish`, :meth:`publish_reliable`, :meth:`run` (a command within this
    backend's slots, deadline, retries and error translation) and :meth:`translate_error`.
    """

    kind = StoreBackendKind.REDIS

    def __init__(self, config: RedisConfig) -> None:
        super().__init__(config)
        self._counters: dict[str, RedisCounter] = {}

    @classmethod
    def from_config(
        cls, conn: str | Mapping[str, Any] | None = None, *, extra_keys: Collection[str] = ()
    ) -> RedisBackend:
        """Validate ``conn`` (URL, options dict, or None for ``ZEAL_REDIS_URL``) without I/O.

        ``extra_keys``: dict keys of a wrapping backend to accept and ignore.
        """
        return cls(RedisConfig.parse(conn, extra_keys=extra_keys))

    def __repr__(self) -> str:
        return f"<RedisBackend {self._conn.where} prefix={self.prefix!r}>"

    # -- helpers for code built on this backend ------------------------------------------------

    @overload
    def key(self, *parts: str) -> str: ...
    @overload
    def key(self, *parts: str | bytes) -> str | bytes: ...
    def key(self, *parts: str | bytes) -> str | bytes:
        """``{prefix}:{part}:...`` (``str`` unless a part is ``bytes``)."""
        raw = self.layout.key(*parts)
        return raw if any(isinstance(p, bytes) for p in parts) else raw.decode("utf-8")

    def channel_name(self, channel: str) -> str:
        """The Redis channel behind ``Store.publish(channel, ...)``: ``{prefix}:ch:{channel}``."""
        return self.layout.channel(_name("channel", channel)).decode("utf-8")

    def stream_key(self, stream: str) -> str:
        """The Redis stream behind ``publish_reliable(stream, ...)``: ``{prefix}:stream:{name}``."""
        return self.layout.stream(_name("stream", stream)).decode("utf-8")

    def row_key(self, table: str, key: Key) -> bytes:
        """The hash holding row ``key`` of ``table``."""
        return self.layout.row(table, key.encode("utf-8") if isinstance(key, str) else key)

    async def client(self) -> Any:
        """The pooled ``redis.asyncio`` client of this worker's running loop (raw access:
        bypasses this backend's slots, retries and error translation)."""
        return self._conn.state().client

    async def dedicated_client(
        self, *, socket_timeout: float | None = None, for_key: str | bytes | None = None
    ) -> Any:
        """A ``redis.asyncio.Redis`` on its own connections (never a pool slot); caller closes.

        For SUBSCRIBE and ``XREADGROUP ... BLOCK``: ``socket_timeout=None`` lets reads block.
        On a Cluster it connects to the node that owns ``for_key`` (e.g. a stream key).
        """
        raw = for_key.encode("utf-8") if isinstance(for_key, str) else for_key
        return await self._conn.dedicated(socket_timeout, raw)

    async def run(
        self, op: Callable[..., Awaitable[T]], *, what: str, idempotent: bool = False
    ) -> T:
        """Run ``await op(client)`` within this backend's slots, deadline and retry policy.

        Only pass ``idempotent=True`` when running the command twice is harmless.
        """
        return await self._conn.run(op, what=what, idempotent=idempotent)

    async def run_script(
        self,
        script: Script,
        keys: Sequence[bytes],
        args: Sequence[Any],
        *,
        what: str,
        idempotent: bool = False,
    ) -> Any:
        """Run one of the package's scripts (keys already prefixed) on the single-command fast
        path: EVALSHA, then EVAL if the server lost it; the raw reply."""
        return await self._conn.script(script, keys, args, what, idempotent=idempotent)

    @staticmethod
    def translate_error(exc: BaseException, where: str) -> ZealError:
        """The ZealError for a redis-py exception (for code using :meth:`dedicated_client`)."""
        return translate(exc, where)

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open this worker's pool on the running loop and PING (BackendUnavailableError...)."""
        await self._conn.boot()

    async def aclose(self) -> None:
        """Close this loop's connections (dedicated clients are closed by their owners)."""
        await self._conn.close()

    async def ping(self) -> bool:
        """``True`` when Redis answers PING; the typed error otherwise."""
        return bool(await self._conn.call(("PING",), "PING", idempotent=True))

    def stats(self) -> dict[str, Any]:
        """``{"redis": {target, pool_size, in_use, waiting, <counters>, host: {<counters>}}}``."""
        return {"redis": self._conn.stats()}

    # -- messaging and scripting ---------------------------------------------------------------

    async def publish(self, channel: str, payload: str | bytes) -> int:
        """PUBLISH on ``{prefix}:ch:{channel}``; the number of workers that receive it, each
        once, on every node (:func:`zeal_asgi._redis.subscriber.publish`)."""
        _name("channel", channel)
        return await publish(self, channel, _payload(payload))

    async def publish_raw(self, channel: str | bytes, payload: bytes) -> int:
        """PUBLISH on ``channel`` exactly as given (already prefixed, e.g. by :meth:`key`), within
        this backend's slots and deadline: for package-internal topics (WebSocket routing)."""
        name = channel.decode("utf-8", "replace") if isinstance(channel, bytes) else channel
        n = await self._conn.call(
            (_PUBLISH, channel, payload), "publish to", idempotent=False, table=name
        )
        return int(n)

    async def publish_reliable(
        self, stream: str, payload: str | bytes, max_len: int | None = None
    ) -> str:
        """XADD to ``{prefix}:stream:{stream}`` (``MAXLEN ~ max_len`` when given); the entry id."""
        name = self.layout.stream(_name("stream", stream))
        data = _payload(payload)
        if max_len is not None and (
            not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1
        ):
            raise ConfigError(f"max_len must be an int >= 1 (entries kept), got {max_len!r}")
        trim: tuple[Any, ...] = () if max_len is None else (b"MAXLEN", b"~", max_len)
        entry = await self._conn.call(
            ("XADD", name, *trim, b"*", b"payload", data),
            "publish_reliable to",
            idempotent=False,
            table=stream,
        )
        return entry.decode("ascii") if isinstance(entry, bytes) else str(entry)

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run Lua with ``KEYS[i] = {prefix}:{keys[i]}`` and ``ARGV = args`` (never interpolated).

        The reply is redis-py's (bytes, ints, lists).  Errors raised by the script are
        BackendResponseError.  Not retried (a script may write).
        """
        if not isinstance(script, str) or not script.strip():
            raise SerializationError("eval needs the Lua source as a non-empty str")
        full_keys = [self.layout.key(_name("eval key", k)) for k in keys]
        for a in args:
            if isinstance(a, bool) or not isinstance(a, (str, bytes, int, float)):
                raise SerializationError(
                    f"eval args are str, bytes, int or float (sent as ARGV), got {type(a).__name__}"
                )
        body = script.encode("utf-8")
        sha = hashlib.sha1(body, usedforsecurity=False).hexdigest()

        async def op(c: Any) -> Any:
            try:
                return await c.evalsha(sha, len(full_keys), *full_keys, *args)
            except NoScriptError:
                return await c.eval(body, len(full_keys), *full_keys, *args)

        return await self._conn.run(op, what="eval", idempotent=False)

    # -- counters ------------------------------------------------------------------------------

    def counter(self, name: str, initial: int) -> RedisCounter:
        """The counter at ``{prefix}:counter:{name}``; ``initial`` is written with SET NX."""
        c = self._counters.get(name)
        if c is None or c.initial != initial:
            c = self._counters[name] = RedisCounter(self._conn, self.layout, name, initial)
        return c


def _name(what: str, value: object) -> str | bytes:
    if not isinstance(value, (str, bytes)):
        raise KeyTypeError(f"{what} names are str or bytes, got {type(value).__name__}")
    if not value:
        raise InvalidKeyError(f"empty {what} name")
    return value


def _payload(payload: object) -> bytes:
    if isinstance(payload, str):
        return payload.encode("utf-8")
    if isinstance(payload, bytes):
        return payload
    raise SerializationError(f"payloads are str or bytes, got {type(payload).__name__}")
