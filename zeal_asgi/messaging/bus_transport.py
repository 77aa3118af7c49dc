"""The pub/sub transport of the table backend: the host bus in shared memory (one host)."""

from __future__ import annotations

from collections.abc import Callable

from zeal_asgi.messaging.common import Topic
from zeal_asgi.shm.bus import host_bus
from zeal_asgi.shm.bus_reader import BusSubscriber

__all__ = ["BusTransport"]


class BusTransport:
    """Reads the host bus for one worker; never disconnects (shared memory has no outage)."""

    kind = "host_bus"

    def __init__(self, count: Callable[[str, int], None] | None = None) -> None:
        self.bus = host_bus()
        self.sub: BusSubscriber | None = None
        self._count = count

    def wire(self, topic: Topic) -> str:
        """``u:<channel>`` for user topics, ``s:<name>`` for system topics."""
        return ("s:" if topic.system else "u:") + topic.name

    def user_channel(self, wire: str, topic: Topic) -> str:
        """Strip the namespace."""
        return wire[2:]

    async def open(self, topics: list[Topic]) -> None:
        """Register this worker and its topics in the shared registry."""
        sub = BusSubscriber(self.bus, self._count)
        try:
            for t in topics:
                sub.add(self.wire(t), t.pattern)
        except BaseException:
            sub.close()
            raise
        self.sub = sub

    async def listen(self, deliver: Callable[[str, str | None, bytes], bool]) -> None:
        """Read the ring until cancelled (the ring reader yields between batches itself)."""
        assert self.sub is not None

        def sink(wire: str, pattern: str | None, data: bytes) -> None:
            deliver(wire, pattern, data)

        await self.sub.run(sink)

    async def add(self, topic: Topic) -> None:
        """Subscribe one more topic."""
        if self.sub is not None:
            self.sub.add(self.wire(topic), topic.pattern)

    async def remove(self, topic: Topic) -> None:
        """Unsubscribe a topic."""
        if self.sub is not None:
            self.sub.remove(self.wire(topic), topic.pattern)

    async def close(self) -> None:
        """Unregister this worker."""
        sub, self.sub = self.sub, None
        if sub is not None:
            sub.close()

    async def publish(self, topic: Topic, payload: bytes) -> int:
        """Append to the ring; the number of subscribed workers on this host."""
        return self.bus.publish(self.wire(topic), payload)
