"""Prometheus metrics in shared memory: every worker's increments land in one series.

::

    from zeal_asgi import metrics
    REQS = metrics.Counter("http_requests_total", "Requests", labels=("method", "route", "status"))
    LAT = metrics.Histogram("http_request_duration_seconds", "Latency", labels=("route",))
    INFL = metrics.Gauge("http_inflight_requests", "In flight", mode="livesum")
    REQS.labels("GET", "/x", "200").inc(); LAT.labels("/x").observe(0.012); INFL.inc()
    app.include_router(metrics.router)   # GET /metrics (Starlette: routes=metrics.routes())

Declare metrics at import, in the app module, so every worker knows them.  Values live in a
shared table of this host (also with the redis, tiered and memcached backends: each host
exposes its own series, and Prometheus scrapes every host).  No files, nothing to wipe between
runs, and nothing grows as workers restart.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from zeal_asgi.errors import built_on_first_use
from zeal_asgi.metrics.exposition import (
    CONTENT_TYPE,
    OPENMETRICS_CONTENT_TYPE,
    Collector,
    make_router,
    metric_name,
    render,
    routes,
)
from zeal_asgi.metrics.kinds import DEFAULT_BUCKETS, Counter, Gauge, Histogram, Summary
from zeal_asgi.metrics.registry import Family, Registry, Sample, default_registry

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = [
    "CONTENT_TYPE",
    "DEFAULT_BUCKETS",
    "OPENMETRICS_CONTENT_TYPE",
    "Counter",
    "Family",
    "Gauge",
    "Histogram",
    "Registry",
    "Sample",
    "Summary",
    "collector",
    "default_registry",
    "make_router",
    "metric_name",
    "render",
    "router",
    "routes",
]


def collector(registry: Registry | None = None) -> Collector:
    """The metrics for a ``prometheus_client`` registry:
    ``prometheus_client.REGISTRY.register(metrics.collector())``."""
    return Collector(registry)


# ``router`` is built on first use, so this module imports without FastAPI installed.
__getattr__ = built_on_first_use(globals(), router=make_router)


if TYPE_CHECKING:
    router: APIRouter
    """``app.include_router(metrics.router)``: ``make_router()`` with the defaults."""
