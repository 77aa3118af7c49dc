"""Waiting for a lease, renewing it while the holder runs, and giving it back.

A scope (:mod:`zeal_asgi.locks.host`, :mod:`zeal_asgi.locks.cluster`) takes, renews and releases
a lease in one attempt each; :class:`Locker` makes locks of them.  Coroutines of one process
that want one lock queue in order, and only the first of them polls the scope; on a scope whose
attempts never wait (shared memory), a free lock is taken and given back without an await.  A
held lease is renewed at a third of its ttl by one timer per event loop; when a renewal finds
the lease gone, or none succeeds before the lease would have expired, the lease is lost and the
holder's task is cancelled (:class:`LockContext` then raises LockLostError).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import random
import threading
import weakref
from contextvars import ContextVar
from typing import TYPE_CHECKING, Any, Protocol

from zeal_asgi.errors import BackendError, LockLostError, LockTimeoutError, ZealError
from zeal_asgi.store.base import count

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine
    from types import TracebackType

__all__ = ["Immediate", "LockContext", "LockLease", "Locker", "Scope"]

log = logging.getLogger("zeal_asgi.locks")
_INF = float("inf")
_Waiters = collections.deque[asyncio.Future[None]]
_Key = tuple[Any, "Scope", str]  # (event loop, scope, name)
_current_task = asyncio.current_task
_thread = threading.get_ident
# (loop, task) of the task that last took a lock, kept in the task's context: on Python 3.11,
# asyncio.current_task() makes a getpid system call (it checks the running loop was not
# inherited through fork), the largest single cost of an uncontended host lock.  Tasks a task
# starts copy its context, so the task kept counts only while its coroutine runs in this
# thread: it is then the task running this code (a thread can run a loop in a copy of a task's
# context while that task runs).  (A weak reference: the context must not keep the task.)
_Here = tuple[Any, "weakref.ref[asyncio.Task[Any]]", int]
_here: ContextVar[_Here] = ContextVar("zeal_asgi.locks.here")


def _forked() -> None:
    global _here
    _here = ContextVar("zeal_asgi.locks.here")  # a forked child runs no task of its parent


os.register_at_fork(after_in_child=_forked)


def _ms(ttl: float) -> int:
    """A ttl in whole milliseconds, at least one."""
    return int(ttl * 1000 + 0.5) or 1


def _look_up() -> tuple[Any, asyncio.Task[Any] | None]:
    """``(event loop, task)`` of the running coroutine (``task`` None outside a task), kept."""
    task = _current_task()
    if task is None:
        return asyncio.get_running_loop(), None
    loop = task.get_loop()
    _here.set((loop, weakref.ref(task), _thread()))
    return loop, task


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


class LockLease:
    """A held lock.  ``token`` is its fencing token: strictly greater than the token of every
    earlier holder of ``name`` in its scope, so a resource that remembers the highest token it
    has seen can refuse a holder that lost the lock without knowing it."""

    __slots__ = (
        "_cancelling", "_handle", "_key", "_renew_at", "_renewal", "_task", "lost", "name",
        "token", "ttl",
    )  # fmt: skip

    def __init__(
        self,
        key: _Key,
        ttl: float,
        grant: tuple[int, Any],
        task: asyncio.Task[Any] | None,
    ) -> None:
        self._key, self.name = key, key[2]
        self.token, self._handle = grant
        self.ttl = ttl
        self.lost = False
        """True once the lease could not be renewed: another holder may have the lock."""
        self._task: asyncio.Task[Any] | None = task  # cancelled when the lease is lost
        self._cancelling = task.cancelling() if task is not None else 0
        self._renew_at = key[0].time() + ttl / 3  # valid until two thirds of the ttl later
        self._renewal: asyncio.Task[None] | None = None

    @property
    def scope(self) -> str:
        """``"host"`` or ``"cluster"``."""
        scope: Scope = self._key[1]
        return scope.name

    def __repr__(self) -> str:
        state = "lost" if self.lost else "held"
        return f"<LockLease {self.name!r} scope={self.scope} token={self.token} {state}>"


class Locker:
    """Locks over scopes: who of this process holds or polls for each lock, the coroutines
    queued behind it, and one renewal timer per event loop (it wakes when the first lease of
    that loop is due, and renews every lease held a third of its ttl)."""

    def __init__(self) -> None:
        # (loop, scope, name) -> the lease held, or None while a coroutine polls for it
        self._owners: dict[_Key, LockLease | None] = {}
        # the coroutines waiting behind the owner, in order
        self._waiters: dict[_Key, _Waiters] = {}
        self._timers: dict[Any, tuple[float, asyncio.TimerHandle]] = {}  # loop -> (when, timer)

    async def acquire(
        self, scope: Scope, name: str, ttl: float, wait: float | None, *, cancel: bool = True
    ) -> LockLease | None:
        """Wait up to ``wait`` s (``None``: no limit) for ``name``; ``None`` when it timed out.
        ``cancel``: a lost lease cancels the current task."""
        got = self.start(scope, name, ttl, wait, cancel=cancel)
        return got if type(got) is LockLease else await got  # type: ignore[misc]

    def start(
        self, scope: Scope, name: str, ttl: float, wait: float | None, *, cancel: bool = True
    ) -> LockLease | Coroutine[Any, Any, LockLease | None]:
        """:meth:`acquire` without a coroutine when it need not wait: the lease when nobody of
        this process wants ``name`` and an immediate scope grants it at once, else the
        coroutine that waits for it (to be awaited at once)."""
        here = _here.get(None)
        task = None if here is None else here[1]()
        try:
            if (
                task is not None
                and here[2] == _thread()  # type: ignore[index]
                and task.get_coro().cr_running  # type: ignore[union-attr]
            ):
                loop = here[0]  # type: ignore[index]
            else:
                loop, task = _look_up()
        except AttributeError:  # the task of a coroutine that is not a native one
            loop, task = _look_up()
        key = (loop, scope, name)
        ms = _ms(ttl)
        holder = task if cancel else None
        owners = self._owners
        if key in owners:
            return self._wait(key, ttl, ms, wait, holder, queued=True)
        now = scope.immediate
        if now is not None:
            try:
                grant = now.take(name, ms)
            except ZealError:  # the scope's own attempt (in _wait) says why
                grant = (0, None)
            if grant[0] > 0:
                return self._hold(key, ttl, grant, holder)
        owners[key] = None  # ours to poll for: nobody else of this process wants it
        return self._wait(key, ttl, ms, wait, holder, queued=False)

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

    def _hold(
        self, key: _Key, ttl: float, grant: tuple[int, Any], task: asyncio.Task[Any] | None
    ) -> LockLease:
        """The lease of ``grant``, renewed by its event loop's timer from now on."""
        lease = self._owners[key] = LockLease(key, ttl, grant, task)
        timer = self._timers.get(key[0])
        if timer is None or lease._renew_at < timer[0]:  # else that timer wakes before it's due
            self._arm(key[0], lease._renew_at)
        return lease

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

    def _next(self, key: _Key) -> None:
        """The owner of ``key`` is done: the next waiting coroutine of this process goes on."""
        self._owners.pop(key, None)
        if self._waiters:
            self._hand_on(key)

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

    def release_now(self, lease: LockLease, scope: Immediate) -> None:
        """:meth:`release` on a scope that never waits."""
        if lease._renewal is not None:
            lease._renewal.cancel()
        try:
            if not lease.lost:
                scope.give(lease.name, lease._handle)
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


