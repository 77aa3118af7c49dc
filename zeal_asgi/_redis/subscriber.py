"""The one supervised subscriber of a worker: pub/sub and the tiered backend's invalidations.

Pub/sub is at-most-once: whatever is published while a subscriber is disconnected is lost.  So
:class:`Subscriber` reports every gap: ``on_lost()`` as soon as the connection is known to be
gone and ``on_synced()`` once a new subscription is confirmed, before any message after it.
After a loss it reconnects with full-jitter exponential backoff, and ``max_attempts``
consecutive failures stop it loudly (state ``failed``, logged as an error).

The supervision is the same for any :class:`Feed`: :class:`RedisFeed` (a dedicated SUBSCRIBE
connection, never a slot of the request pool) or the host bus of the table backend.  A Redis
feed waits for every SUBSCRIBE/PSUBSCRIBE confirmation, so a server that accepts connections but
answers nothing (SIGSTOP) fails the attempt instead of hanging it; while listening, an idle
connection is PINGed every ``interval`` seconds and dropped when nothing comes back within
``timeout`` (a half-open TCP connection never raises by itself).  A broken connection is never
reused: redis-py would quietly reconnect and resubscribe it, hiding the gap.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import math
import random
import time
from collections.abc import Awaitable, Callable, Collection
from typing import Any, Protocol

from zeal_asgi._redis.errors import translate
from zeal_asgi._redis.scripts import text
from zeal_asgi.errors import BackendTimeoutError, BackendUnavailableError
from zeal_asgi.shm.hoststats import host_stats

log = logging.getLogger("zeal_asgi.subscriber")

Deliver = Callable[[str, str | None, bytes], object]
"""``deliver(channel, pattern or None, payload)``; a true result asks the feed to yield to the
event loop before delivering more (a handler's queue is filling up)."""

Topic = tuple[str, bool]
"""``(channel or pattern as on the wire, is_pattern)``."""


class Feed(Protocol):
    """One connection's worth of subscribing: what :class:`Subscriber` supervises."""

    kind: str

    async def open(self, topics: Collection[Topic]) -> None:
        """Connect and subscribe every topic, confirmed (raises on failure)."""
        ...

    async def listen(self, deliver: Deliver) -> None:
        """Deliver messages until the connection is lost (raises) or the task is cancelled."""
        ...

    async def change(self, wire: str, pattern: bool, subscribe: bool) -> None:
        """Subscribe one more topic, or unsubscribe one, on the open connection (no-op when
        closed: the next :meth:`open` gets the new list)."""
        ...

    async def drain(self) -> None:
        """While :meth:`listen` runs: unsubscribe everything, and return once no publisher
        counts this connection any more (or after the feed's timeout)."""
        ...

    async def close(self) -> None:
        """Close the connection; idempotent."""
        ...


class RedisFeed:
    """SUBSCRIBE/PSUBSCRIBE on a dedicated connection, with a PING when idle.

    Args:
        connect: returns a fresh ``redis.asyncio`` client on its own connection.
        ctl: a channel always subscribed (keeps the connection in subscribe mode with no topic).
        interval: idle seconds after which the connection is PINGed.
        timeout: seconds a PING (or the subscription) may go unanswered.
    """

    kind = "redis"

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        *,
        ctl: str | None = None,
        interval: float = 5.0,
        timeout: float = 2.0,
    ) -> None:
        self._connect = connect
        self._ctl = [ctl] if ctl else []
        self.interval = interval
        self.timeout = timeout
        self._client: Any = None
        self._ps: Any = None
        self._early: list[tuple[str, str | None, bytes]] = []
        self._opened: asyncio.Event | None = None
        self._last = 0.0  # loop time of the last reply
        self._failure: BaseException | None = None
        self._drained: asyncio.Event | None = None

    async def open(self, topics: Collection[Topic]) -> None:
        """Connect, subscribe everything, and wait for every confirmation."""
        await self.close()
        opened = self._opened = asyncio.Event()
        try:
            self._client = await self._connect()
            self._ps = self._client.pubsub()
            exact = [*self._ctl, *sorted(w for w, p in topics if not p)]
            patterns = sorted(w for w, p in topics if p)
            if exact:
                await self._ps.subscribe(*exact)
            if patterns:
                await self._ps.psubscribe(*patterns)
            await self._confirm(len(exact) + len(patterns))
        except BaseException as exc:
            await self.close()
            if isinstance(exc, Exception):
                raise translate(exc, "pub/sub subscribe") from exc
            raise
        finally:
            opened.set()

    async def _confirm(self, expected: int) -> None:
        deadline = time.monotonic() + self.timeout
        seen = 0
        self._early.clear()
        while seen < expected:
            left = deadline - time.monotonic()
            if left <= 0:
                raise BackendTimeoutError(
                    f"pub/sub: {expected - seen} of {expected} subscriptions not confirmed within "
                    f"{self.timeout} s"
                )
            msg = await self._ps.get_message(timeout=left)
            kind = None if msg is None else msg["type"]
            if kind in ("subscribe", "psubscribe"):
                seen += 1
            elif kind in ("message", "pmessage"):  # a message between two confirmations
                pattern = text(msg["pattern"]) if kind == "pmessage" else None
                self._early.append((text(msg["channel"]), pattern, msg["data"]))

    async def listen(self, deliver: Deliver) -> None:
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
        loop = asyncio.get_running_loop()
        self._last, self._failure = loop.time(), None
        watch = loop.create_task(self._watch(conn, task))
        read = conn.read_response
        try:
            while True:
                # No timer per message: the watch bounds the silence, one timer per interval.
                reply = await read(timeout=math.inf, disconnect_on_error=False, push_request=True)
                self._last = loop.time()
                if not isinstance(reply, list) or len(reply) < 3:
                    continue  # a pong
                kind = reply[0]
                if kind == b"message":
                    crowded = deliver(text(reply[1]), None, reply[2])
                elif kind == b"pmessage" and len(reply) == 4:
                    crowded = deliver(text(reply[2]), text(reply[1]), reply[3])
                else:  # a (un)subscribe confirmation (under hiredis, a list subclass)
                    if kind == b"punsubscribe" and reply[2] == 0 and self._drained is not None:
                        self._drained.set()  # drain(): the server has dropped every topic
                    continue
                if crowded:
                    # Replies already buffered are read without suspending: let the handlers
                    # drain their queues before the rest of a burst overflows them.
                    await asyncio.sleep(0)
        except asyncio.CancelledError:
            if self._failure is not None and task.uncancel() == 0:
                raise self._failure from None
            raise
        except Exception as exc:
            raise translate(exc, "pub/sub listen") from exc
        finally:
            # Cancelled before it could cancel us: from here on, a failure is not reported.
            watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await watch

    async def _watch(self, conn: Any, listener: asyncio.Task[Any]) -> None:
        """PING a connection idle for ``interval``; no reply (nor anything) within ``timeout``
        fails the ``listener``: it is cancelled, and raises :attr:`_failure` instead."""
        loop = asyncio.get_running_loop()
        try:
            while True:
                await asyncio.sleep(self._last + self.interval - loop.time())
                if loop.time() - self._last < self.interval:
                    continue  # traffic meanwhile: alive
                pinged = loop.time()
                await conn.send_command("PING", check_health=False)
                await asyncio.sleep(self.timeout)
                if self._last < pinged:
                    raise BackendTimeoutError(
                        f"pub/sub: no answer to PING within {self.timeout} s "
                        "(server stopped or connection half-open)"
                    )
        except Exception as exc:
            self._failure = translate(exc, "pub/sub liveness PING")
            listener.cancel()

    async def change(self, wire: str, pattern: bool, subscribe: bool) -> None:
        """(P)SUBSCRIBE or (P)UNSUBSCRIBE on the live connection.

        A topic changed while open() runs was not in its list: it is changed right after, and
        never concurrently with open()'s own reads.
        """
        opened = self._opened
        if opened is not None and not opened.is_set():
            await opened.wait()
        if self._ps is not None:
            verb = f"{'p' if pattern else ''}{'' if subscribe else 'un'}subscribe"
            try:
                await getattr(self._ps, verb)(wire)
            except Exception as exc:
                raise translate(exc, f"pub/sub {verb}") from exc

    async def drain(self) -> None:
        """UNSUBSCRIBE and PUNSUBSCRIBE everything, then wait (at most ``timeout``) until the
        listener reads the last confirmation.  The server notices a closed socket only when it
        next reads it, so a PUBLISH from another connection meanwhile would still count this
        one; after the confirmation none does.  Messages published before it are delivered."""
        ps = self._ps
        if ps is None or ps.connection is None:
            return
        drained = self._drained = asyncio.Event()
        with contextlib.suppress(Exception):  # a broken connection is closed next anyway
            await ps.connection.send_command("UNSUBSCRIBE", check_health=False)
            await ps.connection.send_command("PUNSUBSCRIBE", check_health=False)
            await asyncio.wait_for(drained.wait(), self.timeout)

    async def close(self) -> None:
        """Drop the connection (idempotent)."""
        closing, self._ps, self._client = (self._ps, self._client), None, None
        for obj in closing:
            if obj is not None:  # closing a broken connection may fail; it is gone either way
                with contextlib.suppress(Exception):
                    await obj.aclose()


