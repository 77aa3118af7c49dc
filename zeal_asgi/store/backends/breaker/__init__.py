"""``CircuitBreakerBackend``: a backend behind a host-wide circuit breaker, with a table fallback.

``Store.default_backend("redis", {"url": ..., "on_error": "fallback_table", "breaker": {...}})``
builds it.  While the breaker is closed every call goes to the wrapped backend, and what this host
writes (and reads whole) is mirrored into a shared-memory fallback table.  While it is open, reads
(``get``, ``get_strict``, ``exists``, ``mget``, ``count``, ``iterate``) are answered from that
fallback and every other call raises :class:`~zeal_asgi.errors.BackendUnavailableError` at once,
without touching the network.  A read that fails while closed is also answered from the fallback.

The wrapper disables nothing: it declares the wrapped backend's capabilities and delegates each
method by name (publish, Streams, Lua and counters through the breaker; ``redis_link()`` and
``exists_cached``, which pub/sub and WebSockets use directly, as they are).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from zeal_asgi.errors import (
    BackendAuthError,
    BackendError,
    BackendTLSError,
    BackendUnavailableError,
    UnsupportedOperationError,
    ZealError,
)
from zeal_asgi.store.backends.breaker.state import (
    BreakerOptions,
    BreakerState,
    SharedBreaker,
    is_outage,
    log,
)
from zeal_asgi.store.backends.table import TableBackend
from zeal_asgi.store.base import CounterBackend, Key, Row, StoreBackend, TableSpec, count

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink
    from zeal_asgi.shm import Table

__all__ = ["BreakerOptions", "BreakerState", "CircuitBreakerBackend", "SharedBreaker"]

T = TypeVar("T")
Thunk = Callable[[], Awaitable[T]]
"""A call not made yet: the primary's or the fallback's answer to one operation."""
_FALLBACK: Any = object()


async def _use_fallback() -> Any:
    return _FALLBACK


def _default_name(primary: StoreBackend) -> str:
    # The same backend must get the same name in every worker (their breaker is one), and two
    # backends (other server, other prefix) different ones: the repr names both.
    ident = repr(primary)
    if " at 0x" in ident:  # an address differs per process: fall back to what is stable
        ident = f"{primary.kind}:{getattr(primary, 'prefix', '')}"
    return hashlib.sha256(ident.encode()).hexdigest()[:16]


class CircuitBreakerBackend(StoreBackend):
    """A Store backend that protects ``primary`` with a circuit breaker shared by the host.

    Build it before workers start (``Store.default_backend`` / ``Store.make`` at import time):
    the breaker state and the fallback tables are shared memory.

    Example::

        Store.default_backend("redis", {
            "url": "redis://10.0.0.5:6379/0",
            "on_error": "fallback_table",
            "breaker": {"failure_threshold": 5, "failure_window_sec": 10, "open_seconds": 30},
        })
    """

    def __init__(
        self,
        primary: StoreBackend,
        options: Mapping[str, Any] | BreakerOptions | None = None,
    ) -> None:
        self.options = BreakerOptions.parse(options)
        self.kind = primary.kind
        self.capabilities = primary.capabilities
        self.primary = primary
        """The wrapped backend."""
        name = self.options.name or _default_name(primary)
        self.breaker = SharedBreaker(name, self.options)
        """The host-wide state machine."""
        self.fallback = TableBackend(namespace=f"fallback:{name}")
        """The shared-memory tables that answer reads while the breaker is open."""
        self._needs_start = False

    @classmethod
    def wrap(
        cls, primary: StoreBackend, options: Mapping[str, Any] | BreakerOptions | None = None
    ) -> CircuitBreakerBackend:
        """Wrap ``primary``; ``options`` as in :class:`BreakerOptions` (bad ones: ConfigError)."""
        return cls(primary, options)

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` or ``half-open``."""
        return self.breaker.state

    def redis_link(self) -> RedisLink | None:
        """The primary's link: pub/sub and WebSockets use it as they would without a breaker."""
        return self.primary.redis_link()

    # -- the guard ---------------------------------------------------------------------------------

    async def _call(self, what: str, fn: Thunk[T], fallback: Thunk[T] | None = None) -> T:
        token = self.breaker.admit()
        if token is None:
            count("breaker", "short_circuited")
            if fallback is None:
                raise BackendUnavailableError(
                    f"circuit breaker open: {what} refused without trying the {self.kind} "
                    f"backend (it failed {self.options.failure_threshold} times within "
                    f"{self.options.failure_window_sec:g} s; one probe every "
                    f"{self.options.open_seconds:g} s)"
                )
            count("breaker", "fallback_reads")
            return await fallback()
        try:
            if self._needs_start:
                await self.primary.start()
                self._needs_start = False
            result = await fn()
        except Exception as exc:
            if not is_outage(exc):
                # An error reply (WRONGTYPE, OOM, a Lua error) proves the backend is up; a value
                # or an operation refused before any I/O proves nothing: let the next call probe.
                if isinstance(exc, BackendError) and not isinstance(exc, UnsupportedOperationError):
                    self.breaker.succeeded(token)
                else:
                    self.breaker.abandoned(token)
                raise
            self.breaker.failed(token)
            if fallback is None:
                raise
            count("breaker", "fallback_reads")
            return await fallback()
        except BaseException:
            self.breaker.abandoned(token)
            raise
        self.breaker.succeeded(token)
        return result

    async def _guard(self, what: str, *args: Any, fallback: bool = False) -> Any:
        """The primary's method ``what`` through the breaker; with ``fallback``, the fallback
        table's answer while the breaker is open or the primary unreachable."""
        call = getattr(self.primary, what)
        if not fallback:
            return await self._call(what, lambda: call(*args))
        spare = getattr(self.fallback, what)
        return await self._call(what, lambda: call(*args), lambda: spare(*args))

    async def _mirror(self, spec: TableSpec, key: Key, row: Mapping[str, Any] | None) -> None:
        """Copy ``row`` (``None``: its absence) into the fallback table."""
        try:
            if row is None:
                await self.fallback.delete(spec, key)
            else:
                await self.fallback.set(spec, key, row)
        except ZealError:
            # A fallback that cannot take the row (full) must not keep an older copy of it.
            count("breaker", "mirror_skipped")
            with contextlib.suppress(ZealError):
                await self.fallback.delete(spec, key)

    async def _merge(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> None:
        # A partial row merged into a row the fallback never saw would invent zeroed columns.
        if len(row) == len(spec.schema.columns) or await self.fallback.exists(spec, key):
            await self._mirror(spec, key, row)

    # -- lifecycle -----------------------------------------------------------------------------

    def declare(self, spec: TableSpec) -> Table | None:
        """Declare on the primary and allocate the fallback table (before workers start)."""
        result = self.primary.declare(spec)
        self.fallback.declare(spec)
        return result

    async def start(self) -> None:
        """Start the primary; if it is unreachable, boot anyway (degraded) and retry later."""
        try:
            await self.primary.start()
            self._needs_start = False
        except (BackendAuthError, BackendTLSError):
            raise  # wrong credentials or certificates are configuration errors: fail the boot
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._needs_start = True
            self.breaker.failed(0)
            log.warning("%s backend unreachable at startup (%s); serving degraded", self.kind, exc)

    async def aclose(self) -> None:
        """Close the primary's connections in this worker."""
        await self.primary.aclose()

    # -- reads (fall back) -----------------------------------------------------------------------

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row or field; from the fallback while open."""

        async def read() -> Any:
            value = await self.primary.get(spec, key, field)
            if field is None:
                await self._mirror(spec, key, value)
            return value

        return await self._call("get", read, lambda: self.fallback.get(spec, key, field))

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists; from the fallback while open."""
        return bool(await self._guard("exists", spec, key, fallback=True))

    async def count(self, spec: TableSpec) -> int:
        """Row count; while open, the rows this host mirrored."""
        return int(await self._guard("count", spec, fallback=True))

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys``; from the fallback while open."""

        async def read() -> list[Row | None]:
            rows = await self.primary.mget(spec, keys)
            for k, r in zip(keys, rows, strict=False):
                await self._mirror(spec, k, r)
            return rows

        return await self._call("mget", read, lambda: self.fallback.mget(spec, keys))

    async def iterate(self, spec: TableSpec) -> AsyncIterator[tuple[Any, Row]]:
        """Every row; from the fallback while open or when the primary fails before the first."""
        inner = self.primary.iterate(spec)
        try:
            # The first row decides, as any read does: the primary's, or the fallback's rows.
            item = await self._call("iterate", lambda: anext(inner, None), _use_fallback)
            if item is _FALLBACK:
                async for row in self.fallback.iterate(spec):
                    yield row
                return
            while item is not None:
                yield item
                try:
                    item = await anext(inner, None)
                except Exception as exc:
                    if not is_outage(exc):
                        raise
                    self.breaker.failed(0)
                    raise BackendUnavailableError(
                        f"{self.kind} backend lost in the middle of iterating {spec.name!r}"
                    ) from exc
        finally:
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- writes (refused while open, mirrored while closed) ------------------------------------

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row``; BackendUnavailableError while open."""
        result = bool(await self._guard("set", spec, key, row))
        await self._merge(spec, key, row)
        return result

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row; BackendUnavailableError while open."""
        result = bool(await self._guard("delete", spec, key))
        await self._mirror(spec, key, None)
        return result

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomic add on the primary; BackendUnavailableError while open."""
        value: int | float = await self._guard("incr", spec, key, column, by)
        await self._merge(spec, key, {column: value})
        return value

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomic compare-and-set on the primary; BackendUnavailableError while open."""
        done = bool(await self._guard("compare_and_set", spec, key, column, expected, new))
        if done:
            await self._merge(spec, key, {column: new})
        return done

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Write many rows; BackendUnavailableError while open."""
        n = int(await self._guard("mset", spec, rows))
        for k, r in rows.items():
            await self._merge(spec, k, r)
        return n

    async def clear(self, spec: TableSpec) -> int:
        """Remove every row; BackendUnavailableError while open."""
        n = int(await self._guard("clear", spec))
        await self.fallback.clear(spec)
        return n

    # -- everything else passes through ------------------------------------------------------

    async def ping(self) -> bool:
        """``False`` while open (no network); else the primary's answer (the probe if due)."""
        try:
            return bool(await self._guard("ping"))
        except Exception as exc:  # the breaker's own refusal is a BackendUnavailableError too
            if is_outage(exc):
                return False
            raise

    async def exists_cached(self, spec: TableSpec, key: Key) -> bool:
        """The primary's answer from this host's memory (no network: nothing to guard)."""
        return await self.primary.exists_cached(spec, key)

    async def publish(self, channel: str, payload: bytes) -> int:
        """The primary's publish; BackendUnavailableError while open."""
        return int(await self._guard("publish", channel, payload))

    async def publish_reliable(self, stream: str, payload: bytes, max_len: int | None) -> str:
        """The primary's Streams append; BackendUnavailableError while open."""
        return str(await self._guard("publish_reliable", stream, payload, max_len))

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The primary's Lua; BackendUnavailableError while open."""
        return await self._guard("eval", script, keys, args)

    def counter(self, name: str, initial: int) -> CounterBackend:
        """The primary's counter, behind the breaker (refused while open)."""
        return _GuardedCounter(self, self.primary.counter(name, initial))

    def stats(self) -> dict[str, Any]:
        """The primary's stats plus ``breaker`` (state, counters) and ``fallback`` (tables)."""
        return {
            **self.primary.stats(),
            "breaker": self.breaker.stats(),
            "fallback": self.fallback.stats(),
        }

    def close_shared(self) -> None:
        """Unlink the breaker state, the fallback tables and the primary's shared memory."""
        self.breaker.close()
        self.fallback.close_shared()
        self.primary.close_shared()


class _GuardedCounter(CounterBackend):
    """A counter of the primary whose calls go through the breaker (no fallback)."""

    def __init__(self, owner: CircuitBreakerBackend, inner: CounterBackend) -> None:
        self.name = inner.name
        self._owner = owner
        self._inner = inner

    async def increment(self, by: int = 1) -> int:
        """Add ``by``; BackendUnavailableError while open."""
        return await self._owner._call("counter increment", lambda: self._inner.increment(by))

    async def get(self) -> int:
        """Current value; BackendUnavailableError while open."""
        return await self._owner._call("counter get", self._inner.get)

    async def set(self, value: int) -> None:
        """Store ``value``; BackendUnavailableError while open."""
        await self._owner._call("counter set", lambda: self._inner.set(value))

    async def compare_and_set(self, expected: int, new: int) -> bool:
        """CAS; BackendUnavailableError while open."""
        return await self._owner._call(
            "counter compare_and_set", lambda: self._inner.compare_and_set(expected, new)
        )
