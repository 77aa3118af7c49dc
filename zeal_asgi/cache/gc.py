"""The cache's periodic GC: a task in every worker, but only the holder of a host-wide lease
sweeps, so exactly one worker per host does the work.

The lease is a shared-memory lease (:mod:`zeal_asgi.shm.lease`) in the host's control table.
When its holder dies, the next worker to tick sees the pid gone and takes over; a holder that
stops renewing (hung) loses it at the deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import time
from collections.abc import Awaitable, Callable

from zeal_asgi.cache.keys import control_table
from zeal_asgi.shm.lease import Lease

log = logging.getLogger("zeal_asgi.cache")


class CacheGC:
    """A per-worker task: ``start()`` in the worker's event loop, ``stop()`` at shutdown.  It
    sweeps while it holds its cache's host-wide GC lease (row ``gc:<name>`` of the control
    table); with ``interval`` 0 it never starts."""

    def __init__(
        self, name: str, interval: float, sweep: Callable[[], Awaitable[dict[str, int]]]
    ) -> None:
        self.interval = interval
        self._row = f"gc:{name}"
        self._lease_seconds = max(3 * interval, interval + 2.0)
        self._token: int | None = None
        self._sweep = sweep
        self._task: asyncio.Task[None] | None = None
        self._last_error = 0.0

    def start(self) -> None:
        """Start ticking in the running event loop (idempotent)."""
        if not self.interval:
            return  # the GC is disabled (gc_interval_ms=0)
        task = self._task
        if task is not None and not task.done() and task.get_loop() is asyncio.get_running_loop():
            return
        # a task left on an event loop that has ended never runs again: replace it
        self._task = asyncio.create_task(self._run(), name="zeal-cache-gc")

    async def stop(self) -> None:
        """Cancel and await the task, and hand the lease on."""
        task, self._task = self._task, None
        if task is not None and not task.done():
            task.cancel()
            if task.get_loop() is asyncio.get_running_loop():
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        if self._token is not None:  # another worker takes over at its next tick
            self._lease().release(self._row, self._token)
            self._token = None

    def _lease(self) -> Lease:
        # made per use: the control table is made again when it was closed
        return Lease(control_table(), self._lease_seconds)

    def _hold(self) -> bool:
        """Take or renew the lease; ``True`` when this process holds it now."""
        lease = self._lease()
        if self._token is not None:
            self._token = lease.renew(self._row, self._token)
        if self._token is None:
            self._token = lease.acquire(self._row)
        return self._token is not None

    async def _run(self) -> None:
        while True:
            # jitter keeps the workers from all waking (and CASing) in the same millisecond
            await asyncio.sleep(self.interval * random.uniform(0.9, 1.1))
            try:
                if self._hold():
                    await self._sweep()
            except asyncio.CancelledError:
                raise
            except Exception:  # the GC must outlive a failed sweep (e.g. Redis briefly down)
                now = time.monotonic()
                if now - self._last_error > 60.0:
                    self._last_error = now
                    log.exception("zeal_asgi cache: GC sweep failed (retried next interval)")