class Subscriber:
    """Keeps ``feed`` subscribed to its topics in this worker, through every outage.

    Args:
        feed: the connection to supervise (:class:`RedisFeed`, or the host bus's).
        on_message: ``deliver(channel, pattern, payload)`` for every message, synchronously.
        name: names the task and the log lines.
        family: prefix of the host counters ``<family>_subscribes_total`` and
            ``<family>_subscriber_failures_total``.
        topics: ``(wire, is_pattern)`` pairs subscribed from the start.
        on_synced: called (sync or async) once a (re)subscription is confirmed, before any
            message that follows it.
        on_lost: called when a confirmed subscription is found broken (or stopped).
        max_attempts: consecutive failed attempts before giving up (state ``failed``); 0 never.
        backoff_base: first step of the full-jitter backoff ``uniform(0, min(cap, base * 2**n))``.
        backoff_cap: its longest wait.

    ``state`` is ``stopped``, ``connecting``, ``subscribed``, ``backoff`` or ``failed``.
    """

    def __init__(
        self,
        feed: Feed,
        on_message: Deliver,
        *,
        name: str,
        family: str,
        topics: Collection[Topic] = (),
        on_synced: Callable[[], object] | None = None,
        on_lost: Callable[[], None] | None = None,
        max_attempts: int = 0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
    ) -> None:
        self.feed = feed
        self.name = name
        self.topics: set[Topic] = set(topics)
        self.max_attempts = max_attempts
        self.backoff = (backoff_base, backoff_cap)
        self.state = "stopped"
        self.error: BaseException | None = None
        self.connected = False
        """Whether a confirmed subscription is live (messages flow)."""
        self.subscribes = 0
        self.failures = 0
        self.received = 0
        self._on_message = on_message
        self._on_synced = on_synced
        self._on_lost = on_lost
        self._metrics = (f"{family}_subscribes_total", f"{family}_subscriber_failures_total")
        self._task: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        """True while the supervising task runs."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the supervised task in the running loop (idempotent)."""
        if not self.running:
            self.error = None
            self._ready = asyncio.Event()
            self._task = asyncio.create_task(self._run(), name=f"zeal-subscriber:{self.name}")

    async def stop(self) -> None:
        """Unsubscribe, cancel the task and wait for it (the connection is closed on the way
        out): once it returns, no publisher counts this worker."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            try:
                if self.connected:
                    await self.feed.drain()
            finally:  # a stop() cancelled while draining still ends the task
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        await self.feed.close()
        self._ready = None
        self._lost()
        if self.state != "failed":
            self.state = "stopped"

    async def wait_ready(self, within: float) -> bool:
        """Wait until the topics are subscribed; False after ``within`` seconds (or stopped)."""
        if self._ready is None:
            return False
        try:
            await asyncio.wait_for(self._ready.wait(), within)
        except TimeoutError:
            return False
        return True

    async def change(self, wire: str, pattern: bool, subscribe: bool) -> None:
        """Subscribe one more topic, or unsubscribe one (at once when connected, else at the
        next connection)."""
        if ((wire, pattern) in self.topics) != subscribe:
            (self.topics.add if subscribe else self.topics.discard)((wire, pattern))
            if self.running:
                await self.feed.change(wire, pattern, subscribe)

    def _deliver(self, channel: str, pattern: str | None, data: bytes) -> object:
        self.received += 1
        return self._on_message(channel, pattern, data)

    def _lost(self) -> None:
        if self.connected:
            self.connected = False
            if self._on_lost is not None:
                self._on_lost()

    async def _run(self) -> None:
        feed, ready, attempt = self.feed, self._ready, 0
        assert ready is not None
        while True:
            self.state = "connecting"
            try:
                await feed.open(list(self.topics))
                attempt = 0
                self.subscribes += 1
                host_stats().incr(self._metrics[0])
                if self._on_synced is not None:
                    res = self._on_synced()
                    if inspect.isawaitable(res):
                        await res
                self.connected = True
                self.state = "subscribed"
                ready.set()
                await feed.listen(self._deliver)
                raise BackendUnavailableError(f"{self.name}: the subscription ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                ready.clear()
                self.error = exc
                self.failures += 1
                host_stats().incr(self._metrics[1])
                self._lost()
                attempt += 1
                if self.max_attempts and attempt >= self.max_attempts:
                    self.state = "failed"
                    log.error(
                        "zeal_asgi %s: giving up after %d failed attempts (max_attempts); "
                        "this worker receives no more messages: %s",
                        self.name,
                        attempt,
                        exc,
                    )
                    return
                self.state = "backoff"
                base, cap = self.backoff
                delay = random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))
                log.warning(
                    "zeal_asgi %s: connection lost (%s); resubscribing in %.2f s",
                    self.name,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)
            finally:
                await feed.close()

    def stats(self) -> dict[str, Any]:
        """State and counters of this worker's subscriber."""
        err = self.error
        return {
            "state": self.state,
            "feed": self.feed.kind,
            "connected": self.connected,
            "topics": len(self.topics),
            "subscribes": self.subscribes,
            "failures": self.failures,
            "received": self.received,
            "last_error": None if err is None else f"{type(err).__name__}: {err}",
        }
