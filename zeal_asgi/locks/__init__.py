"""Locks with fencing tokens, leader election and jobs that run once per period.

The app's :class:`~zeal_asgi.Zeal` serves them as ``zeal.lock``, ``zeal.is_leader``,
``zeal.leader_only`` and ``zeal.every``.  Two scopes:

- ``host``: the workers of one server, in shared memory (:mod:`zeal_asgi.locks.host`).  A
  holder that dies frees the lock at once; one that is stopped keeps it until its ttl.
- ``cluster``: every server on one Redis (the redis and tiered backends), a Redis lease
  renewed while the holder runs (:mod:`zeal_asgi.locks.cluster`).  On the table backend the
  host is the whole cluster, so ``cluster`` is ``host``; memcached has no cluster scope
  (UnsupportedOperationError).

Lock names are 1 to 100 UTF-8 bytes; names starting with ``zeal:`` are the package's own.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, TypeVar

from zeal_asgi.errors import (
    ConfigError,
    InvalidKeyError,
    InvalidTTLError,
    KeyTooLongError,
    KeyTypeError,
    ZealError,
)
from zeal_asgi.locks._fast import YEAR, LocksBase
from zeal_asgi.locks.cluster import ClusterLocks
from zeal_asgi.locks.host import host_locks
from zeal_asgi.locks.jobs import Job, job_stats, jobs_table, run_job
from zeal_asgi.locks.lock import LockContext, Locker, LockLease, Scope
from zeal_asgi.settings import StoreBackendKind
from zeal_asgi.store.base import Capability, seconds, unsupported

if TYPE_CHECKING:
    from zeal_asgi.store import Store

__all__ = ["LEADER_TTL", "LockContext", "LockLease", "Locks", "job_stats"]

log = logging.getLogger("zeal_asgi.locks")

_F = TypeVar("_F", bound=Callable[..., Awaitable[Any]])
SCOPES = ("host", "cluster")
LEADER_TTL = 10.0
"""Seconds a stopped (not dead) leader keeps leading; a live leader renews its lease."""
_LEADER = "zeal:leader"
_CAMPAIGN_EVERY = 1.0  # seconds between a follower's attempts to lead


def _name(name: object, what: str = "lock") -> str:
    if not isinstance(name, str):
        raise KeyTypeError(f"a {what} name is a str, got {type(name).__name__}")
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidKeyError(f"a {what} name must be encodable as UTF-8: {name!r}") from None
    if not name or size > 100:
        cls = KeyTooLongError if name else InvalidKeyError
        raise cls(f"a {what} name is 1 to 100 UTF-8 bytes, got {size}: {name[:40]!r}")
    if name.startswith("zeal:"):
        raise InvalidKeyError(f"{what} names starting with 'zeal:' are reserved: {name!r}")
    return name


def _seconds(value: object, what: str, *, zero: bool = False) -> float:
    """The Store's duration check with the locks' bound and error (``every``'s ``seconds``
    argument hides the function's name there)."""
    return seconds(what, value, YEAR, zero=zero, error=InvalidTTLError)


def _scope_name(scope: object) -> str:
    if scope not in SCOPES:
        raise ConfigError(f"scope is 'host' or 'cluster', got {scope!r}")
    return str(scope)


class Locks(LocksBase):
    """The locks, leadership and jobs of one app; a service of its :class:`~zeal_asgi.Zeal`
    (jobs and leader campaigns run in every worker between startup and shutdown).  ``lock()``
    is compiled for a host lock on a name checked before; ``_lock`` checks every other call."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.locker = Locker()
        self.host = host_locks()  # shared memory: made before workers start
        self.jobs: dict[str, Job] = {}
        self._cluster: ClusterLocks | None = None
        self._leases: dict[str, LockLease | None] = {}  # scope -> this worker's leadership
        self._tasks: set[asyncio.Task[None]] = set()
        self._names = set()

    def scope(self, scope: str) -> Scope:
        """The leases of ``scope`` on the store's backend."""
        if scope == "host":
            return self.host
        backend = self.store.backend
        link = backend.redis_link()
        if link is not None:
            if self._cluster is None or self._cluster.link is not link:
                self._cluster = ClusterLocks(link)
            return self._cluster
        if backend.kind is StoreBackendKind.TABLE:
            return self.host  # one host is the whole cluster
        raise unsupported(backend, "zeal.lock(scope='cluster')", Capability.EVAL)

    def _lock(
        self, name: str, ttl: float, scope: str = "host", timeout: float | None = None
    ) -> LockContext:
        """``lock()`` for the calls its compiled path does not make: every argument checked."""
        if type(name) is not str or name not in self._names:  # checked once per name
            if len(self._names) >= 1024:
                self._names.clear()
            self._names.add(_name(name))
        if type(ttl) not in (int, float) or not 0 < ttl <= YEAR:
            _seconds(ttl, "ttl")
        if timeout is not None:
            _seconds(timeout, "timeout", zero=True)
        if scope == "host":  # known now (the cluster scope depends on the backend started)
            return LockContext(self.locker, None, self.host, name, ttl, timeout)
        return LockContext(self.locker, self.scope, _scope_name(scope), name, ttl, timeout)

    # -- leadership ------------------------------------------------------------------------------

    async def is_leader(self, scope: str = "host") -> bool:
        """True while this worker leads ``scope`` (the first call joins the election)."""
        if _scope_name(scope) not in self._leases:
            self._leases[scope] = None
            try:
                await self._campaign(scope)
            except BaseException:
                del self._leases[scope]
                raise
            self._spawn(self._campaign_forever(scope))
        lease = self._leases.get(scope)
        return lease is not None and not lease.lost

    async def _campaign(self, scope: str) -> None:
        lease = self._leases.get(scope)
        if lease is None or lease.lost:
            target = self.scope(scope)
            self._leases[scope] = await self.locker.acquire(
                target, _LEADER, LEADER_TTL, 0.0, cancel=False
            )

    async def _campaign_forever(self, scope: str) -> None:
        while True:
            await asyncio.sleep(_CAMPAIGN_EVERY)
            try:
                await self._campaign(scope)
            except ZealError as exc:  # the backend is down: a lease held meanwhile is lost
                log.debug("zeal.is_leader(%r): campaign failed: %s", scope, exc)

    def leader_only(self, fn: _F, scope: str = "host") -> _F:
        """``fn`` run only by the worker that leads ``scope``; elsewhere a call returns None."""
        if not inspect.iscoroutinefunction(fn):
            raise ConfigError(f"leader_only wraps an async function, got {fn!r}")
        scope = _scope_name(scope)

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            return await fn(*args, **kwargs) if await self.is_leader(scope) else None

        return wrapper  # type: ignore[return-value]

    # -- jobs ------------------------------------------------------------------------------------

    def every(
        self,
        fn: Callable[[], Awaitable[Any]],
        seconds: float,
        *,
        name: str | None = None,
        scope: str = "host",
        jitter: float = 0.0,
        run_at_start: bool = False,
    ) -> None:
        """Declare a job: see :meth:`zeal_asgi.Zeal.every`."""
        if not inspect.iscoroutinefunction(fn):
            raise ConfigError(f"zeal.every runs an async function, got {fn!r}")
        period = _seconds(seconds, "zeal.every's period")
        if period < 0.001:
            raise InvalidTTLError(f"zeal.every's period is at least 0.001 s, got {seconds!r}")
        job_name = _name(f"{fn.__module__}.{fn.__qualname__}" if name is None else name, "job")
        if not (jitter == 0 or 0 < _seconds(jitter, "jitter") < period):
            raise InvalidTTLError(f"jitter is 0 <= jitter < the period ({period:g} s): {jitter}")
        if job_name in self.jobs:
            raise ConfigError(f"zeal.every: a job named {job_name!r} is declared already")
        jobs_table().incr(job_name, "runs", 0)  # made before workers start, listed at 0 runs
        job = Job(fn, job_name, period, _scope_name(scope), float(jitter), bool(run_at_start))
        self.jobs[job_name] = job

    # -- service ---------------------------------------------------------------------------------

    def _spawn(self, coro: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def start(self) -> None:
        """Start every job's loop in this worker (a scope the backend lacks fails the boot)."""
        for job in self.jobs.values():
            self.scope(job.scope)
        for job in self.jobs.values():
            self._spawn(run_job(job, self.locker, self.scope))

    async def stop(self) -> None:
        """Stop the jobs and campaigns; give up leadership so another worker takes it at once."""
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        leases = [lease for lease in self._leases.values() if lease is not None]
        self._leases.clear()
        for lease in leases:
            try:
                await self.locker.release(lease)
            except ZealError as exc:
                log.warning("zeal.is_leader: giving up leadership failed: %s", exc)
        self.locker.forget(asyncio.get_running_loop())
