"""The contract every Store backend implements, and the pieces they share.

Backends are plain classes checked structurally against :class:`StoreBackend` (a
``typing.Protocol``): mypy flags an incomplete backend wherever it is passed as one.  Optional
capabilities (pub/sub, Streams, Lua) are further protocols a backend may also satisfy; the
facade checks for them and raises :class:`~zeal_asgi.errors.UnsupportedOperationError` with the
backend's name otherwise.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from zeal_asgi.settings import StoreBackendKind
from zeal_asgi.shm.schema import Schema

if TYPE_CHECKING:
    from pydantic import BaseModel

    from zeal_asgi.shm import Table

__all__ = [
    "CounterBackend",
    "EvalCapable",
    "Key",
    "PublishCapable",
    "Row",
    "StoreBackend",
    "StoreBackendKind",
    "TableSpec",
    "backend_name",
]

Key = str | bytes
Row = dict[str, Any]


@dataclass(frozen=True)
class TableSpec:
    """A table declared with ``Store.make``: everything a backend needs to serve it."""

    name: str
    max_rows: int
    schema: Schema
    mode: str = "tracked"
    """``tracked``: O(1) count (a membership set on Redis); ``ttl``: rows expire after ``ttl`` s."""
    ttl: int | None = None
    model: type[BaseModel] | None = field(default=None, compare=False)


class CounterBackend(Protocol):
    """A named signed 64-bit counter shared by every worker (and node, off the table backend)."""

    name: str

    async def increment(self, by: int = 1) -> int:
        """Add ``by`` atomically; return the new value (overflow raises, value unchanged)."""
        ...

    async def get(self) -> int:
        """The current value (0 when never written)."""
        ...

    async def set(self, value: int) -> None:
        """Store ``value``."""
        ...

    async def compare_and_set(self, expected: int, new: int) -> bool:
        """Set to ``new`` if the value is ``expected`` (a missing value counts as 0)."""
        ...


@runtime_checkable
class StoreBackend(Protocol):
    """What the Store facade needs from a backend.

    ``declare`` runs synchronously, at import time, before workers start; every other call runs in
    a worker's event loop.  Connections open lazily in the worker (``start`` may be called more
    than once).  Misses are ``None`` at this level (the facade turns them into ``False`` for
    ``Store.get``).  Every method validates with the table's
    :class:`~zeal_asgi.shm.schema.Schema`, so the errors and returned types are the same on every
    backend.
    """

    kind: StoreBackendKind

    def declare(self, spec: TableSpec) -> Table | None:
        """Register a table (allocating shared memory where the backend has some)."""
        ...

    async def start(self) -> None:
        """Open connections in this worker (idempotent); a boot check that fails loudly."""
        ...

    async def aclose(self) -> None:
        """Close connections and background tasks of this worker."""
        ...

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Merge ``row`` into the row at ``key`` (new rows start zeroed); ``True``."""
        ...

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row dict, or one field's value; ``None`` on a miss."""
        ...

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Remove the row; ``True`` if it existed."""
        ...

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists."""
        ...

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomically add ``by`` to a numeric column (creating the row); the new value."""
        ...

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomically set ``column`` to ``new`` if it equals ``expected`` (missing row = zeros)."""
        ...

    async def count(self, spec: TableSpec) -> int:
        """Number of rows."""
        ...

    def iterate(self, spec: TableSpec) -> AsyncIterator[tuple[Any, Row]]:
        """Every ``(key, row)``; rows changed meanwhile may or may not appear."""
        ...

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys`` in order, ``None`` for misses (one round trip where possible)."""
        ...

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Merge many rows (validated first, all or nothing); the number written."""
        ...

    async def clear(self, spec: TableSpec) -> int:
        """Remove every row; the number removed (approximate on distributed backends)."""
        ...

    async def ping(self) -> bool:
        """``True`` when the backend answers."""
        ...

    def stats(self) -> dict[str, Any]:
        """Counters of this backend in this worker (pool, breaker, pub/sub, tables)."""
        ...

    def counter(self, name: str, initial: int) -> CounterBackend:
        """A named counter; ``initial`` is written only if the counter does not exist yet."""
        ...


@runtime_checkable
class PublishCapable(Protocol):
    """Backends that can publish (Redis, tiered, and wrappers of them)."""

    async def publish(self, channel: str, payload: str | bytes) -> int:
        """Publish; the number of receivers."""
        ...


@runtime_checkable
class EvalCapable(Protocol):
    """Backends that run Lua (Redis, tiered)."""

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Run ``script`` with KEYS/ARGV (keys are prefixed by the backend)."""
        ...


def backend_name(backend: object) -> str:
    """Human name of a backend for error messages."""
    kind = getattr(backend, "kind", None)
    return str(kind) if kind is not None else type(backend).__name__