class LockContext:
    """``async with zeal.lock(...) as lease``: the :class:`LockLease` inside the block."""

    __slots__ = ("_lease", "_locker", "_name", "_resolve", "_scope", "_timeout", "_ttl")

    def __init__(
        self,
        locker: Locker,
        resolve: Callable[[str], Scope] | None,
        scope: str | Scope,
        name: str,
        ttl: float,
        timeout: float | None,
    ) -> None:
        """``scope``: the scope, or its name for ``resolve`` to find when the block starts (the
        store's backend is known by then)."""
        self._locker, self._resolve, self._name = locker, resolve, name
        self._scope: Any = scope
        self._ttl, self._timeout = ttl, timeout
        self._lease: LockLease | None = None

    async def __aenter__(self) -> LockLease:
        scope: Scope = self._scope if self._resolve is None else self._resolve(self._scope)
        got = self._locker.start(scope, self._name, self._ttl, self._timeout)
        lease = got if type(got) is LockLease else await got  # type: ignore[misc]
        if lease is None:
            raise LockTimeoutError(
                f"zeal.lock({self._name!r}, scope={scope.name!r}) not obtained within "
                f"{self._timeout:g} s"
            )
        self._lease = lease
        return lease

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        lease, self._lease = self._lease, None
        if lease is None:
            return
        now = lease._key[1].immediate
        if now is not None:
            self._locker.release_now(lease, now)  # no await: nothing to wait for
        else:
            await self._locker.release(lease)
        if not lease.lost:
            return
        task = lease._task  # cancelled by the loss (it held the lease, so it was not done)
        if task is not None and task.uncancel() > lease._cancelling:
            return  # cancelled from outside as well: that cancellation goes on
        if exc_type is None or issubclass(exc_type, asyncio.CancelledError):
            raise LockLostError(
                f"zeal.lock({lease.name!r}, scope={lease.scope!r}) lost its lease while the "
                "block ran (not renewed in time): the block was cancelled"
            ) from exc
