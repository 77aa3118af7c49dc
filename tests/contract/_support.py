"""What the contract tests share: backend names, the test schema, store building and closing.

Every Store is built with a name space of its own (table namespace, key prefix, L1 namespace), so
tests sharing the session's redis-server and memcached never see each other's rows, and every
shared-memory segment a store allocates is unlinked when the store is closed.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import Any, TypeVar

import pytest

from zeal_asgi.store import Store, StoreBackend

E = TypeVar("E", bound=BaseException)

BACKENDS = ("table", "redis", "tiered", "memcached", "breaker")
"""Every backend of the contract; ``breaker`` is redis behind ``on_error="fallback_table"``."""


def backend_params() -> list[Any]:
    """``BACKENDS`` as pytest params, marked ``redis`` / ``memcached`` by the server they need."""
    marks = {"redis": "redis", "tiered": "redis", "breaker": "redis", "memcached": "memcached"}
    return [
        pytest.param(name, marks=[getattr(pytest.mark, marks[name])] if name in marks else [])
        for name in BACKENDS
    ]


LISTING = frozenset({"table", "redis", "tiered", "breaker"})
"""Backends that can count, iterate and clear (memcached cannot list its keys)."""

SECRET = "contract-suite-invalidation-secret-0123456789"

COLUMNS: dict[str, Any] = {
    "name": (Store.TYPE_STRING, 16),
    "i1": (Store.TYPE_INT, 1),
    "i2": (Store.TYPE_INT, 2),
    "i4": (Store.TYPE_INT, 4),
    "i8": (Store.TYPE_INT, 8),
    "f": (Store.TYPE_FLOAT,),
    "b": (Store.TYPE_BYTES, 8),
}
"""Table ``t``: one column of every type and every INT width, in this declaration order."""

BIN_COLUMNS: dict[str, Any] = {"v": (Store.TYPE_INT, 8), "s": (Store.TYPE_STRING, 8)}
"""Table ``bin``: made with ``binary_keys=True``."""

INT_WIDTHS = {"i1": 1, "i2": 2, "i4": 4, "i8": 8}

ZERO_ROW: dict[str, Any] = {
    "name": "",
    "i1": 0,
    "i2": 0,
    "i4": 0,
    "i8": 0,
    "f": 0.0,
    "b": b"",
}


def int_range(width: int) -> tuple[int, int]:
    """Inclusive range of a signed INT column of ``width`` bytes."""
    bits = width * 8
    return -(2 ** (bits - 1)), 2 ** (bits - 1) - 1


def unique(prefix: str = "ct") -> str:
    """A name no other test (or concurrent run) uses."""
    return f"{prefix}{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Servers:
    """Addresses of the real servers a backend needs (``None`` when it needs none)."""

    redis_url: str | None = None
    memcached_url: str | None = None


QUEUE_WAIT = 5.0
"""Pool wait of the contract's stores.  The defaults (0.1 s for a Redis connection) shed load
on purpose (E12); here 200 concurrent calls queue on 8 connections of a 2-core box that other
tests keep busy, and the suite checks semantics, not the overload policy."""


def store_conn(backend: str, servers: Servers, name: str) -> tuple[str, dict[str, Any]]:
    """``(kind, conn)`` of a store of ``backend`` whose keys and segments all carry ``name``."""
    if backend == "table":
        return "table", {"namespace": name}
    if backend == "memcached":
        assert servers.memcached_url is not None
        conn = {"servers": servers.memcached_url, "prefix": name, "timeout": QUEUE_WAIT}
        return "memcached", conn
    assert servers.redis_url is not None
    conn = {"url": servers.redis_url, "prefix": name, "acquire_timeout": QUEUE_WAIT}
    if backend == "tiered":
        conn.update(l1_namespace=f"l1{name}", invalidation_secret=SECRET)
        return "tiered", conn
    if backend == "breaker":
        conn["on_error"] = "fallback_table"
    return "redis", conn


def release_shared(backend: StoreBackend) -> None:
    """Unlink the shared memory of a backend (its tables, L1, breaker state, fallback tables)."""
    backend.close_shared()


class StoreMaker:
    """Builds unstarted stores of one backend; :meth:`close_all` closes every one of them."""

    def __init__(self, backend: str, servers: Servers) -> None:
        self.backend = backend
        self.servers = servers
        self._made: list[Store] = []
        self._closed: set[int] = set()
        self._spaces: dict[int, str] = {}

    def __call__(self, space: str | None = None) -> Store:
        """A new store with its own name space (or ``space``, to share one with another)."""
        space = space or unique()
        kind, conn = store_conn(self.backend, self.servers, space)
        store = Store(kind, conn)
        self._made.append(store)
        self._spaces[id(store)] = space
        return store

    def space_of(self, store: Store) -> str:
        """The name space ``store`` was built with (a second store on it is "another worker")."""
        return self._spaces[id(store)]

    async def close(self, store: Store) -> None:
        """Close ``store``'s connections and unlink its shared memory (once)."""
        if id(store) in self._closed:
            return
        self._closed.add(id(store))
        try:
            await store.aclose()
        finally:
            release_shared(store.backend)

    def unclosed(self) -> list[Store]:
        """Stores not closed yet (a machine run that died before its teardown)."""
        return [s for s in self._made if id(s) not in self._closed]

    async def close_all(self) -> None:
        """Close every store this maker built (last first)."""
        for store in reversed(self._made):
            await self.close(store)


def declare_tables(store: Store) -> None:
    """The tables every contract test may use: ``t`` (tracked) and ``bin`` (binary keys)."""
    store.make("t", 256, COLUMNS)
    store.make("bin", 64, BIN_COLUMNS, binary_keys=True)


async def raises_exact(exc_type: type[E], awaitable: Awaitable[Any]) -> E:
    """Await ``awaitable``; it must raise exactly ``exc_type`` (not a sibling or a parent).

    Anything else (no error, another error, a raw builtin) is an AssertionError that names what
    happened, with the original exception chained.
    """
    try:
        result = await awaitable
    except Exception as exc:
        if type(exc) is not exc_type:
            raise AssertionError(
                f"raised {type(exc).__module__}.{type(exc).__name__}({exc}); the contract says "
                f"{exc_type.__name__}"
            ) from exc
        return exc
    raise AssertionError(f"returned {result!r}; the contract says it raises {exc_type.__name__}")
