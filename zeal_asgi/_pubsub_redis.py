"""The pub/sub transport over Redis: one dedicated SUBSCRIBE connection per worker.

The connection comes from the backend's ``dedicated_client()`` (never a slot of the request
pool).  After SUBSCRIBE/PSUBSCRIBE it waits for every confirmation, so a server that accepts
TCP connections but answers nothing (SIGSTOP) fails the attempt instead of hanging it.  While
listening, an idle connection is PINGed every ``liveness_interval`` seconds and dropped when the
answer takes longer than ``liveness_timeout`` (read-side liveness: a half-open TCP connection
never raises by itself).  On any error the whole client is discarded; the supervisor in
:mod:`zeal_asgi.pubsub` builds a new one after its backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ._pubsub_common import Topic
from .errors import BackendTimeoutError, BackendUnavailableError, ZealError

if TYPE_CHECKING:
    from .pubsub import PubSub

__all__ = ["RedisTransport", "glob_escape"]

_MESSAGE = "message"
_PMESSAGE = "pmessage"


def glob_escape(text: str) -> str:
    """``text`` with Redis glob metacharacters escaped (for a literal prefix of a pattern)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "surrogateescape")
    return str(value)


def _translate(exc: BaseException, where: str) -> BaseException:
    if isinstance(exc, ZealError):
        return exc
    from .store._redis_errors import translate

    return translate(exc, where)


class RedisTransport:
    """Subscribes one worker's topics on a dedicated connection of a Redis-capable backend."""

    kind = "redis"

    def __init__(self, redis: Any, owner: PubSub) -> None:
        self.redis = redis
        self.owner = owner
        self._user_base: str = redis.channel_name("x")[:-1]
        self._sys_base: str = redis.key("x")[:-1]
        self._ctl = f"{self._sys_base}pubsub:ctl:{os.getpid()}.{secrets.token_hex(4)}"
        self._client: Any = None
        self._ps: Any = None
        self._early: list[tuple[str, str | None, bytes]] = []

    def wire(self, topic: Topic) -> str:
        """``channel_name(name)`` for user topics, ``key(name)`` for system topics."""
        base = self._sys_base if topic.system else self._user_base
        return (glob_escape(base) if topic.pattern else base) + topic.name

    def user_channel(self, wire: str, topic: Topic) -> str:
        """The channel without the backend's prefix."""
        base = self._sys_base if topic.system else self._user_base
        return wire[len(base) :] if wire.startswith(base) else wire

    async def open(self, topics: list[Topic]) -> None:
        """Connect, subscribe everything, and wait for every confirmation."""
        await self.close()
        try:
            self._client = await self.redis.dedicated_client()
            self._ps = self._client.pubsub()
            exact = sorted({self.wire(t) for t in topics if not t.pattern})
            patterns = sorted({self.wire(t) for t in topics if t.pattern})
            await self._ps.subscribe(self._ctl, *exact)
            if patterns:
                await self._ps.psubscribe(*patterns)
            await self._confirm(1 + len(exact) + len(patterns))
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise _translate(exc, "pub/sub subscribe") from exc
            raise

    async def _confirm(self, expected: int) -> None:
        deadline = time.monotonic() + self.owner.liveness_timeout
        seen = 0
        self._early.clear()
        while seen < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendTimeoutError(
                    f"pub/sub: {expected - seen} of {expected} subscriptions not confirmed within "
                    f"{self.owner.liveness_timeout} s"
                )
            msg = await self._ps.get_message(timeout=left)
            if msg is None:
                continue
            kind = msg["type"]
            if kind in ("subscribe", "psubscribe"):
                seen += 1
            elif kind == _MESSAGE:
                self._early.append((_text(msg["channel"]), None, msg["data"]))
            elif kind == _PMESSAGE:
                self._early.append((_text(msg["channel"]), _text(msg["pattern"]), msg["data"]))

    async def listen(self, deliver: Callable[[str, str | None, bytes], None]) -> None:
        """Deliver messages; raise when the connection fails or stops answering PINGs."""
        ps = self._ps
        if ps is None:
            raise BackendUnavailableError("pub/sub: not connected")
        for item in self._early:
            deliver(*item)
        self._early.clear()
        interval = self.owner.liveness_interval
        timeout = self.owner.liveness_timeout
        last = time.monotonic()
        ping_sent = 0.0
        try:
            while True:
                now = time.monotonic()
                wait = (ping_sent + timeout - now) if ping_sent else (last + interval - now)
                msg = await ps.get_message(timeout=max(wait, 0.001))
                now = time.monotonic()
                if msg is None:
                    if ping_sent:
                        if now - ping_sent >= timeout:
                            raise BackendTimeoutError(
                                f"pub/sub: no answer to PING within {timeout} s "
                                "(server stopped or connection half-open)"
                            )
                    elif now - last >= interval:
                        await ps.ping()
                        ping_sent = now
                    continue
                last = now
                ping_sent = 0.0
                kind = msg["type"]
                if kind == _MESSAGE:
                    deliver(_text(msg["channel"]), None, msg["data"])
                elif kind == _PMESSAGE:
                    deliver(_text(msg["channel"]), _text(msg["pattern"]), msg["data"])
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            raise _translate(exc, "pub/sub listen") from exc

    async def add(self, topic: Topic) -> None:
        """SUBSCRIBE/PSUBSCRIBE on the live connection (the next open() includes it anyway)."""
        ps = self._ps
        if ps is None:
            return
        try:
            if topic.pattern:
                await ps.psubscribe(self.wire(topic))
            else:
                await ps.subscribe(self.wire(topic))
        except Exception as exc:
            raise _translate(exc, "pub/sub subscribe") from exc

    async def remove(self, topic: Topic) -> None:
        """UNSUBSCRIBE/PUNSUBSCRIBE on the live connection."""
        ps = self._ps
        if ps is None:
            return
        try:
            if topic.pattern:
                await ps.punsubscribe(self.wire(topic))
            else:
                await ps.unsubscribe(self.wire(topic))
        except Exception as exc:
            raise _translate(exc, "pub/sub unsubscribe") from exc

    async def close(self) -> None:
        """Drop the connection (idempotent)."""
        ps, self._ps = self._ps, None
        client, self._client = self._client, None
        if ps is not None:
            # closing a broken connection may fail; it is gone either way
            with contextlib.suppress(Exception):
                await ps.aclose()
        if client is not None:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def publish(self, topic: Topic, payload: bytes) -> int:
        """PUBLISH on the pooled client; the number of receivers."""
        if not topic.system:
            n: int = await self.redis.publish(topic.name, payload)
            return n
        try:
            client = await self.redis.client()
            return int(await client.publish(self.wire(topic), payload))
        except Exception as exc:
            raise _translate(exc, "publish") from exc
