"""The pub/sub transport over Redis: one dedicated SUBSCRIBE connection per worker.

The connection comes from the backend's ``dedicated_client()`` (never a slot of the request
pool).  After SUBSCRIBE/PSUBSCRIBE it waits for every confirmation, so a server that accepts
TCP connections but answers nothing (SIGSTOP) fails the attempt instead of hanging it.  While
listening, an idle connection is PINGed every ``liveness_interval`` seconds and dropped when the
answer takes longer than ``liveness_timeout`` (read-side liveness: a half-open TCP connection
never raises by itself).  On any error the whole client is discarded; the supervisor in
:mod:`zeal_asgi.messaging.pubsub` builds a new one after its backoff.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zeal_asgi.errors import BackendTimeoutError, BackendUnavailableError, ZealError
from zeal_asgi.messaging.common import Topic
from zeal_asgi.messaging.stats import cancel_task

if TYPE_CHECKING:
    from zeal_asgi.messaging.pubsub import PubSub

__all__ = ["RedisTransport", "glob_escape"]

_MESSAGE = b"message"
_PMESSAGE = b"pmessage"


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
    from zeal_asgi._redis.errors import translate

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
        self._opened: asyncio.Event | None = None

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
        opened = self._opened = asyncio.Event()
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
        finally:
            opened.set()

    async def _settled(self) -> Any:
        """The subscribed connection once an open() in progress is over (None if it failed).

        A topic added while open() runs was not in its list: it is subscribed right after,
        and never concurrently with open()'s own reads.
        """
        opened = self._opened
        if opened is not None and not opened.is_set():
            await opened.wait()
        return self._ps

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
            elif kind == "message":
                self._early.append((_text(msg["channel"]), None, msg["data"]))
            elif kind == "pmessage":
                self._early.append((_text(msg["channel"]), _text(msg["pattern"]), msg["data"]))

    async def listen(self, deliver: Callable[[str, str | None, bytes], bool]) -> None:
        """Deliver messages; raise when the connection fails or stops answering PINGs."""
        ps = self._ps
        if ps is None or ps.connection is None:
            raise BackendUnavailableError("pub/sub: not connected")
        for item in self._early:
            deliver(*item)
        self._early.clear()
        conn = ps.connection
        task = asyncio.current_task()
        assert task is not None
        watch = _Liveness(task, conn, self.owner.liveness_interval, self.owner.liveness_timeout)
        read = conn.read_response
        try:
            while True:
                # No timer per message: _Liveness bounds the silence, one timer per interval.
                reply = await read(timeout=math.inf, disconnect_on_error=False, push_request=True)
                watch.last = watch.loop.time()
                if type(reply) is not list or len(reply) < 3:
                    continue  # a pong, or something we did not ask for
                kind = reply[0]
                if kind == _MESSAGE:
                    crowded = deliver(_text(reply[1]), None, reply[2])
                elif kind == _PMESSAGE and len(reply) == 4:
                    crowded = deliver(_text(reply[2]), _text(reply[1]), reply[3])
                else:
                    continue
                if crowded:
                    # Replies already buffered are read without suspending: let the handlers
                    # drain their queues before the rest of a burst overflows them.
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            if watch.failure is not None and task.uncancel() == 0:
                raise watch.failure from None
            raise
        except Exception as exc:
            raise _translate(exc, "pub/sub listen") from exc
        finally:
            await watch.stop()

    async def add(self, topic: Topic) -> None:
        """SUBSCRIBE/PSUBSCRIBE on the live connection (the next open() includes it anyway)."""
        ps = await self._settled()
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
        ps = await self._settled()
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
        """PUBLISH within the backend's slots (a burst of them waits for a connection instead
        of opening one each); the number of receivers."""
        if not topic.system:
            n: int = await self.redis.publish(topic.name, payload)
            return n
        sent: int = await self.redis.publish_raw(self.wire(topic), payload)
        return sent


class _Liveness:
    """Read-side liveness of a subscribed connection, with one timer per idle interval.

    The listener stamps :attr:`last` on every reply.  When nothing arrived for ``interval``
    seconds a PING is written; when nothing (not even the pong) arrived ``timeout`` seconds
    after it, :attr:`failure` is set and the listening ``task`` cancelled, which turns the
    cancellation into that error.  A PING that cannot be written fails the same way.
    """

    def __init__(self, task: asyncio.Task[Any], conn: Any, interval: float, timeout: float) -> None:
        self.loop = asyncio.get_running_loop()
        self.last = self.loop.time()
        self.failure: BaseException | None = None
        self._task = task
        self._conn = conn
        self._interval = interval
        self._timeout = timeout
        self._pinged_at = 0.0
        self._ping: asyncio.Task[None] | None = None
        self._stopped = False
        self._handle: asyncio.TimerHandle | None = self.loop.call_at(
            self.last + interval, self._check
        )

    def _check(self) -> None:
        now = self.loop.time()
        if self._pinged_at:
            if self.last >= self._pinged_at:
                self._pinged_at = 0.0  # answered (or other traffic): alive
            elif now - self._pinged_at >= self._timeout:
                self._fail(
                    BackendTimeoutError(
                        f"pub/sub: no answer to PING within {self._timeout} s "
                        "(server stopped or connection half-open)"
                    )
                )
                return
            else:
                self._handle = self.loop.call_at(self._pinged_at + self._timeout, self._check)
                return
        if now - self.last < self._interval:
            self._handle = self.loop.call_at(self.last + self._interval, self._check)
            return
        self._pinged_at = now
        self._ping = self.loop.create_task(self._send_ping())
        self._handle = self.loop.call_at(now + self._timeout, self._check)

    async def _send_ping(self) -> None:
        try:
            await self._conn.send_command("PING", check_health=False)
        except Exception as exc:
            self._fail(_translate(exc, "pub/sub liveness PING"))

    def _fail(self, error: BaseException) -> None:
        # Only while the listener waits for a reply: once stop() began, a cancel could land
        # outside the listener's handler and kill the supervisor instead.
        if self.failure is None and not self._stopped:
            self.failure = error
            self._task.cancel()

    async def stop(self) -> None:
        """Cancel the timer and any PING still being written."""
        self._stopped = True
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        ping, self._ping = self._ping, None
        await cancel_task(ping)
