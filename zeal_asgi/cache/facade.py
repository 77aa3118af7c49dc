"""``Cache``: a memory tier on the Store (whatever its backend) plus a persistent file tier.

Class-level calls (``await Cache.get(...)``, seed style) act on the default cache made by
``Cache.init(...)``; a ``Cache(...)`` instance works the same way on its own.  The memory tier is
the Store table ``__cache`` (one shared-memory table for the whole host on the table backend),
the file tier one authenticated file per key under ``cache_dir``; how the two stay coherent is
described in :mod:`zeal_asgi.cache.tiers`.  On the table backend a hit never awaits: ``get``
calls the synchronous :meth:`~zeal_asgi.cache.tiers.Tiers.get_local` directly.  One worker per
host sweeps expired entries (:class:`CacheGC`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import TYPE_CHECKING, Any, ClassVar

from zeal_asgi.cache.keys import CacheKeys, control_table, resolve_secret
from zeal_asgi.cache.serializer import Serializer, get_serializer
from zeal_asgi.cache.tiers import MAX_TTL, Tiers, check_key, check_ttl
from zeal_asgi.errors import ConfigError
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.lease import Lease
from zeal_asgi.store import Store, StoreBackendKind
from zeal_asgi.store.base import positive_int, seconds
from zeal_asgi.store.facade import HybridMeta, hybridmethod

if TYPE_CHECKING:
    from zeal_asgi.store.services import ServiceHost


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


MISSING: Any = _Missing()
"""Pass as ``default`` to tell a miss from a stored ``None``: ``cache.get(k, MISSING)``."""

_NS_RE = re.compile(r"^[A-Za-z0-9_]{1,64}$")
_UNBOUNDED = (StoreBackendKind.REDIS, StoreBackendKind.TIERED)
"""Backends where ``max_rows`` bounds nothing (Redis keeps rows until they expire)."""
log = logging.getLogger("zeal_asgi.cache")
_IDENTITY = ("max_rows", "cache_dir", "gc_interval_ms", "ttl_seconds", "serializer", "namespace")


def _identity(arguments: Mapping[str, Any]) -> tuple[Any, ...]:
    """The arguments a repeated ``Cache.init`` must repeat (the directory as a string)."""
    return tuple(str(arguments[n]) if n == "cache_dir" else arguments[n] for n in _IDENTITY)


class CacheGC:
    """The cache's periodic GC: a per-worker task, ``start()`` in the worker's event loop,
    ``stop()`` at shutdown; with ``interval`` 0 it never starts.  Only the holder of the cache's
    host-wide GC lease (row ``gc:<name>`` of the control table, a shared-memory
    :class:`~zeal_asgi.shm.lease.Lease`) sweeps, so exactly one worker per host does the work.
    When the holder dies, the next worker to tick sees the pid gone and takes over; a holder
    that stops renewing (hung) loses it at the deadline."""

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


class Cache(metaclass=HybridMeta):
    """A two-tier cache shared by every worker (and node, off the table backend).

    Example::

        Cache.init(max_rows=4096, cache_dir=".cache", secret=os.environ["CACHE_SECRET"])

        @app.get("/price/{sku}")
        async def price(sku: str):
            return await Cache.get_or_compute(f"price:{sku}", lambda: fetch_price(sku), ttl=60)

    Args:
        max_rows: rows of the memory tier (the table backend's hard capacity).
        cache_dir: directory of the file tier (created 0700; refused if a symlink or not ours).
        gc_interval_ms: period of the GC sweep, run by one worker per host; 0 disables it.
        ttl_seconds: longest time an entry stays in the memory tier (server-side expiry on
            redis/tiered/memcached); the file tier keeps it for its own ttl.
        secret: key of every MAC (else ``ZEAL_CACHE_SECRET``; else a random key per server, so
            file entries do not survive a restart).
        serializer: ``"json"`` (default, never runs code on load) or ``"pickle"`` (needs a secret
            of 32+ bytes; only loaded behind a valid MAC).
        max_entry_bytes: largest serialized value accepted (ValueTooLargeError above it).
        memory_value_bytes: largest serialized value kept in the memory tier; larger ones spill.
        fsync: fsync file-tier writes (durable across power loss, ~3x slower).
        max_files: keep at most this many files (oldest evicted by the GC); 0 = no limit.
        namespace: names the Store tables (``__<namespace>``) and the stats prefix.
        lock_lease: lease of a ``get_or_compute`` lock, renewed while ``fn`` runs.
        compute_timeout: longest a ``get_or_compute`` waiter waits for another's computation.
        store: the Store to use; default: ``zeal.store`` when ``zeal`` is given, else
            ``Store.default()``, followed when it changes.
        zeal: register the cache's GC with this app's lifecycle (``zeal.add_service``).

    Each worker also keeps, in its own memory, the bytes of files it verified and the values it
    decoded (about 20 MiB at most), so a repeated hit skips the HMAC and the decode; they are
    used only when the bytes just read are identical, so they never change what a hit returns.
    On the table backend a repeated hit of such a value does not even read the row out: it checks
    in place that the row still holds the bytes decoded last time.
    """

    _default: ClassVar[Cache | None] = None
    MISSING: ClassVar[Any] = MISSING

    def __init__(
        self,
        max_rows: int = 4096,
        cache_dir: str = ".cache",
        gc_interval_ms: int = 60000,
        ttl_seconds: float | None = None,
        *,
        secret: str | bytes | None = None,
        serializer: str = "json",
        max_entry_bytes: int = 64 * 1024 * 1024,
        memory_value_bytes: int = 8192,
        fsync: bool = False,
        max_files: int = 0,
        namespace: str = "cache",
        lock_lease: float = 10.0,
        compute_timeout: float = 60.0,
        store: Store | None = None,
        zeal: ServiceHost | None = None,
    ) -> None:
        if not isinstance(namespace, str) or not _NS_RE.match(namespace):
            raise ConfigError(f"Cache namespace must match {_NS_RE.pattern}, got {namespace!r}")
        self.max_rows = positive_int("Cache max_rows", max_rows, 1, 2**32 - 2)
        self.gc_interval_ms = positive_int("Cache gc_interval_ms", gc_interval_ms, 0, 86_400_000)
        ttl = 0.0 if ttl_seconds is None else check_ttl(ttl_seconds, "ttl_seconds")
        self.ttl_seconds = ttl or None  # 0 and None alike: rows live as long as their entry
        self.max_entry_bytes = positive_int("Cache max_entry_bytes", max_entry_bytes, 1, 2**30)
        self.memory_value_bytes = positive_int(
            "Cache memory_value_bytes", memory_value_bytes, 1, 16 * 1024 * 1024 - 2
        )
        self.max_files = positive_int("Cache max_files", max_files, 0, 2**40)
        self.lock_lease = seconds("Cache lock_lease", lock_lease, math.inf)
        self.compute_timeout = seconds("Cache compute_timeout", compute_timeout, math.inf)
        self.namespace = namespace
        self.serializer: Serializer = get_serializer(serializer)
        keys = CacheKeys.load(resolve_secret(secret, pickle=serializer == "pickle"))
        self._store = store
        self._zeal = zeal
        self._tiers = Tiers(self, keys, cache_dir, bool(fsync), self._current_store)
        self.files = self._tiers.files
        self._tiers.bind()  # declare the tables now: before the workers start, like Store.make
        if max_rows != 4096 and self.ttl_seconds is None and self.store.kind in _UNBOUNDED:
            log.warning(
                "Cache(max_rows=%d) is not enforced on the %s backend: its rows stay until they "
                "expire; pass ttl_seconds= for per-key expiry, or bound Redis itself (maxmemory "
                "with maxmemory-policy allkeys-lru)",
                max_rows,
                self.store.kind,
            )
        self._gc = CacheGC(namespace, gc_interval_ms / 1000, self.gc)
        self._args = _identity(locals())  # the arguments as given: no parameter is rebound above
        if zeal is not None:
            zeal.add_service(self)

    # -- the default instance ------------------------------------------------------------------

    @classmethod
    def init(
        cls,
        max_rows: int = 4096,
        cache_dir: str = ".cache",
        gc_interval_ms: int = 60000,
        ttl_seconds: float | None = None,
        *,
        secret: str | bytes | None = None,
        serializer: str = "json",
        max_entry_bytes: int = 64 * 1024 * 1024,
        memory_value_bytes: int = 8192,
        fsync: bool = False,
        max_files: int = 0,
        namespace: str = "cache",
        lock_lease: float = 10.0,
        compute_timeout: float = 60.0,
        store: Store | None = None,
        zeal: ServiceHost | None = None,
    ) -> Cache:
        """Create the default cache (class-level calls use it); a repeated call is a no-op.

        Same arguments as :class:`Cache`.  Call it at import time, before workers start.
        """
        # every argument as given, read before any other name is bound here
        given = {name: value for name, value in locals().items() if name != "cls"}
        identity = _identity(given)
        if cls._default is not None:
            if cls._default._args != identity:
                raise ConfigError(
                    f"Cache.init() was already called with {cls._default._args}; got {identity} "
                    "(use Cache.set_default(None) first to replace it)"
                )
            return cls._default
        cls._default = cls(**given)
        return cls._default

    @classmethod
    def default(cls) -> Cache:
        """The cache used by class-level calls."""
        if cls._default is None:
            raise ConfigError("call Cache.init(...) (at import time) before using Cache")
        return cls._default

    @classmethod
    def set_default(cls, cache: Cache | None) -> None:
        """Replace (or drop, with ``None``) the default cache."""
        cls._default = cache

    @property
    def store(self) -> Store:
        """The Store holding the memory tier."""
        return self._current_store()

    def _current_store(self) -> Store:
        if self._store is not None:
            return self._store
        return self._zeal.store if self._zeal is not None else Store.default()

    @hybridmethod
    def stats(self) -> dict[str, Any]:
        """Counters of this cache summed over every worker of the host, plus ``hit_rate``."""
        prefix = self._tiers.metrics
        out: dict[str, Any] = {
            k[len(prefix) :]: v for k, v in host_stats().host().items() if k.startswith(prefix)
        }
        hits = out.get("hits_memory", 0) + out.get("hits_file", 0)
        total = hits + out.get("misses", 0)
        out["hit_rate"] = round(hits / total, 4) if total else 0.0
        return out

    def _hot(self, key: str | bytes) -> Any:
        """A repeated hit on the table backend, straight-line, else MISSING: the row still holds
        the very bytes this worker verified and decoded, unexpired (checked in place), and the
        store still has the backend whose table that is (see :attr:`Tiers.hot`)."""
        tiers = self._tiers
        if type(key) is str and (hot := tiers.hot.get(key)) is not None:
            store = self._store or self._current_store()
            if tiers.hot_backend is store.backend and (value := hot.get(MISSING)) is not MISSING:
                return value
        return MISSING

    @hybridmethod
    async def get(self, key: str | bytes, default: Any = None) -> Any:
        """The cached value, or ``default`` on a miss (a stored ``None`` is returned as ``None``;
        pass ``Cache.MISSING`` as default to tell the two apart)."""
        tiers = self._tiers
        if type(key) is str and (hot := tiers.hot.get(key)) is not None:  # self._hot, inlined
            store = self._store or self._current_store()
            if tiers.hot_backend is store.backend and (value := hot.get(MISSING)) is not MISSING:
                return value
        b = tiers.bind()
        if b.table is not None:  # the table backend: no await on the way
            found, value = tiers.get_local(b.table, b, key)
        else:
            found, value = await tiers.lookup(check_key(key))
        return value if found else default

    @hybridmethod
    async def has(self, key: str | bytes) -> bool:
        """``True`` when ``get`` would hit (same integrity and expiry checks)."""
        return await self.get(key, MISSING) is not MISSING

    # -- writes --------------------------------------------------------------------------------

    @hybridmethod
    async def set(self, key: str | bytes, value: Any, ttl: float = 0) -> bool:
        """Cache ``value`` for ``ttl`` seconds (0 = no expiry); ``True`` when stored.

        Raises (before any I/O): SerializationError (TypeError) for a value the serializer
        cannot store, ValueTooLargeError above ``max_entry_bytes``, InvalidTTLError,
        InvalidKeyError / KeyTypeError.  A full disk is not an error: ``False`` when nothing
        could be stored.
        """
        kb = check_key(key)
        seconds = check_ttl(ttl)
        payload = self._tiers.encode(key, value)
        self._gc.start()  # lazily, if the app did not register it as a service
        return await self._tiers.put(kb, payload, seconds)

    @hybridmethod
    async def delete(self, key: str | bytes) -> bool:
        """Remove ``key`` from both tiers; ``True`` if either held it (an expired entry not
        swept yet counts)."""
        return await self._tiers.delete(check_key(key))

    @hybridmethod
    async def flush(self) -> None:
        """Remove every entry: the whole memory tier and this host's files."""
        await self._tiers.flush()

    @hybridmethod
    async def count(self) -> int:
        """Live (unexpired) entries of the memory tier; O(rows) on every backend."""
        return await self._tiers.live_rows()

    @hybridmethod
    async def get_or_compute(
        self,
        key: str | bytes,
        fn: Callable[[], Any | Awaitable[Any]],
        ttl: float = 0,
        *,
        max_wait: float | None = None,
    ) -> Any:
        """The cached value, or ``fn()`` (sync or async) computed once and cached for ``ttl``.

        Under a stampede, ``fn`` runs once per host on the table backend and once per cluster on
        redis/tiered; the others wait (up to ``max_wait``, default ``compute_timeout``, then
        LockTimeoutError) and get the computed value.  ``None`` is cached like any value.  An
        exception from ``fn`` propagates to its caller and releases the lock.  The computer's
        lease (``lock_lease``) is renewed by its event loop: a sync ``fn`` that blocks the loop
        for longer than the lease may be computed a second time elsewhere; make it async.
        """
        self._gc.start()
        if (
            (type(ttl) is int or type(ttl) is float)
            and 0 <= ttl <= MAX_TTL  # a valid ttl (NaN and infinities fail), and a kept key is
            and max_wait is None  # a valid one: a kept hit checks nothing more
            and (value := self._hot(key)) is not MISSING
        ):
            return value
        check_key(key)
        seconds = check_ttl(ttl)
        wait = self.compute_timeout if max_wait is None else float(max_wait)
        # the key as given: a str key's row is kept for the hot check above (as ``get`` does)
        return await self._tiers.compute(key, fn, seconds, wait)

    # -- GC and lifecycle ----------------------------------------------------------------------

    @hybridmethod
    async def gc(self) -> dict[str, int]:
        """One sweep now: expired memory rows and dead lock rows, then (in a thread) expired,
        damaged and, on shared backends, orphaned files."""
        out = await self._tiers.sweep(self.max_files)
        self._tiers.count("gc_sweeps")
        return out

    @hybridmethod
    async def start(self) -> None:
        """Start this worker's GC task (``zeal.add_service(cache)`` calls it at startup)."""
        self._gc.start()

    @hybridmethod
    async def stop(self) -> None:
        """Stop and await this worker's GC task."""
        await self._gc.stop()

    def close(self) -> None:
        """Release the file tier's directory descriptor (the cache is unusable afterwards)."""
        self.files.close()

    def __repr__(self) -> str:
        return f"<Cache {self.namespace!r} dir={self.files.path!r} on {self.store.kind}>"
