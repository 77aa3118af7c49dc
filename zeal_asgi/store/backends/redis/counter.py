"""Counters of the Redis backend: ``INCRBY`` on ``{prefix}:counter:{name}``."""

from __future__ import annotations

from collections.abc import Awaitable

from zeal_asgi._redis.connector import RedisConnector
from zeal_asgi._redis.pipe import pack
from zeal_asgi._redis.scripts import COUNTER_CAS, KeyLayout
from zeal_asgi.errors import BackendResponseError
from zeal_asgi.store.base import CounterBackend


class RedisCounter(CounterBackend):
    """A signed 64-bit counter: ``INCRBY`` on ``{prefix}:counter:{name}``.

    ``initial`` is written with ``SET NX`` before this process first touches the counter, so
    declaring it in every worker never resets it.  ``compare_and_set`` treats a missing counter
    as 0, like the shared-memory Atomic.
    """

    def __init__(self, conn: RedisConnector, layout: KeyLayout, name: str, initial: int) -> None:
        self.name = name
        self.initial = initial
        self.key = layout.counter(name)
        self._conn = conn
        self._ready = False
        self._incr_one = ("INCRBY", self.key, 1)
        self._incr_one_packed = pack(self._incr_one)  # the usual step, packed once

    async def _ensure(self) -> None:
        if not self._ready:
            await self._conn.call(
                ("SET", self.key, self.initial, b"NX"),
                "initial SET NX of counter",
                idempotent=True,
                table=self.name,
            )
            self._ready = True

    def increment(self, by: int = 1) -> Awaitable[int]:
        """INCRBY (not retried: it may have run); awaited, the new value.  IntegerOverflowError
        past 64 bits (the translation of the server's refusal)."""
        if not self._ready:
            return self._first_increment(by)
        one = by == 1
        reply: Awaitable[int] = self._conn.call(
            self._incr_one if one else ("INCRBY", self.key, by),
            "counter",
            idempotent=False,
            table=self.name,
            packed=self._incr_one_packed if one else None,
        )
        return reply  # INCRBY answers an integer: the connector's awaitable, no frame of ours

    async def _first_increment(self, by: int) -> int:
        await self._ensure()
        return await self.increment(by)

    async def get(self) -> int:
        """The current value (``initial`` until first written)."""
        await self._ensure()
        raw = await self._conn.call(("GET", self.key), "counter", idempotent=True, table=self.name)
        if raw.__class__ is int:
            return int(raw)
        if raw is None:
            return 0
        text = bytes(raw)
        if not text.lstrip(b"-").isdigit():
            raise BackendResponseError(f"counter {self.name!r} holds {text[:40]!r}, not an integer")
        return int(text)

    async def set(self, value: int) -> None:
        """SET the value."""
        await self._conn.call(("SET", self.key, value), "counter", idempotent=True, table=self.name)
        self._ready = True

    async def compare_and_set(self, expected: int, new: int) -> bool:
        """Atomic (Lua) compare-and-set; a missing counter compares as 0."""
        await self._ensure()
        n = await self._conn.script(
            COUNTER_CAS, (self.key,), (expected, new), "counter", idempotent=False, table=self.name
        )
        return bool(n)
