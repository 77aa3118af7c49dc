"""The per-worker invalidation subscriber of the tiered backend: supervised, with liveness checks.

Redis pub/sub is at-most-once: whatever is published while a subscriber is disconnected is lost.
So the subscriber reports every gap: ``on_lost()`` as soon as the connection is known to be gone
(the worker then stops trusting L1) and ``on_synced()`` once a new subscription is confirmed
(the worker flushes L1, then trusts it again).  A connection that silently stops answering is
found by a PING every ``ping_interval`` that must be answered within ``ping_timeout``.  A broken
connection object is never reused (redis-py would quietly reconnect and resubscribe it, hiding
the gap); reconnects back off with full jitter.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import Any

from redis import exceptions as rx

from zeal_asgi.errors import ZealError
from zeal_asgi.shm.hoststats import host_stats

__all__ = ["InvalidationSubscriber"]

log = logging.getLogger("zeal_asgi.tiered")


class InvalidationSubscriber:
    """SUBSCRIBE to one channel in this worker and hand every message to ``on_message``.

    Args:
        connect: returns a fresh ``redis.asyncio`` client on its own connection.
        channel: the full channel name.
        on_message: called with each payload (bytes), synchronously.
        on_synced: called once a (re)subscription is confirmed, before any message after it.
        on_lost: called when the connection is found broken.
    """

    def __init__(
        self,
        connect: Callable[[], Awaitable[Any]],
        channel: str,
        on_message: Callable[[bytes], None],
        on_synced: Callable[[], None],
        on_lost: Callable[[], None],
        *,
        ping_interval: float = 1.0,
        ping_timeout: float = 1.0,
        backoff_base: float = 0.05,
        backoff_cap: float = 2.0,
    ) -> None:
        self.channel = channel
        self._connect = connect
        self._on_message = on_message
        self._on_synced = on_synced
        self._on_lost = on_lost
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self._backoff = (backoff_base, backoff_cap)
        self._task: asyncio.Task[None] | None = None
        self.connected = False
        self.subscribes = 0
        self.failures = 0
        self.received = 0
        self.last_error: str | None = None

    @property
    def running(self) -> bool:
        """True while the supervising task runs."""
        return self._task is not None and not self._task.done()

    async def start(self) -> None:
        """Start the supervised task in the running loop (idempotent)."""
        if not self.running:
            self._task = asyncio.get_running_loop().create_task(
                self._supervise(), name=f"zeal-tiered-subscriber:{self.channel}"
            )

    async def stop(self) -> None:
        """Cancel the task and wait for it (the connection is closed on the way out)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self.connected:
            self.connected = False
            self._on_lost()

    async def _supervise(self) -> None:
        attempt = 0
        while True:
            try:
                await self._session()
            except (rx.RedisError, OSError, ZealError, TimeoutError) as exc:
                self.last_error = f"{type(exc).__name__}: {exc}"
            except Exception as exc:  # a supervisor must outlive any bug below it
                self.last_error = f"{type(exc).__name__}: {exc}"
                log.exception("tiered invalidation subscriber on %s failed", self.channel)
            self.failures += 1
            host_stats().incr("tiered_subscriber_failures_total")
            if self.connected:
                self.connected = False
                self._on_lost()
                attempt = 0
            base, cap = self._backoff
            await asyncio.sleep(random.uniform(0, min(cap, base * 2**attempt)))
            attempt = min(attempt + 1, 16)

    async def _session(self) -> None:
        client = await self._connect()
        pubsub = client.pubsub(ignore_subscribe_messages=False)
        try:
            await pubsub.subscribe(self.channel)
            await self._confirmed(pubsub)
            self.subscribes += 1
            host_stats().incr("tiered_subscribes_total")
            self._on_synced()
            self.connected = True
            await self._listen(pubsub)
        finally:
            # Closing may itself fail on a dead socket; the session is over either way.
            with contextlib.suppress(Exception):
                await pubsub.aclose()
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _confirmed(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.ping_timeout + self.ping_interval
        while loop.time() < deadline:
            msg = await pubsub.get_message(timeout=max(0.01, deadline - loop.time()))
            if msg is not None and msg.get("type") == "subscribe":
                return
        raise TimeoutError(f"SUBSCRIBE {self.channel} not confirmed in time")

    async def _listen(self, pubsub: Any) -> None:
        loop = asyncio.get_running_loop()
        last_seen = loop.time()
        ping_sent: float | None = None
        while True:
            msg = await pubsub.get_message(timeout=self.ping_interval / 2)
            now = loop.time()
            if msg is not None:
                last_seen, ping_sent = now, None
                if msg.get("type") == "message":
                    self.received += 1
                    self._on_message(msg["data"])
                continue
            if ping_sent is not None:
                if now - ping_sent > self.ping_timeout:
                    raise TimeoutError(f"no PONG within {self.ping_timeout} s on {self.channel}")
            elif now - last_seen >= self.ping_interval:
                await pubsub.ping()
                ping_sent = now

    def stats(self) -> dict[str, Any]:
        """Connection state and counters of this worker's subscriber."""
        return {
            "channel": self.channel,
            "connected": self.connected,
            "running": self.running,
            "subscribes": self.subscribes,
            "failures": self.failures,
            "received": self.received,
            "last_error": self.last_error,
        }
