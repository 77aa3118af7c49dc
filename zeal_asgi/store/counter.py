"""``Counter``: a signed 64-bit integer shared by every worker (and node, off the table backend)."""

from __future__ import annotations

import itertools
from collections.abc import Awaitable
from typing import TYPE_CHECKING

from zeal_asgi.errors import (
    ConfigError,
    IntegerOverflowError,
    UnsupportedOperationError,
)
from zeal_asgi.store import Store, StoreBackendKind
from zeal_asgi.store.codec import INT64_MAX, INT64_MIN, int64

if TYPE_CHECKING:
    from zeal_asgi.shm import Atomic
    from zeal_asgi.store import CounterBackend

_anon = itertools.count(1)


def _check_int(value: object, what: str, name: str) -> int:
    return int64(value, f"counter {name!r}: {what}")


class Counter:
    """A shared counter, declared before workers start.

    On the table backend it is a lock-free shared-memory atomic (tens of nanoseconds); on Redis it
    is ``INCRBY`` on ``{prefix}:counter:{name}``; on Memcached, native ``incr``/``decr``.
    ``initial`` is written only when the counter does not exist yet, so every worker can declare
    it without resetting it.

    Example::

        request_counter = Counter(0, name="requests")

        @app.get("/demo/counter/increment")
        async def inc():
            return {"total_requests": await request_counter.increment(), "pid": os.getpid()}
    """

    def __init__(
        self, initial: int = 0, *, name: str | None = None, store: Store | None = None
    ) -> None:
        self.anonymous = name is None
        if name is None:
            # Anonymous counters are matched across workers by declaration order, which only a
            # single host's shared memory can rely on.
            name = f"__anon_{next(_anon)}"
        elif not isinstance(name, str) or not name or len(name) > 200:
            raise ConfigError(f"counter name must be a non-empty str, got {name!r}")
        self.name = name
        self.initial = _check_int(initial, "initial", name)
        self._store = store
        self._backend: CounterBackend = self._bind()

    @property
    def store(self) -> Store:
        """The Store whose backend holds this counter."""
        return self._store if self._store is not None else Store.default()

    def _bind(self) -> CounterBackend:
        store = self.store
        if self.anonymous and store.kind is not StoreBackendKind.TABLE:
            raise ConfigError(
                f"a Counter needs a name on the {store.kind} backend (anonymous counters are "
                "matched by declaration order, which only works in one host's shared memory)"
            )
        return store.declare_counter(self)

    def rebind(self) -> None:
        """Follow the store to its current backend (``Store.use_backend`` calls it)."""
        self._backend = self._bind()

    @property
    def atomic(self) -> Atomic:
        """The shared-memory atomic behind the counter (table backend only), for sync code."""
        atomic = self._backend.atomic
        if atomic is None:
            raise UnsupportedOperationError(
                f"Counter.atomic is the shared-memory Atomic: only on the table backend "
                f"(current: {self.store.kind})"
            )
        return atomic

    def increment(self, by: int = 1) -> Awaitable[int]:
        """Add ``by`` atomically; awaited, the new value.  Overflow raises and leaves the value
        unchanged; a bad step raises when awaited, like every other error."""
        if by.__class__ is int and INT64_MIN <= by <= INT64_MAX:
            return self._backend.increment(by)  # the backend's awaitable: no frame of our own
        return self._add(by)

    async def _add(self, by: int) -> int:
        return await self._backend.increment(_check_int(by, "step", self.name))

    async def decrement(self, by: int = 1) -> int:
        """Subtract ``by`` atomically; the new value."""
        step = _check_int(by, "step", self.name)
        if step == INT64_MIN:
            raise IntegerOverflowError(f"counter {self.name!r}: cannot negate step {by}")
        return await self._add(-step)

    async def get(self) -> int:
        """The current value."""
        return await self._backend.get()

    async def set(self, value: int) -> None:
        """Store ``value`` (not ordered with concurrent increments: compare_and_set is)."""
        await self._backend.set(_check_int(value, "value", self.name))

    async def reset(self) -> None:
        """Set to 0."""
        await self._backend.set(0)

    async def compare_and_set(self, expected: int, new: int) -> bool:
        """Set to ``new`` if the value is ``expected`` (a never-written counter counts as 0)."""
        return await self._backend.compare_and_set(
            _check_int(expected, "expected", self.name), _check_int(new, "new", self.name)
        )

    def __repr__(self) -> str:
        return f"<Counter {self.name!r} on {self.store.kind}>"
