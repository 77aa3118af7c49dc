"""Health and metrics: liveness, readiness, ``/health/store`` and its Prometheus twin.

``app.include_router(zeal_asgi.health.router)``; a plain Starlette app uses
``Starlette(routes=zeal_asgi.health.starlette_routes())``.

- ``GET /health/live``: 200 with the pid while the process serves; never touches the backend
  (a liveness probe must not restart every app when Redis blips).
- ``GET /health/ready``: 200 while the backend answers a ping, else 503 with the reason (also
  while the circuit breaker is open).
- ``GET /health/store``: the ready answer plus tables, shared memory, pool and counters;
  ``GET /health/store/metrics`` the same figures in the Prometheus text format.

One naming rule for every counter, in the JSON and in Prometheus alike (:func:`metric_name`, from
:mod:`zeal_asgi.metrics`, which also renders the text): ``zeal_<area>_<what>_total``.  Table
figures come from shared memory and are host-wide already;
event counters are kept per worker in :mod:`zeal_asgi.shm.hoststats` and summed over every
worker of the host, so any worker answers for the whole host.
"""

from __future__ import annotations

import asyncio
import collections
import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zeal_asgi.errors import built_on_first_use, require
from zeal_asgi.locks import job_stats
from zeal_asgi.messaging.stats import messaging_stats
from zeal_asgi.metrics import CONTENT_TYPE, Family, Sample, metric_name as metric_name, render
from zeal_asgi.metrics.exposition import response
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.process import process_alive
from zeal_asgi.shm.segments import server_identity, shm_dir, shm_space
from zeal_asgi.store import Store

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = [
    "PING_TIMEOUT",
    "PROMETHEUS_CONTENT_TYPE",
    "BreakerHealth",
    "JobHealth",
    "ProbeHealth",
    "ShmHealth",
    "StoreHealth",
    "TableHealth",
    "collect",
    "families",
    "make_router",
    "metric_name",
    "prometheus_text",
    "router",
    "starlette_routes",
]

PING_TIMEOUT = 2.0
"""Seconds the readiness check waits for the backend's ping before answering 503."""
PROMETHEUS_CONTENT_TYPE = CONTENT_TYPE


class TableHealth(BaseModel):
    """One shared table: ``zeal_table_<field>{table="<name>"}`` in Prometheus."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    rows: int
    """Rows in the table."""
    capacity: int
    """Rows the table can hold."""
    memory_bytes: int
    """Shared memory reserved by the table."""
    lock_recoveries_total: int = Field(0, validation_alias="lock_recoveries")
    """Row locks recovered after their holder died."""
    rows_lost_total: int = Field(0, validation_alias="rows_lost")
    """Rows removed because a writer died in the middle of writing them."""
    lock_timeouts_total: int = Field(0, validation_alias="lock_timeouts")
    """Row-lock waits that timed out."""


class ShmHealth(BaseModel):
    """The shared-memory filesystem the tables live in (``zeal_shm_<field>``)."""

    dir: str
    free_bytes: int
    size_bytes: int


class BreakerHealth(BaseModel):
    """The circuit breaker (``on_error="fallback_table"``); its counters are ``zeal_breaker_*``."""

    state: str
    """``closed``, ``open`` or ``half-open`` (``zeal_breaker_state{state=...}``)."""
    failures_in_window: int = 0


class ProbeHealth(BaseModel):
    """Body of ``/health/live`` and ``/health/ready``."""

    status: Literal["ok", "unavailable"]
    pid: int
    """The worker that answered."""
    backend: str | None = None
    reason: str | None = None
    """Why the backend is unavailable (``None`` when it is ok)."""


class JobHealth(BaseModel):
    """One ``zeal.every`` job on this host: ``zeal_job_<field>{job="<name>"}`` in Prometheus."""

    model_config = ConfigDict(use_attribute_docstrings=True)

    runs_total: int = Field(validation_alias="runs")
    """Periods this host ran the job in."""
    failures_total: int = Field(validation_alias="failures")
    """Runs that raised or lost their lease."""
    last_start_seconds: float | None = Field(validation_alias="last_start")
    """When the last run started (Unix time)."""
    last_duration_seconds: float | None = Field(validation_alias="last_duration")
    """How long the last finished run took."""


class StoreHealth(ProbeHealth):
    """Body of ``GET /health/store`` (200 and 503 alike)."""

    backend: str
    server_id: str
    tables: dict[str, TableHealth] = Field(default_factory=dict)
    """Shared tables by name: the backend's, the tiered L1 and the breaker's ``fallback:``."""
    lock_recoveries_total: int = 0
    """Row locks recovered after their holder died, over every table."""
    shm: ShmHealth
    pool: dict[str, int] = Field(default_factory=dict)
    """This worker's connection pool: ``pool_size``, ``in_use``, ``waiting``, ``connections``."""
    pubsub_state: str | None = None
    """This worker's subscriber (``subscribed``, ``connecting``, ``backoff``, ``failed``, ...);
    ``None`` when it runs none."""
    streams_state: str | None = None
    """This worker's Streams consumers (``running``, ``failed``, ...); ``None`` when it runs
    none."""
    breaker: BreakerHealth | None = None
    workers_reporting: int = 0
    """Live workers of this host that have recorded counters (health checks included)."""
    host: dict[str, int] = Field(default_factory=dict)
    """Every event counter (``zeal_<area>_<what>_total``) summed over the workers of the host."""
    worker: dict[str, int] = Field(default_factory=dict)
    """The same counters, this worker's share."""
    jobs: dict[str, JobHealth] = Field(default_factory=dict)
    """``zeal.every`` jobs by name."""


