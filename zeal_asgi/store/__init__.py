"""The Store: typed rows and counters over a pluggable backend (table, redis, tiered, memcached)."""

from __future__ import annotations

from zeal_asgi.store.base import (
    Capability,
    CounterBackend,
    Key,
    Row,
    StoreBackend,
    StoreBackendKind,
    TableSpec,
)
from zeal_asgi.store.facade import Store, build_backend

__all__ = [
    "Capability",
    "CounterBackend",
    "Key",
    "Row",
    "Store",
    "StoreBackend",
    "StoreBackendKind",
    "TableSpec",
    "build_backend",
]
