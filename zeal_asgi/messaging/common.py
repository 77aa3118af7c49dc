"""Names shared by the pub/sub modules: channel rules, topics, the transport contract."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

from zeal_asgi.store.base import StoreBackend
from zeal_asgi.store.channels import as_bytes, is_pattern, validate_channel

__all__ = [
    "Topic",
    "Transport",
    "as_bytes",
    "is_pattern",
    "redis_backend_of",
    "validate_channel",
]


def redis_backend_of(backend: StoreBackend) -> Any:
    """The Redis link serving ``backend``, or ``None`` (``StoreBackend.redis_link()``)."""
    return backend.redis_link()


@dataclass(frozen=True)
class Topic:
    """A channel or pattern; ``system`` topics live in a namespace user channels cannot reach."""

    name: str
    pattern: bool = False
    system: bool = False


class Transport(Protocol):
    """How a worker's subscriber reaches the messages (Redis pub/sub or the host bus)."""

    kind: str

    def wire(self, topic: Topic) -> str:
        """The channel (or pattern) name on the wire."""
        ...

    def user_channel(self, wire: str, topic: Topic) -> str:
        """The name a handler sees for a message on ``wire`` matched by ``topic``."""
        ...

    async def open(self, topics: list[Topic]) -> None:
        """Connect and subscribe to every topic (raises on failure)."""
        ...

    async def listen(self, deliver: Callable[[str, str | None, bytes], bool]) -> None:
        """Deliver messages until the connection is lost (raises) or the task is cancelled.

        ``deliver`` returns True when a handler's queue is half full or more: the transport
        should then yield to the event loop before delivering more.
        """
        ...

    async def add(self, topic: Topic) -> None:
        """Subscribe one more topic on the open connection (no-op when closed)."""
        ...

    async def remove(self, topic: Topic) -> None:
        """Unsubscribe a topic (no-op when closed)."""
        ...

    async def close(self) -> None:
        """Close the connection; idempotent."""
        ...

    async def publish(self, topic: Topic, payload: bytes) -> int:
        """Publish on ``topic``; the number of receivers."""
        ...
