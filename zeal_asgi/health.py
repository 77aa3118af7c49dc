"""Health of the store: ``GET /health/store`` (JSON) and ``GET /health/store/metrics`` (Prometheus).

``app.include_router(zeal_asgi.health.router)``.  The JSON answer is 200 while the backend
answers and 503, with the reason, when it does not or when the circuit breaker is open.  Table
figures come from shared memory and are host-wide already; event counters (pool, pub/sub,
breaker, ...) are recorded per worker in :mod:`zeal_asgi.shm.hoststats` and summed over every worker
of the host, so any worker answers for the whole host.  A plain Starlette app uses
``Starlette(routes=zeal_asgi.health.starlette_routes())``.
"""

from __future__ import annotations

import asyncio
import math
import os
import re
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, Field
from starlette.requests import HTTPConnection
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from zeal_asgi.errors import require
from zeal_asgi.messaging.pubsub import messaging_stats
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.process import process_alive
from zeal_asgi.shm.segments import server_identity, shm_dir
from zeal_asgi.store import Store

if TYPE_CHECKING:
    from fastapi import APIRouter

__all__ = [
    "PING_TIMEOUT",
    "PROMETHEUS_CONTENT_TYPE",
    "BreakerHealth",
    "ShmHealth",
    "StoreHealth",
    "TableHealth",
    "collect",
    "make_router",
    "prometheus_text",
    "router",
    "starlette_routes",
    "store_health",
    "store_metrics",
]

PING_TIMEOUT = 2.0
"""Seconds the health check waits for the backend's ping before answering 503."""


class TableHealth(BaseModel):
    """One shared table (or the L1 table of the tiered backend)."""

    rows: int
    capacity: int
    memory_bytes: int
    lock_recoveries: int = 0
    rows_lost: int = 0
    lock_timeouts: int = 0


class ShmHealth(BaseModel):
    """The shared-memory filesystem the tables live in."""

    dir: str
    free_bytes: int
    total_bytes: int


class BreakerHealth(BaseModel):
    """The circuit breaker in front of the backend (``on_error="fallback_table"``)."""

    state: str
    """``closed``, ``open`` or ``half-open``."""
    counters: dict[str, int] = Field(default_factory=dict)


class StoreHealth(BaseModel):
    """Body of ``GET /health/store`` (200 and 503 alike)."""

    status: Literal["ok", "unavailable"]
    reason: str | None = None
    """Why the store is unavailable (``None`` when it is ok)."""
    backend: str
    pid: int
    """The worker that answered."""
    server_id: str
    tables: dict[str, TableHealth] = Field(default_factory=dict)
    lock_recoveries: int = 0
    """Row locks recovered after their holder died, over every table."""
    shm: ShmHealth
    pool: dict[str, int] = Field(default_factory=dict)
    """This worker's connection pool (size, in use, waiting, acquires, timeouts, ...)."""
    pubsub: dict[str, int] = Field(default_factory=dict)
    """Pub/sub counters summed over the host (published, received, dropped, reconnects, ...)."""
    pubsub_state: str | None = None
    """This worker's subscriber (``subscribed``, ``connecting``, ``backoff``, ``failed``, ...);
    ``None`` when it runs none."""
    streams: dict[str, int] = Field(default_factory=dict)
    """Streams counters summed over the host (acked, reclaimed, dead-lettered, ...)."""
    breaker: BreakerHealth | None = None
    workers_reporting: int = 0
    """Live workers of this host that have recorded counters (health checks included)."""
    host: dict[str, int] = Field(default_factory=dict)
    """Event counters summed over every worker of the host."""


def _store_of(conn: HTTPConnection) -> Store:
    state = conn.scope.get("state")
    zeal = state.get("zeal") if state is not None else None
    store = getattr(zeal, "store", None)
    return store if isinstance(store, Store) else Store.default()


