"""Request metrics of an ASGI app (``ZealMiddleware(..., http_metrics=True)``): count by method,
route template and status, latency by method and route template, requests in flight.

Routes are labelled by their template (``/items/{item_id}``), never by the raw path, so 10,000
ids make one series; a request no route matched is ``unmatched``, a method outside HTTP's own is
``other``.  A failing metric call is logged once and never reaches the request.
"""

from __future__ import annotations

import functools
import time
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zeal_asgi.metrics.kinds import Counter, Gauge, Histogram
from zeal_asgi.metrics.registry import Registry, default_registry, log

METHODS = frozenset(
    {"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE", "CONNECT"}
)

_templates: dict[int, tuple[Any, str]] = {}  # id(route or endpoint) -> (it, template); few


def _find(routes: Any, target: object, prefix: str) -> str | None:
    for route in routes:
        # Starlette before 1.7 leaves no "route" in the scope, only the "endpoint": a Route's
        # endpoint, or the app of a Mount whose own routes matched nothing.
        own = (route, getattr(route, "endpoint", None), getattr(route, "app", None))
        if any(x is target for x in own):
            return prefix + str(getattr(route, "path_format", ""))
        inner = getattr(route, "routes", None)  # Mount, Host
        found = inner and _find(inner, target, prefix + str(getattr(route, "path", "")))
        if found:
            return found
    return None


def route_template(scope: Scope, app: Any) -> str:
    """The template of the route that answered (``/org/{org}/items/{id}`` through mounts), or
    ``unmatched``; ``app`` is the application the request entered (its ``scope["app"]``)."""
    target = scope.get("route")
    if target is None:
        target = scope.get("endpoint")  # Starlette before 1.7 sets only this
    if target is None:
        return "unmatched"
    hit = _templates.get(id(target))
    if hit is None:
        found = _find(getattr(app, "routes", ()), target, "")
        template = found or str(getattr(target, "path_format", "unmatched"))
        hit = _templates[id(target)] = (target, template)
    return hit[1]


class HttpMetrics:
    """The three request metrics of a registry, and the wrapper that records them."""

    def __init__(self, registry: Registry) -> None:
        self.requests = Counter(
            "zeal_http_requests_total",
            "HTTP requests answered, by method, route template and status.",
            ("method", "route", "status"),
            registry=registry,
        )
        self.latency = Histogram(
            "zeal_http_request_duration_seconds",
            "Seconds to answer an HTTP request, by method and route template.",
            ("method", "route"),
            registry=registry,
        )
        self.in_flight = Gauge(
            "zeal_http_requests_in_flight", "HTTP requests being answered now.", registry=registry
        )
        self._failed = False

    async def __call__(self, app: ASGIApp, scope: Scope, receive: Receive, send: Send) -> None:
        """Run ``app`` on an HTTP request and record it."""
        status = 500  # the app raised before it answered
        entered = scope.get("app")

        async def send_status(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        start = time.perf_counter()
        self._safely(self.in_flight.inc)
        try:
            await app(scope, receive, send_status)
        finally:
            elapsed = time.perf_counter() - start
            self._safely(self._record, scope, entered, status, elapsed)

    def _record(self, scope: Scope, app: Any, status: int, elapsed: float) -> None:
        self.in_flight.dec()
        method = scope.get("method", "")
        method = method if method in METHODS else "other"
        route = route_template(scope, app)
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(elapsed)

    def _safely(self, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            if not self._failed:
                self._failed = True
                log.exception("zeal_asgi.metrics: recording a request failed (logged once)")


@functools.cache
def _for(registry: Registry) -> HttpMetrics:
    return HttpMetrics(registry)


def http_metrics(registry: Registry | None = None) -> HttpMetrics:
    """The request metrics of ``registry`` (the default one), declared on first use."""
    return _for(registry if registry is not None else default_registry())
