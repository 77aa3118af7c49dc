"""The decorator leaves a FastAPI route as it was: schema, parameters, rendered bytes."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, Query, Request, Response
from fastapi.responses import HTMLResponse, PlainTextResponse
from pydantic import BaseModel, Field
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.response_cache.conftest import client
from zeal_asgi.cache import Cache
from zeal_asgi.response_cache import cache_response


class Out(BaseModel):
    id: int
    name: str = Field(alias="displayName")
    note: str | None = None


class Inner(BaseModel):
    id: int
    name: str
    secret: str


def tracer(response: Response) -> None:
    """A dependency that sets a header on the route's response."""
    response.headers["x-traced"] = "1"


def build(wrap: Callable[[Any], Any]) -> FastAPI:
    """The same routes, each passed through ``wrap`` (identity, or the cache decorator)."""
    app = FastAPI(title="same")

    @app.get("/model/{item_id}", response_model=Out, response_model_exclude_none=True)
    @wrap
    async def model(item_id: int, q: Annotated[str | None, Query(max_length=5)] = None) -> Any:
        """Reads a model (the docstring is the description)."""
        return Inner(id=item_id, name=q or "n", secret="hidden").model_dump() | {
            "displayName": q or "n"
        }

    @app.get("/created", status_code=201, response_class=PlainTextResponse)
    @wrap
    async def created() -> str:
        return "made"

    @app.get("/html", response_class=HTMLResponse, dependencies=[Depends(tracer)])
    @wrap
    async def html() -> str:
        return "<b>hi</b>"

    @app.get("/headers")
    @wrap
    async def headers(response: Response, request: Request) -> dict[str, str]:
        response.headers["x-custom"] = "v"
        response.status_code = 202
        return {"path": request.url.path}

    @app.get("/returns-response")
    @wrap
    async def returns_response() -> JSONResponse:
        return JSONResponse({"direct": True}, headers={"x-direct": "1"})

    @app.get("/list")
    @wrap
    def listing(limit: int = 3) -> list[int]:
        return list(range(limit))

    return app


@pytest.fixture
def pair(cache: Cache) -> tuple[FastAPI, FastAPI]:
    return build(lambda fn: fn), build(cache_response(60, cache=cache, tags=("t",)))


def test_openapi_schema_is_identical(pair: tuple[FastAPI, FastAPI]) -> None:
    plain, cached = pair
    assert cached.openapi() == plain.openapi()
    schema = cached.openapi()["paths"]["/model/{item_id}"]["get"]
    assert [p["name"] for p in schema["parameters"]] == ["item_id", "q"]
    assert schema["description"] == "Reads a model (the docstring is the description)."


def test_route_signature_and_name_are_kept(pair: tuple[FastAPI, FastAPI]) -> None:
    plain, cached = pair
    for a, b in zip(plain.routes, cached.routes, strict=True):
        assert getattr(a, "name", None) == getattr(b, "name", None)
        assert getattr(a, "response_model", None) == getattr(b, "response_model", None)


@pytest.mark.parametrize(
    "path",
    ["/model/5?q=abc", "/model/5", "/created", "/html", "/headers", "/returns-response", "/list"],
)
async def test_cached_bytes_equal_the_uncached_route(
    pair: tuple[FastAPI, FastAPI], path: str
) -> None:
    plain, cached = pair
    async with client(plain) as c:
        want = await c.get(path)
    async with client(cached) as c:
        miss = await c.get(path)
        hit = await c.get(path)
    ours = {"etag", "cache-control", "vary", "age"}
    for got in (miss, hit):
        assert got.status_code == want.status_code
        assert got.content == want.content
        assert {k: v for k, v in got.headers.items() if k not in ours} == dict(want.headers)
    if want.status_code == 200:  # the only status stored by default
        assert hit.headers["age"] == "0"
    else:
        assert "etag" not in hit.headers
    assert b"hidden" not in hit.content  # the response model filtered the inner value


async def test_validation_errors_are_untouched(pair: tuple[FastAPI, FastAPI]) -> None:
    plain, cached = pair
    async with client(plain) as c:
        want = await c.get("/model/x?q=toolongvalue")
    async with client(cached) as c:
        got = await c.get("/model/x?q=toolongvalue")
    assert got.status_code == want.status_code == 422
    assert got.json() == want.json()


async def test_a_starlette_endpoint_can_be_decorated(cache: Cache) -> None:
    runs = []

    @cache_response(30, cache=cache, tags=("user:{name}",))
    async def page(request: Request) -> JSONResponse:
        runs.append(request.path_params["name"])
        return JSONResponse({"name": request.path_params["name"]})

    app = Starlette(routes=[Route("/users/{name}", page)])
    async with client(app) as c:
        first = await c.get("/users/ada")
        second = await c.get("/users/ada")
    assert first.json() == second.json() == {"name": "ada"}
    assert second.headers["cache-control"] == "public, max-age=30"
    assert second.headers["age"] == "0" and runs == ["ada"]


async def test_a_request_parameter_of_the_route_is_shared(cache: Cache) -> None:
    app = FastAPI()

    @app.get("/who")
    @cache_response(30, cache=cache)
    async def who(request: Request) -> dict[str, str]:
        return {"host": request.headers["host"]}

    async with client(app) as c:
        assert (await c.get("/who")).json() == {"host": "test"}
        assert (await c.get("/who")).headers["age"] == "0"


def test_fastapi_is_imported_only_when_a_fastapi_route_is_served() -> None:
    code = "import sys, zeal_asgi.response_cache; print('fastapi' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