def _ints(d: Any) -> dict[str, int]:
    if not isinstance(d, Mapping):
        return {}
    return {
        str(k): int(v)
        for k, v in d.items()
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


def _pool(stats: Mapping[str, Any]) -> dict[str, int]:
    """This worker's connection-pool gauges and counters (redis / memcached / tiered's L2)."""
    out: dict[str, int] = {}
    for name in ("redis", "memcached", "l2"):
        sub = stats.get(name)
        if isinstance(sub, Mapping):
            out.update(_ints(sub))
            out.update(_ints(sub.get("worker")))
            if name == "l2":
                out.update(_pool(sub))
    return out


def _tables(stats: Mapping[str, Any]) -> dict[str, TableHealth]:
    """Shared tables: the backend's own, the tiered L1 and the breaker's fallback tables."""
    out: dict[str, TableHealth] = {}
    sources: list[tuple[str, Any]] = [("", stats.get("tables"))]
    for sub, label in (("l1", ""), ("fallback", "fallback:")):
        inner = stats.get(sub)
        if isinstance(inner, Mapping):
            sources.append((label, inner.get("tables")))
    for label, tables in sources:
        if not isinstance(tables, Mapping):
            continue
        for name, t in tables.items():
            if isinstance(t, Mapping) and "rows" in t and "capacity" in t:
                fields = {k: v for k, v in _ints(t).items() if k in TableHealth.model_fields}
                out.setdefault(f"{label}{name}", TableHealth(**fields))
    return out


def _breaker(stats: Mapping[str, Any]) -> BreakerHealth | None:
    raw = stats.get("breaker")
    if isinstance(raw, Mapping) and "state" in raw:
        return BreakerHealth(state=str(raw["state"]), counters=_ints(raw))
    return None


def _family(host: Mapping[str, int], family: str) -> dict[str, int]:
    """Host counters ``<family>_*`` (pub/sub, streams), without the prefix."""
    pre = family + "_"
    return {k[len(pre) :]: v for k, v in host.items() if k.startswith(pre)}


def _pubsub_state() -> str | None:
    """State of this worker's subscriber (``running``, ``failed``, ...), if it runs one."""
    state = messaging_stats()["pubsub"].get("state")
    return None if state is None else str(state)


def _shm() -> ShmHealth:
    d = shm_dir()
    try:
        st = os.statvfs(d)
    except OSError:
        return ShmHealth(dir=d, free_bytes=0, total_bytes=0)
    return ShmHealth(
        dir=d, free_bytes=st.f_bavail * st.f_frsize, total_bytes=st.f_blocks * st.f_frsize
    )


def _live_workers(per_worker: Mapping[int, Any]) -> int:
    return sum(1 for pid in per_worker if process_alive(pid, None))


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


async def collect(store: Store) -> StoreHealth:
    """Everything ``/health/store`` reports, for ``store`` (pings the backend)."""
    stats = store.stats()
    breaker = _breaker(stats)
    reason = await _probe(store, breaker)
    hs = host_stats()
    hs.incr("health_checks_total")
    host = hs.host()
    tables = _tables(stats)
    return StoreHealth(
        status="ok" if reason is None else "unavailable",
        reason=reason,
        backend=str(store.kind),
        pid=os.getpid(),
        server_id=server_identity().server_id,
        tables=tables,
        lock_recoveries=sum(t.lock_recoveries for t in tables.values()),
        shm=_shm(),
        pool=_pool(stats),
        pubsub=_family(host, "pubsub"),
        pubsub_state=_pubsub_state(),
        streams=_family(host, "streams"),
        breaker=breaker,
        workers_reporting=_live_workers(hs.workers()),
        host=host,
    )


# -- Prometheus ---------------------------------------------------------------------------------

_BAD = re.compile(r"[^a-zA-Z0-9_]")
_BREAKER_STATES = ("closed", "open", "half-open")


def _metric(name: str) -> str:
    clean = _BAD.sub("_", name).strip("_") or "unnamed"
    return clean if not clean[0].isdigit() else "_" + clean


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _number(value: float) -> str:
    if isinstance(value, int) or (math.isfinite(value) and value.is_integer()):
        return str(int(value))
    return repr(value)


def prometheus_text(health: StoreHealth) -> str:
    """The Prometheus text exposition (format 0.0.4) of ``health``.

    Every figure is host-wide: table figures come from shared memory, event counters are
    summed over the workers (``redis.acquires`` becomes ``zeal_redis_acquires_total``).
    """
    lines: list[str] = []

    def family(name: str, kind: str, help_: str, samples: list[tuple[str, float]]) -> None:
        lines.append(f"# HELP {name} {help_}")
        lines.append(f"# TYPE {name} {kind}")
        lines.extend(f"{name}{labels} {_number(value)}" for labels, value in samples)

    backend = f'{{backend="{_label(health.backend)}"}}'
    family(
        "zeal_up",
        "gauge",
        "1 when the store backend answers, 0 when it is unreachable or the breaker is open.",
        [(backend, 1 if health.status == "ok" else 0)],
    )
    family(
        "zeal_workers_reporting",
        "gauge",
        "Live workers of this host that have recorded counters.",
        [("", health.workers_reporting)],
    )
    table_figures = (
        ("rows", "gauge", "Rows in the shared table."),
        ("capacity", "gauge", "Rows the shared table can hold."),
        ("memory_bytes", "gauge", "Shared memory reserved by the table."),
        ("lock_recoveries", "counter", "Row locks recovered after their holder died."),
        ("rows_lost", "counter", "Rows dropped because a writer died mid-write."),
        ("lock_timeouts", "counter", "Row-lock waits that timed out."),
    )
    for field, kind, help_ in table_figures:
        suffix = "_total" if kind == "counter" else ""
        family(
            f"zeal_table_{field}{suffix}",
            kind,
            help_,
            [(f'{{table="{_label(n)}"}}', getattr(t, field)) for n, t in health.tables.items()],
        )
    family(
        "zeal_shm_free_bytes",
        "gauge",
        "Free bytes in the shm filesystem.",
        [("", health.shm.free_bytes)],
    )
    family(
        "zeal_shm_size_bytes",
        "gauge",
        "Size of the shm filesystem.",
        [("", health.shm.total_bytes)],
    )
    if health.breaker is not None:
        family(
            "zeal_breaker_state",
            "gauge",
            "1 for the circuit breaker's current state.",
            [(f'{{state="{s}"}}', 1 if health.breaker.state == s else 0) for s in _BREAKER_STATES],
        )
    totals: dict[str, int] = {}
    for metric, value in health.host.items():
        # Every host counter is a monotonic count (HostStats.incr): expose it as a counter.
        name = "zeal_" + _metric(metric).removesuffix("_total") + "_total"
        totals[name] = totals.get(name, 0) + value
    for name, value in sorted(totals.items()):
        family(name, "counter", "Events summed over the workers of this host.", [("", value)])
    return "\n".join(lines) + "\n"


PROMETHEUS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


async def store_health(conn: HTTPConnection) -> Response:
    """Backend kind, tables, shared memory, pool / pub-sub / breaker counters; 503 when the
    backend is unreachable or the circuit breaker is open."""
    health = await collect(_store_of(conn))
    code = 200 if health.status == "ok" else 503
    return JSONResponse(health.model_dump(mode="json"), status_code=code)


async def store_metrics(conn: HTTPConnection) -> Response:
    """The same figures in the Prometheus text format, summed over the host's workers."""
    health = await collect(_store_of(conn))
    return Response(prometheus_text(health), media_type=PROMETHEUS_CONTENT_TYPE)


def make_router(
    path: str = "/health/store", metrics_path: str = "/health/store/metrics"
) -> APIRouter:
    """A FastAPI router serving the health JSON at ``path`` and Prometheus at ``metrics_path``.

    Needs FastAPI (the ``fastapi`` extra); a Starlette app uses :func:`starlette_routes`.
    """
    fastapi = require("fastapi", extra="fastapi", feature="zeal_asgi.health.router")
    r: APIRouter = fastapi.APIRouter(tags=["health"])
    r.add_api_route(
        path,
        store_health,
        methods=["GET"],
        response_model=StoreHealth,
        responses={503: {"model": StoreHealth, "description": "Store unavailable"}},
        summary="Store health",
    )
    r.add_api_route(
        metrics_path,
        store_metrics,
        methods=["GET"],
        response_class=Response,
        responses={200: {"content": {"text/plain": {}}}},
        summary="Store metrics (Prometheus)",
    )
    return r


def starlette_routes(
    path: str = "/health/store", metrics_path: str = "/health/store/metrics"
) -> list[Route]:
    """The same two endpoints for a plain Starlette app: ``Starlette(routes=[*routes, ...])``."""
    return [Route(path, store_health), Route(metrics_path, store_metrics)]


def __getattr__(name: str) -> Any:
    # ``router`` is built on first use, so this module imports without FastAPI installed.
    if name == "router":
        router = make_router()
        globals()["router"] = router
        return router
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


if TYPE_CHECKING:
    router: APIRouter
    """``app.include_router(zeal_asgi.health.router)``: ``make_router()`` with the defaults."""
