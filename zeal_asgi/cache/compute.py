"""``get_or_compute``: one computation per key under a stampede, the others wait for its value.

The first caller to take the key's lock (see :mod:`zeal_asgi.cache.lock`) checks the cache
again, runs ``fn``, stores the value and releases the lock; its lease is renewed while ``fn``
runs.  Every other caller polls the cache with a growing backoff (2 ms to 50 ms, jittered) and
returns the value as soon as it appears; when the lock is free again without a value (``fn``
raised, or the value could not be stored) the next caller computes.  A waiter gives up with
LockTimeoutError after ``max_wait`` seconds.
"""

from __future__ import annotations

import asyncio
import inspect
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any

from zeal_asgi.cache.lock import NO_LOCK, Lock
from zeal_asgi.cache.tiers import Tiers, memory_key
from zeal_asgi.errors import LockTimeoutError


async def _renew(lock: Lock, name: str, holder: list[Any], every: float) -> None:
    while True:
        await asyncio.sleep(every)
        token = await lock.renew(name, holder[0])
        if token is None:
            return  # lost it (our lease ran out while we were stalled): nothing to keep
        holder[0] = token


async def compute_once(
    tiers: Tiers,
    key: str | bytes,
    fn: Callable[[], Any | Awaitable[Any]],
    ttl: float,
    max_wait: float,
) -> Any:
    """The cached value of ``key`` (valid: checked by the caller), computing it with ``fn`` at
    most once at a time."""
    found, value = await tiers.lookup(key)  # a str key's row is kept for the next hit
    if found:
        return value
    raw = key.encode() if isinstance(key, str) else key
    lock = tiers.bind().lock
    name = memory_key(raw)
    deadline = time.monotonic() + max_wait
    delay = 0.002
    while (token := await lock.acquire(name)) is None:
        left = deadline - time.monotonic()
        if left <= 0:
            tiers.count("compute_timeouts")
            raise LockTimeoutError(
                f"get_or_compute({raw!r:.60}): another worker has been computing it for more "
                f"than {max_wait} s (max_wait=)"
            )
        await asyncio.sleep(min(delay, left) * random.uniform(0.5, 1.0))
        delay = min(delay * 1.5, 0.05)
        found, value = await tiers.lookup(key, record=False)
        if found:
            tiers.count("stampede_blocked")
            return value
    holder = [token]
    renewer = None
    if token is NO_LOCK:
        tiers.count("lock_table_full")
    else:
        renewer = asyncio.create_task(_renew(lock, name, holder, tiers.lock_lease / 3))
    try:
        found, value = await tiers.lookup(key, record=False)
        if found:  # the previous holder stored it just before we took the lock
            tiers.count("stampede_blocked")  # another caller's computation served this one
            return value
        tiers.count("computations")
        result = fn()
        if inspect.isawaitable(result):
            result = await result
        await tiers.put(raw, tiers.encode(raw, result), ttl)
        return result
    finally:
        if renewer is not None:
            renewer.cancel()
            await asyncio.gather(renewer, return_exceptions=True)
        await lock.release(name, holder[0])
