"""Benchmark suites of zeal_asgi: ``python -m bench [SUITE ...] [--quick] [--json PATH]``.

Each suite is a module of this package with ``NAME``, ``TITLE`` and ``run(cfg) -> SuiteReport``
(see :mod:`bench._harness`); register a new one in :data:`SUITES`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

__all__ = ["SUITES", "load_suite"]

SUITES: dict[str, str] = {
    "table": "bench.table",
    "http": "bench.http",
    "store": "bench.store",
    "cache": "bench.cache",
    "pubsub": "bench.pubsub",
    "ratelimit": "bench.ratelimit",
    "response_cache": "bench.response_cache",
    "locks": "bench.locks",
    "metrics": "bench.metrics",
}
"""Suite name -> module, in the order ``python -m bench`` runs them."""


def load_suite(name: str) -> ModuleType:
    """Import the module of suite ``name``."""
    try:
        module = SUITES[name]
    except KeyError:
        raise ValueError(f"unknown suite {name!r}; known: {', '.join(SUITES)}") from None
    return importlib.import_module(module)
