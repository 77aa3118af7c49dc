"""Pub/sub: ``zeal.subscribe`` handlers run in every worker, fed by one supervised subscriber.

``await Store.publish(channel, payload)`` returns the number of receivers, defined once for
every backend: one per subscribed worker it reaches, however many of the worker's channels and
patterns match, on every node (Redis, Cluster, tiered, and either behind the circuit breaker)
or on this host (the table backend, where messages go through shared memory,
:mod:`zeal_asgi.shm.bus`, and no Redis is needed).  On Redis every worker registers its topics
for ``3 * liveness_interval + liveness_timeout`` seconds and renews them; a worker killed
without stopping counts until its registration expires.  Subscribers that are not zeal workers
count as Redis counts them (on a Cluster: those of one node at most).

Each worker runs one :class:`PubSub` (started and stopped by ``Zeal``): one connection (or one
ring reader) for all its subscriptions, kept by the worker's supervised
:class:`~zeal_asgi._redis.subscriber.Subscriber`: after a loss it resubscribes with full-jitter
exponential backoff, a read-side liveness check (PING on an idle connection) catches a server
that stopped answering without closing the socket, and ``max_attempts`` consecutive failures stop
it loudly (state ``failed``, logged as an error, shown by ``Store.stats()``; ``/health/store``
answers 503 in that worker: it receives nothing any more).  Messages published
while a subscriber is disconnected are lost: pub/sub is at-most-once (use Streams,
``zeal.subscribe_reliable``, for at-least-once).

Every subscription has its own bounded queue and task, so a slow handler delays only its own
messages.  Overflow policy: ``drop_oldest`` (default; counted as ``dropped``) or ``drop_newest``.
Handlers are ``handler(payload, channel)``, sync or async; ``payload`` is ``str`` (UTF-8) unless
``raw=True`` (``bytes``).  A channel containing ``*``, ``?`` or ``[`` is a pattern (Redis glob
rules) unless ``pattern=False``.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zeal_asgi._redis.subscriber import Subscriber
from zeal_asgi.errors import ConfigError
from zeal_asgi.messaging.stats import RUNNERS, Counters, call, cancel_tasks, messaging_link, spawn
from zeal_asgi.messaging.transports import BusTransport, RedisTransport, Topic, Transport
from zeal_asgi.shm.bus import host_bus
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Store
from zeal_asgi.store.base import StoreBackendKind, positive_int, seconds
from zeal_asgi.store.channels import is_pattern, validate_channel

log = logging.getLogger("zeal_asgi.messaging.pubsub")

Handler = Callable[[Any, str], Any]
"""``handler(payload, channel)``; may be a coroutine function."""

OVERFLOW_POLICIES = ("drop_oldest", "drop_newest")


@dataclass(eq=False)
class Subscription:
    """One handler on one topic, with its bounded queue and its task (in a started worker)."""

    topic: Topic
    handler: Handler
    raw: bool = False
    queue_size: int = 1024
    overflow: str = "drop_oldest"
    queue: asyncio.Queue[tuple[Any, str]] | None = field(default=None, repr=False)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class PubSub:
    """The per-worker subscriber of a :class:`~zeal_asgi.Zeal` app (a ``Zeal`` service).

    Args:
        store: the Store whose backend carries the messages (default: ``Store.default()``).
        max_attempts: consecutive failed (re)connections before giving up loudly; 0 = never.
        backoff_base: first step of the full-jitter backoff ``uniform(0, min(cap, base * 2**n))``.
        backoff_cap: its longest wait.
        liveness_interval: idle seconds after which the connection is PINGed.
        liveness_timeout: seconds a PING may go unanswered before the connection is dropped.
        ready_timeout: how long ``start()`` waits for the first subscription to be confirmed.

    Example::

        @zeal.subscribe("news")
        async def on_news(payload: str, channel: str) -> None: ...
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        max_attempts: int = 0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        liveness_interval: float = 5.0,
        liveness_timeout: float = 2.0,
        ready_timeout: float = 5.0,
    ) -> None:
        self._store = store
        # a zero backoff or ready wait is allowed (no wait); a liveness period is not
        self.max_attempts = positive_int("pub/sub max_attempts", max_attempts, 0)
        self.backoff_base = seconds("pub/sub backoff_base", backoff_base, 86400, zero=True)
        self.backoff_cap = seconds("pub/sub backoff_cap", backoff_cap, 86400, zero=True)
        self.liveness_interval = seconds("pub/sub liveness_interval", liveness_interval, 86400)
        self.liveness_timeout = seconds("pub/sub liveness_timeout", liveness_timeout, 86400)
        self.ready_timeout = seconds("pub/sub ready_timeout", ready_timeout, 86400, zero=True)
        self.subscriptions: list[Subscription] = []
        self._by_wire: dict[tuple[str, bool], list[Subscription]] = {}
        self.transport: Transport | None = None
        self.subscriber: Subscriber | None = None
        """This worker's supervised subscriber, while started."""
        names = "received delivered handler_errors dropped reconnects decode_errors overrun lost"
        self.counters = Counters("pubsub", names)
        self._adding: set[asyncio.Task[None]] = set()
        self._refresher: asyncio.Task[None] | None = None
        self._last: tuple[str, BaseException | None] = ("stopped", None)
        RUNNERS.add(self)

    @property
    def store(self) -> Store:
        """The Store whose backend carries the messages."""
        return Store.default() if self._store is None else self._store

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``stop()`` in this worker."""
        return self.subscriber is not None

    @property
    def state(self) -> str:
        """``stopped``, ``connecting``, ``subscribed``, ``backoff`` or ``failed``."""
        return self.subscriber.state if self.subscriber is not None else self._last[0]

    @property
    def error(self) -> BaseException | None:
        """The last connection error of this worker's subscriber."""
        return self.subscriber.error if self.subscriber is not None else self._last[1]

    # -- declaring subscriptions ---------------------------------------------------------------

    def subscribe(
        self,
        channel: str,
        handler: Handler | None = None,
        *,
        pattern: bool | None = None,
        raw: bool = False,
        queue_size: int = 1024,
        overflow: str = "drop_oldest",
    ) -> Any:
        """Run ``handler(payload, channel)`` in every worker for each message on ``channel``.

        Without ``handler`` it is a decorator.  Declare at import time; subscriptions declared
        on a started worker are subscribed at once (in that worker only).
        """
        validate_channel(channel, "pattern" if pattern else "channel")
        if pattern is None:
            pattern = is_pattern(channel)
        positive_int("queue_size", queue_size)
        if overflow not in OVERFLOW_POLICIES:
            raise ConfigError(f"overflow must be one of {OVERFLOW_POLICIES}, got {overflow!r}")

        def register(fn: Handler) -> Handler:
            if not callable(fn):
                raise ConfigError(f"a pub/sub handler must be callable, got {fn!r}")
            self._add(Subscription(Topic(channel, bool(pattern)), fn, raw, queue_size, overflow))
            return fn

        return register if handler is None else register(handler)

    async def add_system(self, name: str, handler: Handler, *, raw: bool = True) -> Subscription:
        """Subscribe a package-internal topic (WebSocket routing) in this worker only."""
        sub = Subscription(Topic(name, False, True), handler, raw, 4096, "drop_oldest")
        task = self._add(sub)
        if task is not None:
            # SUBSCRIBE is sent before the caller goes on; a failure is logged, and the next
            # resubscription includes the topic anyway
            with contextlib.suppress(Exception):
                await task
        return sub

    def _add(self, sub: Subscription) -> asyncio.Task[None] | None:
        self.subscriptions.append(sub)
        if self.subscriber is None:
            return None
        return spawn(self._adding, self._change(sub.topic, self._activate(sub), True))

    async def _change(self, topic: Topic, key: tuple[str, bool], subscribe: bool) -> None:
        """Subscribe (or unsubscribe) ``key``, and count this worker among the receivers of
        ``topic`` (or no more)."""
        assert self.subscriber is not None and self.transport is not None
        await self.subscriber.change(*key, subscribe)
        await self.transport.advertise([topic], self._ttl if subscribe else 0)

    async def unsubscribe(self, sub: Subscription) -> None:
        """Remove a subscription (its task is cancelled and awaited)."""
        if sub not in self.subscriptions:
            return
        self.subscriptions.remove(sub)
        if self.transport is not None:
            key = (self.transport.wire(sub.topic), sub.topic.pattern)
            subs = self._by_wire.get(key, [])
            if sub in subs:
                subs.remove(sub)
            if not subs:
                self._by_wire.pop(key, None)
                if self.subscriber is not None:
                    await self._change(sub.topic, key, False)
        await cancel_tasks(sub.task)
        sub.task = None

    # -- publishing ----------------------------------------------------------------------------

    async def publish_system(self, name: str, payload: bytes) -> int:
        """Publish on a package-internal topic; the number of receivers."""
        return await self._transport().publish(Topic(name, False, True), payload)

    def system_wire(self, name: str) -> str:
        """The wire name of the package-internal topic ``name`` (what a script publishes on)."""
        return self._transport().wire(Topic(name, False, True))

    def _transport(self) -> Transport:
        if self.transport is None:
            link = messaging_link(self.store.backend, "pub/sub")
            self.transport = RedisTransport(link) if link else BusTransport(self.counters.incr)
        return self.transport

    # -- lifecycle -----------------------------------------------------------------------------

    def prepare(self) -> None:
        """Allocate what must exist before workers fork: the host counters, and the host bus on
        the table backend (a segment first made in a worker may outlive the server)."""
        host_stats()
        if self.store.kind is StoreBackendKind.TABLE:
            host_bus()

    async def start(self) -> None:
        """Start the supervised subscriber in this worker (``Zeal`` calls it at startup)."""
        if self.subscriber is not None:
            return
        self.transport = None
        transport = self._transport()
        self._by_wire.clear()
        for sub in self.subscriptions:
            self._activate(sub)
        self.subscriber = Subscriber(
            transport.feed(self.liveness_interval, self.liveness_timeout),
            self._deliver,
            name="pub/sub",
            family="pubsub",
            topics=list(self._by_wire),
            on_synced=self._synced,
            max_attempts=self.max_attempts,
            backoff_base=self.backoff_base,
            backoff_cap=self.backoff_cap,
        )
        await self.subscriber.start()
        if isinstance(transport, RedisTransport):
            self._refresher = asyncio.get_running_loop().create_task(self._refresh())
        if self.subscriptions and not await self.subscriber.wait_ready(self.ready_timeout):
            log.warning(
                "zeal_asgi pub/sub: not subscribed after %.1f s (state %s); still trying",
                self.ready_timeout,
                self.state,
            )

    async def wait_ready(self, within: float = 5.0) -> bool:
        """Wait until every subscription is live; False on timeout."""
        return self.subscriber is not None and await self.subscriber.wait_ready(within)

    async def stop(self) -> None:
        """Stop the subscriber and every handler task (cancelled and awaited)."""
        await cancel_tasks(self._refresher)
        subscriber, self.subscriber = self.subscriber, None
        if subscriber is not None:
            if subscriber.connected and self.transport is not None:
                with contextlib.suppress(Exception):  # else the registration expires by itself
                    await self.transport.advertise(self._topics(), 0)
            await subscriber.stop()
            self._last = (subscriber.state, subscriber.error)
        await cancel_tasks(*self._adding, *(sub.task for sub in self.subscriptions))
        for sub in self.subscriptions:
            sub.task = sub.queue = None
        self.transport = None
        self._by_wire.clear()

    def _activate(self, sub: Subscription) -> tuple[str, bool]:
        """Index ``sub`` by its wire name and start its queue and task; that wire key."""
        assert self.transport is not None
        key = (self.transport.wire(sub.topic), sub.topic.pattern)
        self._by_wire.setdefault(key, []).append(sub)
        sub.queue = asyncio.Queue(maxsize=sub.queue_size)
        name = f"zeal-pubsub:{sub.topic.name}"
        sub.task = asyncio.get_running_loop().create_task(self._consume(sub), name=name)
        return key

    @property
    def _ttl(self) -> float:
        """How long this worker counts as a receiver without renewing (3 refreshes)."""
        return 3 * self.liveness_interval + self.liveness_timeout

    def _topics(self) -> set[Topic]:
        return {s.topic for s in self.subscriptions}

    async def _refresh(self) -> None:
        """Renew this worker's receiver registration while it is subscribed."""
        while True:
            await asyncio.sleep(self.liveness_interval)
            if self.subscriber is not None and self.subscriber.connected:
                assert self.transport is not None
                try:
                    await self.transport.advertise(self._topics(), self._ttl)
                except Exception as exc:  # the next round tries again
                    log.warning("zeal_asgi pub/sub: receiver registration failed: %s", exc)

    async def _synced(self) -> None:
        assert self.transport is not None and self.subscriber is not None
        await self.transport.advertise(self._topics(), self._ttl)
        if self.subscriber.subscribes > 1:  # the first subscription is not a reconnection
            self.counters.incr("reconnects")

    def _deliver(self, wire: str, pattern: str | None, data: bytes) -> bool:
        """Queue a message for its subscriptions; True when one of their queues is half full."""
        subs = self._by_wire.get((pattern, True) if pattern is not None else (wire, False))
        self.counters.incr("received")
        if not subs:
            return False
        transport = self.transport
        assert transport is not None
        crowded = False
        text: str | None = None
        for sub in subs:
            queue = sub.queue
            if queue is None:
                continue
            payload: Any = data
            if not sub.raw:
                if text is None:
                    try:
                        text = data.decode("utf-8")
                    except UnicodeDecodeError:
                        self.counters.incr("decode_errors")
                        log.warning(
                            "zeal_asgi pub/sub: dropped a non-UTF-8 message on %r "
                            "(subscribe with raw=True for bytes)",
                            wire,
                        )
                        continue
                payload = text
            item = (payload, transport.user_channel(wire, sub.topic))
            if queue.full():
                crowded = True
                self.counters.incr("dropped")
                if sub.overflow == "drop_newest":
                    continue
                queue.get_nowait()
            queue.put_nowait(item)
            if queue.qsize() * 2 >= sub.queue_size:
                crowded = True
        return crowded

    async def _consume(self, sub: Subscription) -> None:
        queue = sub.queue
        assert queue is not None
        handler, counters = sub.handler, self.counters
        is_coro = inspect.iscoroutinefunction(handler)
        while True:
            payload, channel = await queue.get()
            try:
                if is_coro:  # the common case, without a helper's frame per message
                    await handler(payload, channel)
                else:
                    await call(handler, payload, channel)
                counters.incr("delivered")
            except Exception:
                counters.incr("handler_errors")
                log.exception("zeal_asgi pub/sub: handler %r failed on %r", handler, channel)

    def stats(self) -> dict[str, Any]:
        """This worker's state and counters."""
        kind = self.transport.kind if self.transport else None
        out = {"state": self.state, "transport": kind, "subscriptions": len(self.subscriptions)}
        out |= self.counters.values
        if self.error is not None:
            out["last_error"] = str(self.error)
        return out
