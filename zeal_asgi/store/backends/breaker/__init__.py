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
import logging
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
)
from zeal_asgi.store.backends.table import TableBackend
from zeal_asgi.store.base import CounterBackend, Key, Row, StoreBackend, TableSpec, count

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink
    from zeal_asgi.shm import Table

__all__ = ["BreakerOptions", "BreakerState", "CircuitBreakerBackend", "SharedBreaker"]

log = logging.getLogger("zeal_asgi.breaker")
T = TypeVar("T")


def _default_name(primary: object) -> str:
    # The same backend must get the same name in every worker (their breaker is one), and two
    # backends (other server, other prefix) different ones: the repr names both.
    ident = repr(primary)
    if " at 0x" in ident:  # an address differs per process: fall back to what is stable
        ident = (
            f"{getattr(primary, 'kind', type(primary).__name__)}:{getattr(primary, 'prefix', '')}"
        )
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
        self._primary = primary
        name = self.options.name or _default_name(primary)
        self._breaker = SharedBreaker(name, self.options)
        self._fallback = TableBackend(namespace=f"fallback:{name}")
        self._needs_start = False

    @classmethod
    def wrap(
        cls, primary: StoreBackend, options: Mapping[str, Any] | BreakerOptions | None = None
    ) -> CircuitBreakerBackend:
        """Wrap ``primary``; ``options`` as in :class:`BreakerOptions` (bad ones: ConfigError)."""
        return cls(primary, options)

    @property
    def primary(self) -> StoreBackend:
        """The wrapped backend."""
        return self._primary

    @property
    def fallback(self) -> TableBackend:
        """The shared-memory tables that answer reads while the breaker is open."""
        return self._fallback

    @property
    def breaker(self) -> SharedBreaker:
        """The host-wide state machine."""
        return self._breaker

    @property
    def state(self) -> BreakerState:
        """``closed``, ``open`` or ``half-open``."""
        return self._breaker.state

    def redis_link(self) -> RedisLink | None:
        """The primary's link: pub/sub and WebSockets use it as they would without a breaker."""
        return self._primary.redis_link()

    # -- the guard ---------------------------------------------------------------------------------

    def _refused(self, what: str) -> BackendUnavailableError:
        count("breaker", "short_circuited")
        return BackendUnavailableError(
            f"circuit breaker open: {what} refused without trying the {self.kind} backend "
            f"(it failed {self.options.failure_threshold} times within "
            f"{self.options.failure_window_sec:g} s; one probe every "
            f"{self.options.open_seconds:g} s)"
        )

    async def _call(
        self,
        what: str,
        fn: Callable[[], Awaitable[T]],
        fallback: Callable[[], Awaitable[T]] | None = None,
    ) -> T:
        token = self._breaker.admit()
        if token is None:
            if fallback is None:
                raise self._refused(what)
            count("breaker", "short_circuited")
            count("breaker", "fallback_reads")
            return await fallback()
        try:
            if self._needs_start:
                await self._primary.start()
                self._needs_start = False
            result = await fn()
        except Exception as exc:
            if not is_outage(exc):
                self._answered(token, exc)
                raise
            self._breaker.failed(token)
            if fallback is None:
                raise
            count("breaker", "fallback_reads")
            return await fallback()
        except BaseException:
            self._breaker.abandoned(token)
            raise
        self._breaker.succeeded(token)
        return result

    def _answered(self, token: int, exc: Exception) -> None:
        # An error reply (WRONGTYPE, OOM, a Lua error) proves the backend is up; a value or an
        # operation refused before any I/O proves nothing: let the next call probe.
        if isinstance(exc, BackendError) and not isinstance(exc, UnsupportedOperationError):
            self._breaker.succeeded(token)
        else:
            self._breaker.abandoned(token)

    async def _mirror(self, spec: TableSpec, key: Key, fn: Callable[[], Awaitable[Any]]) -> None:
        try:
            await fn()
        except ZealError:
            # A fallback that cannot take the row (full) must not keep an older copy of it.
            count("breaker", "mirror_skipped")
            with contextlib.suppress(ZealError):
                await self._fallback.delete(spec, key)

    async def _mirror_row(self, spec: TableSpec, key: Key, row: Row | None) -> None:
        if row is None:
            await self._mirror(spec, key, lambda: self._fallback.delete(spec, key))
        else:
            await self._mirror(spec, key, lambda: self._fallback.set(spec, key, row))

    async def _mirror_merge(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> None:
        # A partial row merged into a row the fallback never saw would invent zeroed columns.
        full = len(row) == len(spec.schema.columns)
        if full or await self._fallback.exists(spec, key):
            await self._mirror(spec, key, lambda: self._fallback.set(spec, key, row))

    # -- lifecycle -----------------------------------------------------------------------------

    def declare(self, spec: TableSpec) -> Table | None:
        """Declare on the primary and allocate the fallback table (before workers start)."""
        result = self._primary.declare(spec)
        self._fallback.declare(spec)
        return result

    async def start(self) -> None:
        """Start the primary; if it is unreachable, boot anyway (degraded) and retry later."""
        try:
            await self._primary.start()
            self._needs_start = False
        except (BackendAuthError, BackendTLSError):
            raise  # wrong credentials or certificates are configuration errors: fail the boot
        except Exception as exc:
            if not is_outage(exc):
                raise
            self._needs_start = True
            self._breaker.failed(0)
            log.warning("%s backend unreachable at startup (%s); serving degraded", self.kind, exc)

    async def aclose(self) -> None:
        """Close the primary's connections in this worker."""
        await self._primary.aclose()

    # -- reads (fall back) -----------------------------------------------------------------------

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row or field; from the fallback while open."""

        async def read() -> Any:
            value = await self._primary.get(spec, key, field)
            if field is None:
                await self._mirror_row(spec, key, value)
            return value

        return await self._call("get", read, lambda: self._fallback.get(spec, key, field))

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists; from the fallback while open."""
        return await self._call(
            "exists",
            lambda: self._primary.exists(spec, key),
            lambda: self._fallback.exists(spec, key),
        )

    async def count(self, spec: TableSpec) -> int:
        """Row count; while open, the rows this host mirrored."""
        return await self._call(
            "count", lambda: self._primary.count(spec), lambda: self._fallback.count(spec)
        )

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys``; from the fallback while open."""

        async def read() -> list[Row | None]:
            rows = await self._primary.mget(spec, keys)
            for k, r in zip(keys, rows, strict=False):
                await self._mirror_row(spec, k, r)
            return rows

        return await self._call("mget", read, lambda: self._fallback.mget(spec, keys))

    async def iterate(self, spec: TableSpec) -> AsyncIterator[tuple[Any, Row]]:
        """Every row; from the fallback while open or when the primary fails before the first."""
        token = self._breaker.admit()
        if token is None:
            count("breaker", "short_circuited")
            count("breaker", "fallback_reads")
            async for item in self._fallback.iterate(spec):
                yield item
            return
        inner = self._primary.iterate(spec)
        answered = False
        try:
            while True:
                try:
                    item = await anext(inner)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    if not is_outage(exc):
                        self._answered(token, exc)
                        raise
                    self._breaker.failed(token)
                    if answered:
                        raise BackendUnavailableError(
                            f"{self.kind} backend lost in the middle of iterating {spec.name!r}"
                        ) from exc
                    count("breaker", "fallback_reads")
                    async for fb in self._fallback.iterate(spec):
                        yield fb
                    return
                if not answered:
                    answered = True
                    self._breaker.succeeded(token)
                yield item
            if not answered:
                self._breaker.succeeded(token)
        except BaseException:
            if not answered:
                self._breaker.abandoned(token)
            raise
        finally:
            aclose = getattr(inner, "aclose", None)
            if aclose is not None:
                await aclose()

    # -- writes (refused while open, mirrored while closed) ------------------------------------

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row``; BackendUnavailableError while open."""
        result = await self._call("set", lambda: self._primary.set(spec, key, row))
        await self._mirror_merge(spec, key, row)
        return result

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row; BackendUnavailableError while open."""
        result = await self._call("delete", lambda: self._primary.delete(spec, key))
        await self._mirror(spec, key, lambda: self._fallback.delete(spec, key))
        return result

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomic add on the primary; BackendUnavailableError while open."""
        value = await self._call("incr", lambda: self._primary.incr(spec, key, column, by))
        if await self._fallback.exists(spec, key):
            await self._mirror(spec, key, lambda: self._fallback.set(spec, key, {column: value}))
        return value

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomic compare-and-set on the primary; BackendUnavailableError while open."""
        done = await self._call(
            "compare_and_set",
            lambda: self._primary.compare_and_set(spec, key, column, expected, new),
        )
        if done and await self._fallback.exists(spec, key):
            await self._mirror(spec, key, lambda: self._fallback.set(spec, key, {column: new}))
        return done

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Write many rows; BackendUnavailableError while open."""
        n = await self._call("mset", lambda: self._primary.mset(spec, rows))
        for k, r in rows.items():
            await self._mirror_merge(spec, k, r)
        return n

    async def clear(self, spec: TableSpec) -> int:
        """Remove every row; BackendUnavailableError while open."""
        n = await self._call("clear", lambda: self._primary.clear(spec))
        await self._fallback.clear(spec)
        return n

    # -- everything else passes through ------------------------------------------------------

    async def ping(self) -> bool:
        """``False`` while open (no network); else the primary's answer (the probe if due)."""
        try:
            ok = await self._call("ping", self._primary.ping)
        except BackendUnavailableError:
            return False
        except Exception as exc:
            if is_outage(exc):
                return False
            raise
        return ok

    async def exists_cached(self, spec: TableSpec, key: Key) -> bool:
        """The primary's answer from this host's memory (no network: nothing to guard)."""
        return await self._primary.exists_cached(spec, key)

    async def publish(self, channel: str, payload: bytes) -> int:
        """The primary's publish; BackendUnavailableError while open."""
        return await self._call("publish", lambda: self._primary.publish(channel, payload))

    async def publish_reliable(self, stream: str, payload: bytes, max_len: int | None) -> str:
        """The primary's Streams append; BackendUnavailableError while open."""
        return await self._call(
            "publish_reliable", lambda: self._primary.publish_reliable(stream, payload, max_len)
        )

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """The primary's Lua; BackendUnavailableError while open."""
        return await self._call("eval", lambda: self._primary.eval(script, keys, args))

    def counter(self, name: str, initial: int) -> CounterBackend:
        """The primary's counter, behind the breaker (refused while open)."""
        return _GuardedCounter(self, self._primary.counter(name, initial))

    def stats(self) -> dict[str, Any]:
        """The primary's stats plus ``breaker`` (state, counters) and ``fallback`` (tables)."""
        out = dict(self._primary.stats())
        out["breaker"] = self._breaker.stats()
        out["fallback"] = self._fallback.stats()
        return out

    def close_shared(self) -> None:
        """Unlink the breaker state, the fallback tables and the primary's shared memory."""
        self._breaker.close()
        self._fallback.close_shared()
        self._primary.close_shared()


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
