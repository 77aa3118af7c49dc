"""``Zeal``: the app-level object that owns configuration, the store and their lifecycle.

Use ``FastAPI(lifespan=zeal.lifespan)`` (or ``Starlette(lifespan=...)``), or let
:class:`~zeal_asgi.ZealMiddleware` run it; ``async with zeal:`` works outside ASGI too.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import logging
import os
import weakref
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar, overload

from zeal_asgi.errors import BackendError, ZealError
from zeal_asgi.locks import LockContext, Locks
from zeal_asgi.messaging.pubsub import PubSub  # its import adds Store.stats()'s messaging section
from zeal_asgi.messaging.streams import Streams
from zeal_asgi.settings import ZealSettings
from zeal_asgi.shm.ext import Table
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.segments import held_segments, server_identity, verify_shared
from zeal_asgi.store import Store, StoreBackendKind, build_backend
from zeal_asgi.store.services import Service

_H = TypeVar("_H", bound=Callable[..., Any])
_J = TypeVar("_J", bound=Callable[[], Awaitable[Any]])
_A = TypeVar("_A", bound=Callable[..., Awaitable[Any]])

__all__ = ["NAMES_TABLE", "Service", "Zeal", "instances"]

log = logging.getLogger("zeal_asgi")

NAMES_TABLE = "__zeal_names__"
"""Shared table: segment file name -> the name of its table or counter.  Segment file names are
hashes, so ``zeal-asgi inspect`` reads the names here."""

_instances: weakref.WeakSet[Zeal] = weakref.WeakSet()


def instances() -> list[Zeal]:
    """Every ``Zeal`` alive in this process (the launcher checks them before starting workers)."""
    return list(_instances)


@functools.cache
def _names() -> Table:
    return Table(1024, {"name": ("string", 200)}, name=NAMES_TABLE, key_size=128)


def _record_names() -> None:
    """Write the name of every segment this process holds into :data:`NAMES_TABLE`."""
    for obj, path, _ in held_segments():
        if path is not None and obj.name:
            with contextlib.suppress(ZealError):  # a full directory only costs inspect names
                _names().set(os.path.basename(path), {"name": obj.name[:200]})


class Zeal:
    """Owns a :class:`Store` and the per-worker lifecycle of everything built on it.

    Example::

        zeal = Zeal()                     # ZEAL_* environment, table backend by default
        Store.make("demo_table", 128, {"score": (Store.TYPE_INT, 4)})
        app = FastAPI(lifespan=zeal.lifespan)
        app.add_middleware(ZealMiddleware, zeal=zeal)
    """

    def __init__(self, settings: ZealSettings | None = None, *, store: Store | None = None) -> None:
        self.settings = settings if settings is not None else ZealSettings.from_env()
        if store is None:
            store = Store.default()
            if settings is not None and store.kind is not self.settings.store_backend:
                store.use_backend(
                    build_backend(self.settings.store_backend, self.settings.backend_conn())
                )
        self.store = store
        _instances.add(self)
        # The host's event counters (and inspect's names) are allocated now, at import (in the
        # launcher's master), so every worker attaches to the same memory.
        host_stats()
        _names()
        self.services: list[Service] = []
        self.locks = Locks(self.store)
        """Locks, leader election and jobs (:meth:`lock`, :meth:`is_leader`, :meth:`every`)."""
        self.add_service(self.locks)
        self._depth = 0
        self._started_services: list[Service] = []

    @property
    def started(self) -> bool:
        """True between startup and shutdown in this worker."""
        return self._depth > 0

    def add_service(self, service: Service) -> None:
        """Run ``service`` in every worker: started at startup, stopped at shutdown."""
        self.services.append(service)

    async def startup(self) -> None:
        """Per-worker start: checks the shared memory, opens connections, starts services, and
        (``gc_freeze``, once per process) freezes what is alive then out of the collector's way.

        Idempotent (nested calls are counted), so the lifespan and the middleware may both call it.
        """
        self._depth += 1
        if self._depth > 1:
            return
        try:
            for warning in verify_shared():
                log.warning("%s", warning)
            await self._start_store()
            for service in self.services:
                await service.start()
                self._started_services.append(service)
        except BaseException:
            self._depth = 0
            await self._stop()  # a boot that fails leaves no service running, no connection open
            raise
        _record_names()
        if self.settings.gc_freeze and gc.get_freeze_count() == 0:
            # Once per process. What is alive now (modules, routes, models, tables) lives as
            # long as the worker, and requests that wait across an await (a Redis round trip)
            # survive young collections, so full ones come often and each walked all of it:
            # about a sixth of a Redis-backed route's worker CPU under load. Garbage goes
            # first, so none of it is kept for good.
            gc.collect()
            gc.freeze()
        ident = server_identity()
        log.info(
            "zeal_asgi: worker %d up on the %s backend (server %s, %s)",
            os.getpid(),
            self.store.kind,
            ident.server_id,
            ident.how,
        )

    async def _start_store(self) -> None:
        try:
            await self.store.start()
        except BackendError as exc:  # the table backend has nothing to reach
            memcached = self.store.kind is StoreBackendKind.MEMCACHED
            setting = "ZEAL_MEMCACHED_SERVERS" if memcached else "ZEAL_REDIS_URL"
            raise type(exc)(
                f"{exc} (check {setting}; with ZEAL_ON_ERROR=fallback_table the app boots "
                "degraded instead)"
            ) from exc

    async def check_backend(self) -> None:
        """Connect to the backend once and close again: the launcher's boot check.

        Raises:
            BackendError: the backend is unreachable (naming the setting to check), unless the
                circuit breaker is on, which boots degraded instead.
        """
        await self._start_store()
        await self.store.aclose()

    async def _stop(self) -> None:
        """Stop the started services (last started first), then close the connections."""
        while self._started_services:
            service = self._started_services.pop()
            try:
                await service.stop()
            except Exception:  # one failing service must not keep the others running
                log.exception("zeal_asgi: stopping %r failed", service)
        await self.store.aclose()

    async def shutdown(self) -> None:
        """Per-worker stop: services, then connections."""
        if self._depth > 0:
            self._depth -= 1
            if self._depth == 0:
                await self._stop()

    @contextlib.asynccontextmanager
    async def lifespan(self, app: Any = None) -> AsyncIterator[dict[str, Any]]:
        """ASGI lifespan: ``FastAPI(lifespan=zeal.lifespan)``; puts ``zeal`` in request.state."""
        async with self:
            yield {"zeal": self}

    async def __aenter__(self) -> Zeal:
        await self.startup()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.shutdown()

    def stats(self) -> dict[str, Any]:
        """Store counters of this worker."""
        return self.store.stats()

    @functools.cached_property
    def pubsub(self) -> PubSub:
        """The per-worker pub/sub subscriber of this app (a service, made on first use)."""
        pubsub = PubSub(self.store)
        self.add_service(pubsub)
        return pubsub

    @overload
    def subscribe(
        self, channel: str, handler: None = None, **options: Any
    ) -> Callable[[_H], _H]: ...
    @overload
    def subscribe(self, channel: str, handler: _H, **options: Any) -> _H: ...
    def subscribe(self, channel: str, handler: Any = None, **options: Any) -> Any:
        """Run ``handler(payload, channel)`` in every worker (decorator without ``handler``).

        See :meth:`zeal_asgi.messaging.pubsub.PubSub.subscribe` for the options.
        """
        self.pubsub.prepare()
        return self.pubsub.subscribe(channel, handler, **options)

    @functools.cached_property
    def streams(self) -> Streams:
        """The per-worker reliable (Streams) consumers of this app (a service, made on use)."""
        streams = Streams(self.store)
        self.add_service(streams)
        return streams

    @overload
    def subscribe_reliable(
        self, stream: str, handler: None = None, **options: Any
    ) -> Callable[[_H], _H]: ...
    @overload
    def subscribe_reliable(self, stream: str, handler: _H, **options: Any) -> _H: ...
    def subscribe_reliable(self, stream: str, handler: Any = None, **options: Any) -> Any:
        """At-least-once ``handler(payload, entry) -> bool`` on a Redis Stream (or decorator).

        See :meth:`zeal_asgi.streams.Streams.subscribe` for ``group``, ``consumer`` and the rest.
        """
        return self.streams.subscribe(stream, handler, **options)

    # -- locks, leader election, jobs (zeal_asgi.locks) -------------------------------------------

    def lock(
        self, name: str, ttl: float, scope: str = "host", timeout: float | None = None
    ) -> LockContext:
        """A lock for ``async with``, yielding a lease whose ``token`` is a fencing token.

        ``scope="host"``: one holder among the workers of this server (shared memory; a holder
        that dies frees it at once); ``"cluster"``: one among every server on the Redis of the
        redis or tiered backend.  The lease lasts ``ttl`` seconds and is renewed while the block
        runs; when it cannot be renewed the block is cancelled and LockLostError raised.
        ``timeout``: seconds to wait (``None``: no limit), then LockTimeoutError.  Not
        re-entrant.

        Example::

            async with zeal.lock("reindex", ttl=30, scope="cluster") as lease:
                await index.rebuild(fence=lease.token)
        """
        return self.locks.lock(name, ttl, scope, timeout)

    async def is_leader(self, scope: str = "host") -> bool:
        """True while this worker is the one leader of ``scope`` (``host`` or ``cluster``).

        The first call makes this worker a candidate (it then campaigns in the background);
        when the leader dies (host: at once) or stops answering (after ``LEADER_TTL`` s)
        another worker leads.
        """
        return await self.locks.is_leader(scope)

    @overload
    def leader_only(self, fn: _A, *, scope: str = "host") -> _A: ...
    @overload
    def leader_only(self, fn: None = None, *, scope: str = "host") -> Callable[[_A], _A]: ...
    def leader_only(self, fn: Any = None, *, scope: str = "host") -> Any:
        """Decorate an async function so that only the leader of ``scope`` runs it; on the
        other workers a call returns ``None``.  ``@zeal.leader_only`` or
        ``@zeal.leader_only(scope="cluster")``."""
        if fn is None:
            return functools.partial(self.locks.leader_only, scope=scope)
        return self.locks.leader_only(fn, scope)

    def every(
        self,
        seconds: float,
        *,
        name: str | None = None,
        scope: str = "host",
        jitter: float = 0.0,
        run_at_start: bool = False,
    ) -> Callable[[_J], _J]:
        """Decorate an async function to run once every ``seconds`` per ``scope`` in total,
        whichever worker (or server) runs it.

        Periods start on multiples of ``seconds`` of the wall clock; a run never overlaps the
        previous one; when the worker running it dies another one runs the next period.
        ``name`` (default: module and qualified name) identifies the job across workers and
        servers; ``jitter``: up to that many seconds of random delay after the period starts;
        ``run_at_start``: also run at startup, unless this period ran already.  Runs, failures
        and the last start and duration appear in ``/health/store``.
        """

        def register(fn: _J) -> _J:
            self.locks.every(
                fn, seconds, name=name, scope=scope, jitter=jitter, run_at_start=run_at_start
            )
            return fn

        return register
