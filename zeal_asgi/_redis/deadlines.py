"""Time limits of the fast path's calls: one timer per event loop, not one per call.

``asyncio.timeout`` allocates a context manager and a timer handle for every call (several
microseconds each time, on every command).  :class:`Deadlines` keeps the in-flight calls of one
loop in a set and arms a single timer at the earliest limit; when it fires, every call past its
limit gets its task cancelled, exactly as ``asyncio.timeout`` would, and the timer is re-armed
for the next limit.  A call costs a set insert and removal; the timer is touched only when a
call needs an earlier wake-up than the one armed (rare: every call's limit is about ``now +
socket_timeout``).

The caller turns the cancellation into its timeout error when :attr:`Limit.expired` is set and
``task.uncancel()`` leaves no other cancellation pending (see ``_redis_direct.direct_call``).
"""

from __future__ import annotations

import asyncio
import math
from typing import Any

__all__ = ["Deadlines", "Limit"]

_RESOLUTION = 0.001


class Limit:
    """One call's time limit (loop time) and whether it expired."""

    __slots__ = ("expired", "task", "when")

    def __init__(self, task: asyncio.Task[Any], when: float) -> None:
        self.task = task
        self.when = when
        self.expired = False


class Deadlines:
    """The in-flight limits of one event loop and its one timer."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._live: set[Limit] = set()
        self._handle: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    def start(self, task: asyncio.Task[Any], when: float) -> Limit:
        """Watch ``task`` until :meth:`end`; cancel it at ``when`` (loop time)."""
        limit = Limit(task, when)
        self._live.add(limit)
        if when < self._armed_at:
            self._arm(when)
        return limit

    def end(self, limit: Limit) -> None:
        """Stop watching (the timer stays armed: it finds nothing, or later calls)."""
        self._live.discard(limit)

    def _arm(self, when: float) -> None:
        if self._handle is not None:
            self._handle.cancel()
        self._armed_at = when
        self._handle = self._loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._armed_at = math.inf
        # timers may fire up to a clock tick early (libuv counts milliseconds): a limit that
        # close is due now, as asyncio.timeout's own handle would be
        due = self._loop.time() + _RESOLUTION
        nearest = math.inf
        for limit in list(self._live):
            if limit.when <= due:
                self._live.discard(limit)
                limit.expired = True
                limit.task.cancel()
            elif limit.when < nearest:
                nearest = limit.when
        if nearest < math.inf:
            self._arm(nearest)

    def close(self) -> None:
        """Cancel the timer (the loop is done with this connector)."""
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
        self._armed_at = math.inf
        self._live.clear()
