"""Waiting for a lease, renewing it while the holder runs, and giving it back.

A scope (:mod:`zeal_asgi.locks.host`, :mod:`zeal_asgi.locks.cluster`) takes, renews and releases
a lease in one attempt each; :class:`Locker` makes locks of them.  Coroutines of one process
that want one lock queue in order, and only the first of them polls the scope; on a scope whose
attempts never wait (shared memory), a free lock is taken and given back without an await, in
compiled code (:mod:`zeal_asgi.locks._fast`: the lease, the owner entry, the context).  A
held lease is renewed at a third of its ttl by one timer per event loop; when a renewal finds
the lease gone, or none succeeds before the lease would have expired, the lease is lost and the
holder's task is cancelled (:class:`LockContext` then raises LockLostError).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import random
from typing import Any, Protocol

from zeal_asgi.errors import BackendError
from zeal_asgi.locks._fast import LockContext, LockerBase, LockLease
from zeal_asgi.store.base import count

__all__ = ["Immediate", "LockContext", "LockLease", "Locker", "Scope"]

log = logging.getLogger("zeal_asgi.locks")
_INF = float("inf")
_Waiters = collections.deque[asyncio.Future[None]]
_Key = tuple[Any, "Scope", str]  # (event loop, scope, name)


def _ms(ttl: float) -> int:
    """A ttl in whole milliseconds, at least one."""
    return int(ttl * 1000 + 0.5) or 1


class Immediate(Protocol):
    """The attempts of a scope that never wait (shared memory), called without a coroutine."""

    def take(self, key: str, ms: int) -> tuple[int, Any]:
        """``(fencing token, handle)``; a token below 1 when not taken (the scope's
        :meth:`Scope.acquire` then decides, e.g. finding the holder dead)."""
        ...

    def give(self, key: str, word: Any) -> Any:
        """Give the lease up if ``word`` (a handle) still holds it."""
        ...


class Scope(Protocol):
    """Where leases live: one attempt per call, never waiting."""

    name: str
    poll: float
    """Longest sleep between two attempts of a waiter."""

    @property
    def immediate(self) -> Immediate | None:
        """Its attempts without a coroutine when they never wait, else ``None``."""
        ...

    async def acquire(self, name: str, ttl_ms: int) -> tuple[int, Any] | None:
        """``(fencing token, handle)`` when ``name`` was free, else ``None``."""
        ...

    async def renew(self, name: str, handle: Any, ttl_ms: int) -> Any:
        """The (possibly new) handle while the lease is ours, else ``None``."""
        ...

    async def release(self, name: str, handle: Any, ttl_ms: int) -> None:
        """Give the lease up if ``handle`` still holds it."""
        ...

    async def claim(self, name: str, mark: int) -> bool:
        """Raise the mark kept with ``name`` to ``mark`` if it is below; ``True`` if it rose."""
        ...


class Locker(LockerBase):
    """Locks over scopes: who of this process holds or polls for each lock, the coroutines
    queued behind it, and one renewal timer per event loop (it wakes when the first lease of
    that loop is due, and renews every lease held a third of its ttl).  Taking a lock at once
    (``start``), holding it and giving it back at once (``release_now``) are compiled."""

    def __init__(self) -> None:
        self._owners = {}  # (loop, scope, name) -> the lease held, or None while one polls for it
        self._waiters = {}  # the coroutines waiting behind the owner, in order
        self._timers = {}  # loop -> (when, timer)

    async def acquire(
        self, scope: Scope, name: str, ttl: float, wait: float | None, *, cancel: bool = True
    ) -> LockLease | None:
        """Wait up to ``wait`` s (``None``: no limit) for ``name``; ``None`` when it timed out.
        ``cancel``: a lost lease cancels the current task."""
        got = self.start(scope, name, ttl, wait, cancel=cancel)
        return got if type(got) is LockLease else await got  # type: ignore[misc]

    async def _wait(
        self,
        key: _Key,
        ttl: float,
        ms: int,
        wait: float | None,
        holder: asyncio.Task[Any] | None,
        *,
        queued: bool,
    ) -> LockLease | None:
        loop, scope, name = key
        deadline = None if wait is None else loop.time() + wait
        if queued and not await self._wait_turn(key, deadline):  # behind another coroutine
            return None
        try:
            grant = await scope.acquire(name, ms)
            delay = scope.poll / 16
            while grant is None:
                left = _INF if deadline is None else deadline - loop.time()
                if left <= 0:
                    self._next(key)
                    return None
                await asyncio.sleep(min(delay * (0.5 + random.random() / 2), left))
                delay = min(delay * 2, scope.poll)
                grant = await scope.acquire(name, ms)
        except BaseException:
            self._next(key)
            raise
        return self._hold(key, ttl, grant, holder)

    async def _wait_turn(self, key: _Key, deadline: float | None) -> bool:
        fut = key[0].create_future()
        waiters = self._waiters.setdefault(key, collections.deque())
        waiters.append(fut)
        try:
            async with asyncio.timeout_at(deadline):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._next(key)  # the turn came with the cancellation: pass it on
            elif fut in waiters:
                waiters.remove(fut)
            if isinstance(exc, TimeoutError):
                return False
            raise
        return True

    def _hand_on(self, key: _Key) -> None:
        waiters = self._waiters.get(key)
        while waiters:
            fut = waiters.popleft()
            if not fut.done():
                self._owners[key] = None  # its turn: it polls for the lock now
                fut.set_result(None)
                return
        self._waiters.pop(key, None)

    async def release(self, lease: LockLease) -> None:
        """Stop renewing ``lease`` and give it back (if not lost); the next waiter goes on."""
        scope = lease._key[1]
        now = scope.immediate
        if now is not None:
            return self.release_now(lease, now)
        if lease._renewal is not None:
            lease._renewal.cancel()
        try:
            if not lease.lost:
                await scope.release(lease.name, lease._handle, _ms(lease.ttl))
        finally:
            self._next(lease._key)

    # -- renewal ---------------------------------------------------------------------------------

    def _arm(self, loop: Any, when: float) -> None:
        """Wake ``loop``'s renewal timer at ``when`` (earlier than it was set, if it was)."""
        timer = self._timers.get(loop)
        if timer is not None:
            timer[1].cancel()
        self._timers[loop] = (when, loop.call_at(when, self._tick, loop))

    def _tick(self, loop: Any) -> None:
        del self._timers[loop]
        now, first = loop.time(), _INF
        for key, lease in list(self._owners.items()):
            if key[0] is not loop or lease is None or lease.lost or lease._renewal is not None:
                continue
            if lease._renew_at <= now:
                lease._renewal = loop.create_task(self._renew(lease))
            elif lease._renew_at < first:
                first = lease._renew_at
        if first < _INF:
            self._arm(loop, first)

    async def _renew(self, lease: LockLease) -> None:
        loop, scope, name = lease._key
        valid_until = lease._renew_at + lease.ttl * 2 / 3
        while True:
            sent = loop.time()
            try:
                # No answer before the lease would expire: it is as good as lost.  (A "still
                # yours", however late, proves nobody took it meanwhile.)
                async with asyncio.timeout(max(valid_until - sent, 0.001)):
                    handle = await scope.renew(name, lease._handle, _ms(lease.ttl))
            except (BackendError, TimeoutError) as exc:
                if loop.time() < valid_until - 0.001:
                    await asyncio.sleep(min(lease.ttl / 10, valid_until - sent) / 2)
                    continue  # the lease may still be ours: try again while it lasts
                return self._lose(lease, f"no renewal before it expired ({exc!r})")
            if handle is None:
                return self._lose(lease, "renewal found another holder or none")
            lease._handle = handle
            lease._renew_at = sent + lease.ttl / 3
            lease._renewal = None
            timer = self._timers.get(loop)
            if self._owners.get(lease._key) is lease and (
                timer is None or lease._renew_at < timer[0]
            ):
                self._arm(loop, lease._renew_at)
            return

    def _lose(self, lease: LockLease, why: str) -> None:
        lease.lost = True
        count("locks", "lost")
        log.warning("zeal.lock(%r, scope=%r) lost: %s", lease.name, lease.scope, why)
        if lease._task is not None and not lease._task.done():
            lease._task.cancel(f"zeal.lock({lease.name!r}) lost its lease")

    def forget(self, loop: Any) -> None:
        """Drop the state of an event loop that is closing."""
        if (timer := self._timers.pop(loop, None)) is not None:
            timer[1].cancel()
        self._owners = {k: v for k, v in self._owners.items() if k[0] is not loop}
        self._waiters = {k: v for k, v in self._waiters.items() if k[0] is not loop}
