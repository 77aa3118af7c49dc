"""Per-key locks of the cache: the stampede lock of ``Cache.get_or_compute`` (one computation per
key per host, or per cluster on Redis) and, on the table backend, the write lock that makes a
key's row and file change together.  Each has a lease, so a crashed holder never blocks the others
for long.

* ``ShmLock`` (table backend): a row per key in a shared table, whose one INT column holds the
  owner's pid and lease deadline packed in one word, taken with compare-and-set.  A dead owner's
  lock (pid gone) is taken over at once; a live owner's after its deadline.
* ``RedisLock`` (redis, tiered): ``SET key token NX PX lease``, renewed and released by scripts
  that check the token first.
* ``CasLock`` (any other backend, e.g. memcached): the same packed word through
  ``Store.compare_and_set``, with a random tag instead of the pid (owners may be other hosts);
  as atomic as the backend's compare-and-set.

Each has the same three coroutines: ``acquire(name)`` (a token when the caller now holds
``name``, ``NO_LOCK`` to go on unlocked, else ``None``: someone else holds it), ``renew(name,
token)`` (the possibly new token, or ``None`` if the lock was lost) and ``release(name, token)``
(gives it up if the caller still holds it).  A computer renews its lease while ``fn`` runs; a lock
row is deleted on release.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from typing import TYPE_CHECKING, Any

from zeal_asgi._redis.scripts import LOCK_ACQUIRE, LOCK_RELEASE, LOCK_RENEW
from zeal_asgi.errors import TableFullError
from zeal_asgi.shm.lease import TAG_BITS, Lease, pack, unpack
from zeal_asgi.store import Key, Store, StoreBackendKind

if TYPE_CHECKING:
    from zeal_asgi.shm import Table

_EPOCH_MS = 1_704_067_200_000  # 2024-01-01: keeps wall-clock deadlines within 41 bits for decades

NO_LOCK: Any = object()
"""Returned by ``acquire`` when no lock could be recorded (lock table full): compute unlocked."""


def _wall_ms() -> int:
    return int(time.time() * 1000) - _EPOCH_MS


def lock_for(store: Store, table: str, namespace: str, lease: float) -> Lock:
    """The lock of the Store's backend: shared memory, Redis, or compare-and-set rows."""
    if store.kind is StoreBackendKind.TABLE:
        return ShmLock(store.table(table), lease)
    if store.backend.redis_link() is not None:  # through the Store: a breaker still guards it
        return RedisLock(store, namespace, lease)
    return CasLock(store, table, lease)


class ShmLock:
    """Host-wide lock rows in a shared table (``owner`` INT(8) column): one shared-memory lease
    per key (:class:`~zeal_asgi.shm.lease.Lease`)."""

    def __init__(self, table: Table, lease: float) -> None:
        self.table = table
        self.lease = Lease(table, lease)

    async def acquire(self, name: str) -> Any:
        """Take the lock if free, or if its owner died or let its lease run out."""
        return self.take(name)

    async def hold(self, name: Key) -> Any:
        """Wait for the lock and return its token (for locks held for microseconds: a live
        holder is about to give it back, a dead one is replaced at once)."""
        delay = 0.0001
        while (token := self.take(name)) is None:
            await asyncio.sleep(delay)
            delay = min(2 * delay, 0.01)
        return token

    def take(self, name: Key) -> Any:
        """``acquire`` without awaiting."""
        try:
            return self.lease.acquire(name)
        except TableFullError:
            return NO_LOCK

    async def renew(self, name: str, token: Any) -> Any:
        """Move the deadline forward (a new packed word)."""
        return self.lease.renew(name, token)

    async def release(self, name: str, token: Any) -> None:
        """Delete the row if it is still ours."""
        self.give(name, token)

    def give(self, name: Key, token: Any) -> None:
        """``release`` without awaiting."""
        if token is not NO_LOCK:
            self.lease.release(name, token, delete=True)

    def sweep(self) -> int:
        """Delete rows left by owners that died (a released lock deletes its own row)."""
        owners = [(name, row["owner"]) for name, row in self.table.items()]
        return sum(self.table.delete_if(k, "owner", w) for k, w in owners if Lease.stale(w))


class CasLock:
    """Lock rows through ``Store.compare_and_set`` (backends without Lua or shared memory)."""

    def __init__(self, store: Store, table: str, lease: float) -> None:
        self.store = store
        self.table_name = table
        self.lease_ms = max(1, int(lease * 1000))
        self._tag = secrets.randbits(TAG_BITS)

    async def acquire(self, name: str) -> Any:
        """Take the lock if free or if its lease ran out."""
        now = _wall_ms()
        token = pack(now + self.lease_ms, self._tag)
        cas = self.store.compare_and_set
        if await cas(self.table_name, name, "owner", 0, token):
            return token
        current = await self.store.get_strict(self.table_name, name, "owner") or 0
        stale = not current or unpack(current)[0] < now
        won = stale and await cas(self.table_name, name, "owner", current, token)
        return token if won else None

    async def renew(self, name: str, token: Any) -> Any:
        """Move the deadline forward."""
        new = pack(_wall_ms() + self.lease_ms, self._tag)
        ok = await self.store.compare_and_set(self.table_name, name, "owner", token, new)
        return new if ok else None

    async def release(self, name: str, token: Any) -> None:
        """Delete the row if it is still ours."""
        if await self.store.get_strict(self.table_name, name, "owner") == token:
            await self.store.delete(self.table_name, name)


class RedisLock:
    """``SET NX PX`` locks through ``Store.eval`` (the backend prefixes the key)."""

    def __init__(self, store: Store, namespace: str, lease: float) -> None:
        self.store = store
        self.namespace = namespace
        self.lease_ms = max(1, int(lease * 1000))
        self._owner = f"{socket.gethostname()}:{os.getpid()}:"

    def _key(self, name: str) -> str:
        return f"{self.namespace}:lock:{name}"

    async def acquire(self, name: str) -> Any:
        """Take the lock if nobody holds it (Redis expires a crashed owner's lease)."""
        token = self._owner + secrets.token_hex(8)
        ok = await self.store.eval(LOCK_ACQUIRE.source, [self._key(name)], [token, self.lease_ms])
        return token if ok else None

    async def renew(self, name: str, token: Any) -> Any:
        """Extend the lease if the lock is still ours."""
        reply = await self.store.eval(LOCK_RENEW.source, [self._key(name)], [token, self.lease_ms])
        return token if reply else None

    async def release(self, name: str, token: Any) -> None:
        """Delete the lock if it is still ours."""
        await self.store.eval(LOCK_RELEASE.source, [self._key(name)], [token])


Lock = ShmLock | CasLock | RedisLock
"""The stampede lock of one backend (see the module doc for what its methods do)."""
