"""Cluster-scope locks: a Redis lease per name, taken, renewed and released by Lua scripts.

Keys and scripts are in :mod:`zeal_asgi._redis.scripts` (``LOCK_FENCED_ACQUIRE``,
``LOCK_RENEW``, ``LOCK_RELEASE``, ``LOCK_CLAIM``).  The lease holds a random owner id, so
renewing and releasing only ever touch our own lease; the scripts are safe to run twice, so the
link may retry them (``LOCK_CLAIM`` excepted: a retried claim would find its own mark).
"""

from __future__ import annotations

import asyncio
import logging
import secrets
from typing import TYPE_CHECKING, Any

from zeal_asgi._redis.scripts import LOCK_CLAIM, LOCK_FENCED_ACQUIRE, LOCK_RELEASE, LOCK_RENEW
from zeal_asgi.errors import BackendError

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink

log = logging.getLogger("zeal_asgi.locks")
_releasing: set[asyncio.Task[None]] = set()  # releases that outlive a cancelled caller


class ClusterLocks:
    """Leases, fencing tokens and marks of cluster-scope locks on one Redis link."""

    name = "cluster"
    immediate = None  # every attempt is a round trip to Redis
    poll = 0.05
    """Longest sleep between two attempts of a waiter."""

    def __init__(self, link: RedisLink) -> None:
        self.link = link

    def _key(self, name: str, suffix: bytes = b"") -> bytes:
        # The name is a hash tag: a lease, its fence and its mark share one Cluster slot.
        return self.link.layout.key("lock", "{" + name + "}") + suffix

    async def acquire(self, name: str, ttl_ms: int) -> tuple[int, str] | None:
        """``(token, owner id)`` if ``name`` was free, else ``None``."""
        owner = secrets.token_hex(16)
        keys = [self._key(name), self._key(name, b":fence")]
        token = await self.link.run_script(
            LOCK_FENCED_ACQUIRE, keys, [owner, ttl_ms], what="zeal.lock", idempotent=True
        )
        return (int(token), owner) if token else None

    async def renew(self, name: str, owner: str, ttl_ms: int) -> str | None:
        """``owner`` while the lease is still ours (its ttl restarted), else ``None``."""
        ok = await self.link.run_script(
            LOCK_RENEW, [self._key(name)], [owner, ttl_ms], what="zeal.lock renew", idempotent=True
        )
        return owner if ok else None

    async def release(self, name: str, owner: str, ttl_ms: int) -> None:
        """Delete the lease if it is ours.  Runs to the end even when the caller is cancelled
        (redis-py#3847: a cancelled release must not leave the lock held); a failure leaves
        the lease to expire after its ttl."""
        task = asyncio.ensure_future(self._release(name, owner))
        _releasing.add(task)
        task.add_done_callback(_releasing.discard)
        await asyncio.shield(task)

    async def _release(self, name: str, owner: str) -> None:
        try:
            await self.link.run_script(
                LOCK_RELEASE, [self._key(name)], [owner], what="zeal.lock release", idempotent=True
            )
        except BackendError as exc:
            log.warning("zeal.lock(%r): release failed, the lease expires by itself: %s", name, exc)

    async def claim(self, name: str, mark: int) -> bool:
        """Raise the mark of ``name`` to ``mark`` if it is below; ``True`` when it rose."""
        args: list[Any] = [mark]
        key = [self._key(name, b":mark")]
        return bool(await self.link.run_script(LOCK_CLAIM, key, args, what="zeal.lock claim"))