def _store_of(conn: HTTPConnection) -> Store:
    state = conn.scope.get("state")
    zeal = state.get("zeal") if state is not None else None
    store = getattr(zeal, "store", None)
    return store if isinstance(store, Store) else Store.default()


def _tables(stats: Mapping[str, Any]) -> dict[str, TableHealth]:
    """Shared tables: the backend's own, the tiered L1 and the breaker's fallback tables."""
    out: dict[str, TableHealth] = {}
    sources = [("", stats), ("", stats.get("l1") or {}), ("fallback:", stats.get("fallback") or {})]
    for label, section in sources:
        for name, figures in (section.get("tables") or {}).items():
            out.setdefault(f"{label}{name}", TableHealth.model_validate(figures))
    return out


def _pool(stats: Mapping[str, Any]) -> dict[str, int]:
    """This worker's connection-pool gauges (redis, tiered's L2, memcached)."""
    for section in (stats.get("redis"), stats.get("memcached")):
        if isinstance(section, Mapping):
            gauges = ("pool_size", "in_use", "waiting", "connections")
            return {k: int(section[k]) for k in gauges if k in section}
    return {}


def _named(counters: Mapping[str, int]) -> dict[str, int]:
    out: collections.Counter[str] = collections.Counter()
    for key, value in counters.items():
        out[metric_name(key)] += value
    return dict(sorted(out.items()))


async def _probe(store: Store, breaker: BreakerHealth | None) -> str | None:
    """``None`` when the backend answers, else why not."""
    if breaker is not None and breaker.state == "open":
        # Don't ping through an open breaker: the answer is known and the ping would count.
        return "circuit breaker open: the backend failed repeatedly; reads use the fallback"
    try:
        ok = await asyncio.wait_for(store.ping(), PING_TIMEOUT)
    except TimeoutError:
        return f"backend did not answer a ping within {PING_TIMEOUT:g} s"
    except Exception as exc:  # any failure is the answer, not a 500
        return f"backend unreachable: {type(exc).__name__}: {exc}"
    return None if ok else "backend answered the ping with a failure"


def _breaker(stats: Mapping[str, Any]) -> BreakerHealth | None:
    raw = stats.get("breaker")
    return BreakerHealth.model_validate(raw) if isinstance(raw, Mapping) else None


async def collect(store: Store) -> StoreHealth:
    """Everything ``/health/store`` reports, for ``store`` (pings the backend)."""
    stats = store.stats()
    breaker = _breaker(stats)
    reason = await _probe(store, breaker)
    hs = host_stats()
    hs.incr("health_checks")
    ident = server_identity()
    # The server's owner (a launcher or a supervisor) may have counted its boot check: it is
    # not a worker, unless this process is both.
    workers = [p for p in hs.workers() if p == os.getpid() or p != ident.owner_pid]
    size, free = shm_space()
    tables = _tables(stats)
    messaging = messaging_stats()
    pubsub, streams = messaging["pubsub"].get("state"), messaging["streams"].get("state")
    if reason is None and pubsub == "failed":
        reason = "this worker's pub/sub subscriber gave up (max_attempts): it receives nothing"
    if reason is None and streams == "failed":
        reason = "this worker's Streams consumer gave up (max_attempts): it reads nothing"
    return StoreHealth(
        status="ok" if reason is None else "unavailable",
        reason=reason,
        backend=str(store.kind),
        pid=os.getpid(),
        server_id=ident.server_id,
        tables=tables,
        lock_recoveries_total=sum(t.lock_recoveries_total for t in tables.values()),
        shm=ShmHealth(dir=shm_dir(), free_bytes=free, size_bytes=size),
        pool=_pool(stats),
        pubsub_state=None if pubsub is None else str(pubsub),
        streams_state=None if streams is None else str(streams),
        breaker=breaker,
        workers_reporting=sum(1 for pid in workers if process_alive(pid, None)),
        host=_named(hs.host()),
        worker=_named(hs.worker()),
        jobs={name: JobHealth.model_validate(job) for name, job in job_stats().items()},
    )


