"""``ZealMiddleware(..., http_metrics=True)``: requests by method, route template and status,
latency, in flight; templates never raw paths; a metrics failure never reaches a request."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable, Iterator
from typing import Any

import pytest
from fastapi import APIRouter, FastAPI
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Mount, Route
from starlette.testclient import TestClient
from starlette.types import ASGIApp, Message

from tests.metrics.conftest import MakeRegistry, scrape
from zeal_asgi import Zeal, ZealMiddleware, metrics
from zeal_asgi.metrics.http import HttpMetrics

REQS = "zeal_http_requests_total"


async def thing(request: Request) -> PlainTextResponse:
    return PlainTextResponse(request.path_params["id"])


def make_app() -> FastAPI:
    app = FastAPI()
    api = APIRouter(prefix="/api")

    @app.get("/items/{item_id}")
    async def item(item_id: int) -> dict[str, int]:
        return {"id": item_id}

    @api.post("/users/{user}/orders")
    async def order(user: str) -> dict[str, str]:
        return {"user": user}

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("boom")

    app.include_router(api)
    sub = Starlette(routes=[Route("/things/{id}", thing)])
    app.mount("/org/{org}", sub)
    app.add_middleware(ZealMiddleware, zeal=Zeal(), http_metrics=True)
    return app


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        yield c


def delta(before: dict[str, float], after: dict[str, float], prefix: str) -> dict[str, float]:
    """Samples starting with ``prefix`` that changed, and by how much."""
    return {
        k: v - before.get(k, 0)
        for k, v in after.items()
        if k.startswith(prefix) and v != before.get(k, 0)
    }


async def get_each(app: ASGIApp, paths: Iterable[str]) -> list[int]:
    """GET every path through the ASGI app itself (no HTTP client: 10,000 requests in seconds);
    the statuses."""
    statuses: list[int] = []

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    for path in paths:
        scope: dict[str, Any] = {"type": "http", "asgi": {"version": "3.0"}}
        scope |= {"http_version": "1.1", "method": "GET", "scheme": "http", "path": path}
        scope |= {"raw_path": path.encode()}
        scope |= {"query_string": b"", "root_path": "", "headers": [], "server": ("t", 80)}
        await app(scope, receive, send)
    return statuses


def test_ten_thousand_ids_make_one_series(client: TestClient) -> None:
    before = scrape(metrics.default_registry())
    t0 = time.monotonic()
    statuses = asyncio.run(get_each(client.app, (f"/items/{i}" for i in range(10_000))))
    print(f"10,000 requests in {time.monotonic() - t0:.1f} s")
    assert statuses == [200] * 10_000
    after = scrape(metrics.default_registry())
    assert delta(before, after, REQS) == {
        f'{REQS}{{method="GET",route="/items/{{item_id}}",status="200"}}': 10_000
    }
    lat = delta(before, after, "zeal_http_request_duration_seconds_count")
    assert lat == {
        'zeal_http_request_duration_seconds_count{method="GET",route="/items/{item_id}"}': 10_000
    }
    assert after["zeal_http_requests_in_flight"] == 0


def test_templates_through_routers_and_mounts_and_what_matches_nothing(client: TestClient) -> None:
    before = scrape(metrics.default_registry())
    assert client.post("/api/users/u1/orders").status_code == 200
    assert client.post("/api/users/u2/orders").status_code == 200
    assert client.get("/org/acme/things/1").text == "1"
    assert client.get("/org/globex/things/2").text == "2"
    assert client.get("/no/such/path").status_code == 404
    assert client.get("/no/other").status_code == 404
    assert client.get("/boom").status_code == 500
    assert client.request("PURGE", "/items/1").status_code == 405
    assert client.request("BREW", "/items/2").status_code == 405
    got = delta(before, scrape(metrics.default_registry()), REQS)
    assert got == {
        f'{REQS}{{method="POST",route="/api/users/{{user}}/orders",status="200"}}': 2,
        f'{REQS}{{method="GET",route="/org/{{org}}/things/{{id}}",status="200"}}': 2,
        f'{REQS}{{method="GET",route="unmatched",status="404"}}': 2,
        f'{REQS}{{method="GET",route="/boom",status="500"}}': 1,
        f'{REQS}{{method="other",route="/items/{{item_id}}",status="405"}}': 2,
    }


@pytest.mark.parametrize("starlette", ["1.7 and later", "before 1.7"])
def test_plain_starlette_routes_and_mounts_are_labelled_by_template(
    make_registry: MakeRegistry, starlette: str
) -> None:
    # pyproject allows starlette 0.40; its Router put only the matched endpoint in the scope
    # (from 1.7 also the route): both must give the same templates.
    registry = make_registry()
    record = HttpMetrics(registry)

    async def item(request: Request) -> PlainTextResponse:
        return PlainTextResponse("item")

    inner = Starlette(
        routes=[
            Route("/items/{item_id}", item),
            Mount("/org/{org}", app=Starlette(routes=[Route("/things/{id}", thing)])),
        ]
    )

    async def routed(scope: dict[str, object], receive: object, send: object) -> None:
        await inner(scope, receive, send)  # type: ignore[arg-type]
        if starlette == "before 1.7":
            scope.pop("route", None)

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "http":
            scope["app"] = inner  # as Starlette sets it before any middleware runs
            await record(routed, scope, receive, send)  # type: ignore[arg-type]
        else:
            await inner(scope, receive, send)  # type: ignore[arg-type]

    with TestClient(app) as c:  # type: ignore[arg-type]
        assert [c.get(p).status_code for p in ("/items/1", "/items/2", "/org/a/things/3")] == [
            200,
            200,
            200,
        ]
        assert [c.get(p).status_code for p in ("/org/a/nothing", "/nowhere")] == [404, 404]
    assert delta({}, scrape(registry), REQS) == {
        f'{REQS}{{method="GET",route="/items/{{item_id}}",status="200"}}': 2,
        f'{REQS}{{method="GET",route="/org/{{org}}/things/{{id}}",status="200"}}': 1,
        f'{REQS}{{method="GET",route="/org/{{org}}/{{path}}",status="404"}}': 1,
        f'{REQS}{{method="GET",route="unmatched",status="404"}}': 1,
    }


def test_a_failing_registry_never_reaches_the_request(make_registry: MakeRegistry) -> None:
    full = make_registry(1)  # room for no series at all, once the in-flight gauge has its row
    record = HttpMetrics(full)

    async def hello(request: Request) -> PlainTextResponse:
        return PlainTextResponse("hi")

    inner = Starlette(routes=[Route("/r/{n}", hello)])

    async def app(scope: dict[str, object], receive: object, send: object) -> None:
        if scope["type"] == "http":
            await record(inner, scope, receive, send)  # type: ignore[arg-type]
        else:
            await inner(scope, receive, send)  # type: ignore[arg-type]

    with TestClient(app) as c:  # type: ignore[arg-type]
        for n in range(20):
            assert c.get(f"/r/{n}").text == "hi"
    assert len(full.table) == 1
