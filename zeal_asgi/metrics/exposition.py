"""The one home of Prometheus exposition: the naming rule of zeal's own counters, the text
format 0.0.4 and OpenMetrics 1.0, the ``/metrics`` endpoint and a ``prometheus_client``
collector."""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Awaitable, Callable, Iterable, Iterator
from typing import TYPE_CHECKING, Any

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from zeal_asgi.errors import require
from zeal_asgi.metrics.registry import Family, Registry, default_registry

if TYPE_CHECKING:
    from fastapi import APIRouter

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
OPENMETRICS_CONTENT_TYPE = "application/openmetrics-text; version=1.0.0; charset=utf-8"

_NOT_NAME = re.compile(r"[^a-z0-9_]+")


def metric_name(counter: str) -> str:
    """The one name of zeal's event counters: ``zeal_<area>_<what>_total`` (Prometheus style).

    Each area records its counters as ``<area>_<what>`` (``pubsub_received``, ``cache.hits``,
    ``breaker_opened_total``); this maps them, and both the JSON of ``/health/store`` and the
    metrics use the result.
    """
    clean = _NOT_NAME.sub("_", counter.lower()).strip("_").removeprefix("zeal_")
    return f"zeal_{clean.removesuffix('_total')}_total"


def _number(v: float) -> str:
    if isinstance(v, int) or (v.is_integer() and abs(v) < 2**53):
        return str(int(v))  # integers stay integers (no 2.5e+10)
    if math.isnan(v):
        return "NaN"
    return ("+Inf" if v > 0 else "-Inf") if math.isinf(v) else repr(v)


def _escape(text: str, quote: bool = True) -> str:
    text = text.replace("\\", "\\\\").replace("\n", "\\n")
    return text.replace('"', '\\"') if quote else text


@functools.lru_cache(maxsize=65536)
def _series(name: str, labels: tuple[tuple[str, str], ...]) -> str:
    """``name{a="x",b="y"}``, made once per series: scrapes repeat them."""
    pairs = ",".join(f'{k}="{_escape(v)}"' for k, v in labels)
    return f"{name}{{{pairs}}}" if labels else name


def render(families: Iterable[Family], openmetrics: bool = False) -> str:
    """``families`` in the Prometheus text format 0.0.4, or OpenMetrics 1.0 (which names a
    counter's family without ``_total`` and ends with ``# EOF``)."""
    lines: list[str] = []
    for f in families:
        head = f.name if openmetrics or f.type != "counter" else f.name + "_total"
        lines += (f"# HELP {head} {_escape(f.help, openmetrics)}", f"# TYPE {head} {f.type}")
        lines += [f"{_series(s.name, s.labels)} {_number(s.value)}" for s in f.samples]
    if openmetrics:
        lines.append("# EOF")
    return "\n".join(lines) + "\n"


def response(families: Iterable[Family], accept: str) -> Response:
    """``families`` rendered in the format an ``Accept`` header asks for."""
    om = any(p.split(";")[0].strip() == "application/openmetrics-text" for p in accept.split(","))
    body = render(families, om)
    return Response(body, media_type=OPENMETRICS_CONTENT_TYPE if om else CONTENT_TYPE)


def endpoint(registry: Registry | None = None) -> Callable[[Request], Awaitable[Response]]:
    """The ``GET /metrics`` endpoint of ``registry`` (the default one unless given)."""

    async def metrics(request: Request) -> Response:
        families = (registry or default_registry()).collect()
        return response(families, request.headers.get("accept", ""))

    return metrics


def routes(path: str = "/metrics", registry: Registry | None = None) -> list[Route]:
    """The endpoint for a plain Starlette app: ``Starlette(routes=[*metrics.routes(), ...])``."""
    return [Route(path, endpoint(registry), methods=["GET"])]


def make_router(path: str = "/metrics", registry: Registry | None = None) -> APIRouter:
    """A FastAPI router serving ``GET /metrics`` (needs the ``fastapi`` extra)."""
    fastapi = require("fastapi", extra="fastapi", feature="zeal_asgi.metrics.router")
    router: APIRouter = fastapi.APIRouter(tags=["metrics"])
    router.add_route(path, endpoint(registry), methods=["GET"], include_in_schema=False)
    return router


class Collector:
    """The metrics of ``registry`` for a ``prometheus_client`` registry:
    ``prometheus_client.REGISTRY.register(metrics.collector())`` (needs ``prometheus-client``)."""

    def __init__(self, registry: Registry | None = None) -> None:
        self._metric = require(
            "prometheus_client.metrics_core", extra="prometheus", feature="metrics.collector()"
        ).Metric
        self._registry = registry

    def collect(self) -> Iterator[Any]:
        """One ``prometheus_client`` metric family per metric, read from shared memory now."""
        for f in (self._registry or default_registry()).collect():
            family = self._metric(f.name, f.help, f.type)
            for s in f.samples:
                family.add_sample(s.name, dict(s.labels), s.value)
            yield family