def families(health: StoreHealth) -> list[Family]:
    """The figures of ``health`` as metric families, all host-wide (``*_total``: counters)."""
    out: list[Family] = []

    def family(name: str, help_: str, values: Mapping[str, float] | float, label: str = "") -> None:
        pairs = values.items() if isinstance(values, Mapping) else [("", values)]
        rows = [Sample(name, ((label, v),) if label else (), n) for v, n in pairs]
        kind = "counter" if name.endswith("_total") else "gauge"
        out.append(Family(name.removesuffix("_total"), kind, help_, rows))

    up = {health.backend: int(health.status == "ok")}
    family("zeal_up", "1 while the store backend answers.", up, "backend")
    family(
        "zeal_workers_reporting",
        "Live workers of this host that have recorded counters.",
        health.workers_reporting,
    )
    for field, info in TableHealth.model_fields.items():
        per_table = {n: getattr(t, field) for n, t in health.tables.items()}
        family(f"zeal_table_{field}", str(info.description), per_table, "table")
    family("zeal_shm_free_bytes", "Free bytes in the shm filesystem.", health.shm.free_bytes)
    family("zeal_shm_size_bytes", "Size of the shm filesystem.", health.shm.size_bytes)
    if health.breaker is not None:
        states = {s: int(health.breaker.state == s) for s in ("closed", "open", "half-open")}
        family("zeal_breaker_state", "1 for the circuit breaker's current state.", states, "state")
    for name, value in health.host.items():
        family(name, "Events summed over the workers of this host.", value)
    for field, info in JobHealth.model_fields.items() if health.jobs else ():
        jobs = {n: v for n, j in health.jobs.items() if (v := getattr(j, field)) is not None}
        family(f"zeal_job_{field}", str(info.description), jobs, "job")
    return out


def prometheus_text(health: StoreHealth, openmetrics: bool = False) -> str:
    """The Prometheus text exposition (format 0.0.4, or OpenMetrics) of ``health``."""
    return render(families(health), openmetrics)


async def live(conn: HTTPConnection) -> Response:
    """200 while this process serves requests: the pid, and nothing that can fail."""
    return JSONResponse({"status": "ok", "pid": os.getpid()})


async def ready(conn: HTTPConnection) -> Response:
    """200 while the backend answers a ping, 503 with the reason when it does not (or when the
    circuit breaker is open)."""
    store = _store_of(conn)
    reason = await _probe(store, _breaker(store.stats()))
    status: Literal["ok", "unavailable"] = "ok" if reason is None else "unavailable"
    body = ProbeHealth(status=status, pid=os.getpid(), backend=str(store.kind), reason=reason)
    code = 200 if reason is None else 503
    return JSONResponse(body.model_dump(mode="json", exclude_none=True), status_code=code)


async def store_health(conn: HTTPConnection) -> Response:
    """Backend, tables, shared memory, pool and counters; 503 when the backend is unreachable,
    the circuit breaker is open or this worker's pub/sub or Streams consumer gave up."""
    health = await collect(_store_of(conn))
    code = 200 if health.status == "ok" else 503
    return JSONResponse(health.model_dump(mode="json"), status_code=code)


async def store_metrics(conn: HTTPConnection) -> Response:
    """The same figures in the Prometheus text format (OpenMetrics when the ``Accept`` header
    asks), summed over the host's workers."""
    health = await collect(_store_of(conn))
    return response(families(health), conn.headers.get("accept", ""))


def make_router(
    path: str = "/health/store",
    metrics_path: str = "/health/store/metrics",
    live_path: str = "/health/live",
    ready_path: str = "/health/ready",
) -> APIRouter:
    """A FastAPI router serving the four endpoints (``/health/live``, ``/health/ready``,
    ``/health/store`` and its metrics), with response models in the OpenAPI schema.

    Needs FastAPI (the ``fastapi`` extra); a Starlette app uses :func:`starlette_routes`.
    """
    fastapi = require("fastapi", extra="fastapi", feature="zeal_asgi.health.router")
    r: APIRouter = fastapi.APIRouter(tags=["health"])
    # The OpenAPI schema shows each answer: JSON models (also for 503), Prometheus text.
    r.add_api_route(live_path, live, methods=["GET"], response_model=ProbeHealth)
    probes = ((ready_path, ready, ProbeHealth), (path, store_health, StoreHealth))
    for route, endpoint, model in probes:
        down: dict[int | str, Any] = {503: {"model": model, "description": "Backend unavailable"}}
        r.add_api_route(route, endpoint, methods=["GET"], response_model=model, responses=down)
    text: dict[int | str, Any] = {200: {"content": {"text/plain": {}}}}
    r.add_api_route(
        metrics_path, store_metrics, methods=["GET"], response_class=Response, responses=text
    )
    return r


def starlette_routes(
    path: str = "/health/store",
    metrics_path: str = "/health/store/metrics",
    live_path: str = "/health/live",
    ready_path: str = "/health/ready",
) -> list[Route]:
    """The same four endpoints for a plain Starlette app: ``Starlette(routes=[*routes, ...])``."""
    paths = (live_path, ready_path, path, metrics_path)
    endpoints = (live, ready, store_health, store_metrics)
    return [Route(route, endpoint) for route, endpoint in zip(paths, endpoints, strict=True)]


# ``router`` is built on first use, so this module imports without FastAPI installed.
__getattr__ = built_on_first_use(globals(), router=make_router)


if TYPE_CHECKING:
    router: APIRouter
    """``app.include_router(zeal_asgi.health.router)``: ``make_router()`` with the defaults."""
