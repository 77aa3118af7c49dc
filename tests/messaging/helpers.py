"""Helpers of the messaging tests: a deadline-bound wait, and a socket that records sends."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink
    from zeal_asgi.store import Store


async def until(cond: Callable[[], object], within: float = 10.0, step: float = 0.01) -> None:
    """Poll ``cond`` until it is truthy; fail the test when ``within`` seconds pass first."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(step)


def redis_link(store: Store) -> RedisLink:
    """The Redis link of a store that has one."""
    link = store.backend.redis_link()
    assert link is not None, f"{store.kind} has no Redis link"
    return link


class Socket:
    """The two calls the router makes on a Starlette WebSocket, recording what it sends."""

    def __init__(self) -> None:
        self.sent: list[str | bytes] = []

    async def send_text(self, text: str) -> None:
        self.sent.append(text)

    async def send_bytes(self, data: bytes) -> None:
        self.sent.append(data)
