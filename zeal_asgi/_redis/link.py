"""``RedisLink``: one Redis target under one key prefix, as everything built on Redis uses it.

The Redis Store backend is a link that also serves tables; ``StoreBackend.redis_link()`` hands
the link to pub/sub, Streams, the WebSocket registry and the cache's stampede lock.  It names
keys, channels and streams under the prefix, runs commands and scripts within the connector's
slots, deadline and retry policy, and publishes.  Errors are the ZealError hierarchy.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from typing import Any, Self, TypeVar, overload

from zeal_asgi._redis.config import RedisConfig
from zeal_asgi._redis.connector import RedisConnector
from zeal_asgi._redis.scripts import PUBLISH, KeyLayout, Script
from zeal_asgi.errors import ConfigError, InvalidKeyError, KeyTypeError, SerializationError
from zeal_asgi.shm.bus import glob_to_regex

T = TypeVar("T")


class RedisLink:
    """Keys, commands, scripts and publishing on one Redis target (standalone, Cluster, Sentinel
    or a ready client) under one prefix; connections are per worker and event loop."""

    def __init__(self, config: RedisConfig) -> None:
        self.config = config
        self.prefix = config.prefix
        self.layout = KeyLayout(config.prefix)
        self._conn = RedisConnector(config)

    @classmethod
    def from_config(
        cls, conn: str | Mapping[str, Any] | None = None, *, extra_keys: Collection[str] = ()
    ) -> Self:
        """Validate ``conn`` (URL, options dict, or None for ``ZEAL_REDIS_URL``) without I/O.

        ``extra_keys``: dict keys of a wrapping backend to accept and ignore.
        """
        return cls(RedisConfig.parse(conn, extra_keys=extra_keys))

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self._conn.where} prefix={self.prefix!r}>"

    # -- names -----------------------------------------------------------------------------------

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
        return self.layout.channel(channel).decode("utf-8")

    def stream_key(self, stream: str) -> str:
        """The Redis stream behind ``publish_reliable(stream, ...)``: ``{prefix}:stream:{name}``."""
        return self.layout.stream(stream).decode("utf-8")

    # -- commands --------------------------------------------------------------------------------

    async def client(self) -> Any:
        """The pooled ``redis.asyncio`` client of this worker's running loop (raw access:
        bypasses the slots, retries and error translation)."""
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
        """Run ``await op(client)`` within the slots, deadline and retry policy.

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
        """Run one of :mod:`zeal_asgi._redis.scripts` (keys already prefixed) on the fast path:
        EVALSHA, then EVAL if the server lost it; the raw reply."""
        return await self._conn.script(script, keys, args, what, idempotent=idempotent)

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

    async def publish(self, channel: str, payload: bytes) -> int:
        """PUBLISH on ``{prefix}:ch:{channel}`` (both already validated: ``Store.publish``);
        the receivers.  Never retried: it may have been delivered.

        One per subscribed worker reached, on every node, however many of its subscriptions
        match (the host bus counts the same way), plus the other subscribers Redis saw.  Each
        worker's pub/sub registers its user topics (``{prefix}:{pubsub}:*``, sorted sets by
        expiry); one script publishes and reads them.
        """
        layout = self.layout
        native, exact, patterns = await self.run_script(
            PUBLISH,
            [layout.receivers(channel), layout.receivers(None)],
            [layout.channel(channel), payload],
            what=f"publish to {channel!r}",
        )
        ids, matched = set(exact), len(exact)
        for member in patterns:
            sid, _, glob = member.partition(b"\x1f")
            if _pattern(glob).fullmatch(channel):
                ids.add(sid)
                matched += 1
        # What Redis counted beyond our workers' subscriptions: other clients (on a Cluster,
        # those of the node that ran it, or fewer; never more).
        return len(ids) + max(0, int(native) - matched)

    async def publish_raw(self, channel: str, payload: bytes, *, idempotent: bool = False) -> int:
        """PUBLISH on ``channel`` exactly as given (already prefixed, e.g. by :meth:`key`), on the
        shared connection within the slots and deadline: for package-internal topics (WebSocket
        routing, tiered invalidations); retried only if ``idempotent``."""
        args = ("PUBLISH", channel.encode(), payload)  # bytes: a Cluster routes by them
        n = await self._conn.call(args, "publish to", idempotent=idempotent, table=channel)
        return int(n)

    async def publish_reliable(self, stream: str, payload: bytes, max_len: int | None) -> str:
        """XADD to ``{prefix}:stream:{stream}`` (``MAXLEN ~ max_len`` when given); the entry id."""
        if max_len is not None and (
            not isinstance(max_len, int) or isinstance(max_len, bool) or max_len < 1
        ):
            raise ConfigError(f"max_len must be an int >= 1 (entries kept), got {max_len!r}")
        trim: tuple[Any, ...] = () if max_len is None else (b"MAXLEN", b"~", max_len)
        entry = await self._conn.call(
            ("XADD", self.layout.stream(stream), *trim, b"*", b"payload", payload),
            "publish_reliable to",
            idempotent=False,
            table=stream,
        )
        return entry.decode("ascii") if isinstance(entry, bytes) else str(entry)

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run Lua with ``KEYS[i] = {prefix}:{keys[i]}`` and ``ARGV = args`` (never interpolated).

        The reply is RESP2 (bytes, ints, lists).  Errors raised by the script are
        BackendResponseError.  Not retried (a script may write).
        """
        if not isinstance(script, str) or not script.strip():
            raise SerializationError("eval needs the Lua source as a non-empty str")
        full = [self.layout.key(_part("eval key", k)) for k in keys]
        for a in args:
            if isinstance(a, bool) or not isinstance(a, (str, bytes, int, float)):
                raise SerializationError(
                    f"eval args are str, bytes, int or float (sent as ARGV), got {type(a).__name__}"
                )
            if isinstance(a, str):
                _part("eval arg", a, empty_ok=True)
        found = _user_script(script)
        return await self._conn.script(found, full, list(args), "eval", idempotent=False)


@functools.lru_cache(maxsize=1024)
def _pattern(glob: bytes) -> re.Pattern[str]:
    """The regex of a subscribed pattern (as registered, bytes)."""
    return glob_to_regex(glob.decode("utf-8", "surrogateescape"))


@functools.lru_cache(maxsize=1024)  # bounded: the source may come from user input
def _user_script(source: str) -> Script:
    """The :class:`Script` of ``eval``'s ``source`` (its SHA computed once)."""
    return Script(source)


def _part(what: str, value: object, *, empty_ok: bool = False) -> bytes:
    """A key or argument as UTF-8 bytes, or the typed error for it."""
    if isinstance(value, bytes):
        raw = value
    elif isinstance(value, str):
        try:
            raw = value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidKeyError(f"{what} {value!r} is not encodable as UTF-8") from None
    else:
        raise KeyTypeError(f"an {what} is str or bytes, got {type(value).__name__}")
    if not raw and not empty_ok:
        raise InvalidKeyError(f"empty {what}")
    return raw
