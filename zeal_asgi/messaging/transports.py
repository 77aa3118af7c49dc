"""How pub/sub reaches its messages: names on the wire, publishing, and the feed subscribed.

Two transports: :class:`RedisTransport` (every backend with a Redis link: redis, tiered, and
either behind the circuit breaker) and :class:`BusTransport` (the table backend: the host bus in
shared memory, one host, no Redis).  Either one's feed is kept subscribed by the worker's
:class:`~zeal_asgi._redis.subscriber.Subscriber`.
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zeal_asgi._redis.scripts import RECEIVERS
from zeal_asgi._redis.subscriber import Deliver, Feed, RedisFeed
from zeal_asgi.shm.bus import host_bus
from zeal_asgi.shm.bus_reader import BusSubscriber

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink


@dataclass(frozen=True)
class Topic:
    """A channel or pattern; ``system`` topics live in a namespace user channels cannot reach."""

    name: str
    pattern: bool = False
    system: bool = False


def glob_escape(text: str) -> str:
    """``text`` with Redis glob metacharacters escaped (for a literal prefix of a pattern)."""
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class RedisTransport:
    """User topics are ``channel_name(name)``, system topics ``key(name)`` of the backend."""

    kind = "redis"

    def __init__(self, redis: RedisLink) -> None:
        self.redis = redis
        self._bases = (redis.channel_name("x")[:-1], redis.key("x")[:-1])
        self.sid = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        """This worker's id among the receivers."""

    def wire(self, topic: Topic) -> str:
        """The prefixed name (a pattern's prefix is escaped: only the user's part globs)."""
        base = self._bases[topic.system]
        return (glob_escape(base) if topic.pattern else base) + topic.name

    def user_channel(self, wire: str, topic: Topic) -> str:
        """The channel without the backend's prefix."""
        base = self._bases[topic.system]
        return wire[len(base) :] if wire.startswith(base) else wire

    async def publish(self, topic: Topic, payload: bytes) -> int:
        """PUBLISH a system topic within the backend's slots (a burst waits for a connection
        instead of opening one each); the receivers (``Store.publish`` serves user channels)."""
        return await self.redis.publish_raw(self.wire(topic), payload)

    async def advertise(self, topics: Iterable[Topic], ttl: float) -> None:
        """Count this worker among the receivers of its user ``topics`` for ``ttl`` seconds
        (``0``: no more): ``publish`` counts each worker it reaches once, on every node."""
        user = [t for t in topics if not t.system]
        if user:
            keys = [self.redis.layout.receivers(None if t.pattern else t.name) for t in user]
            members = [f"{self.sid}\x1f{t.name}" if t.pattern else self.sid for t in user]
            args = [round(ttl * 1000), *members]
            await self.redis.run_script(RECEIVERS, keys, args, what="receivers", idempotent=True)

    def feed(self, interval: float, timeout: float) -> Feed:
        """A dedicated SUBSCRIBE connection, with its private control channel."""
        ctl = self.redis.key("pubsub", "ctl", f"{os.getpid()}.{secrets.token_hex(4)}")
        return RedisFeed(self.redis.dedicated_client, ctl=ctl, interval=interval, timeout=timeout)


class BusTransport:
    """The host bus: user topics ``u:<channel>``, system topics ``s:<name>``; its own feed
    (shared memory has no outage, so there is no liveness to watch)."""

    kind = "host_bus"

    def __init__(self, count: Callable[[str, int], None]) -> None:
        self.bus = host_bus()
        self.sub: BusSubscriber | None = None
        self._count = count

    def wire(self, topic: Topic) -> str:
        """``u:<channel>`` for user topics, ``s:<name>`` for system topics."""
        return ("s:" if topic.system else "u:") + topic.name

    def user_channel(self, wire: str, topic: Topic) -> str:
        """Strip the namespace."""
        return wire[2:]

    async def publish(self, topic: Topic, payload: bytes) -> int:
        """Append to the ring; the number of subscribed workers on this host."""
        return self.bus.publish(self.wire(topic), payload)

    async def advertise(self, topics: Iterable[Topic], ttl: float) -> None:
        """Nothing to do: the ring's registry is what ``publish`` counts."""

    def feed(self, interval: float, timeout: float) -> Feed:
        """This transport itself."""
        return self

    async def open(self, topics: Collection[tuple[str, bool]]) -> None:
        """Register this worker and its topics in the shared registry."""
        sub = BusSubscriber(self.bus, self._count)
        try:
            for wire, pattern in topics:
                sub.add(wire, pattern)
        except BaseException:
            sub.close()
            raise
        self.sub = sub

    async def listen(self, deliver: Deliver) -> None:
        """Read the ring until cancelled (the ring reader yields between batches itself)."""
        assert self.sub is not None
        await self.sub.run(deliver)

    async def change(self, wire: str, pattern: bool, subscribe: bool) -> None:
        """Subscribe one more topic, or unsubscribe one."""
        if self.sub is not None:
            (self.sub.add if subscribe else self.sub.remove)(wire, pattern)

    async def drain(self) -> None:
        """Nothing to wait for: :meth:`close` unregisters at once."""

    async def close(self) -> None:
        """Unregister this worker."""
        sub, self.sub = self.sub, None
        if sub is not None:
            sub.close()


Transport = RedisTransport | BusTransport
"""Names and publishing of one backend's pub/sub, and the feed its subscriber holds."""
