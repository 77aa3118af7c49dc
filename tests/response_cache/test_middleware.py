"""``ResponseCacheMiddleware`` on a Starlette app: the same rules, at the ASGI level."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.response_cache.conftest import client
from zeal_asgi.cache import Cache
from zeal_asgi.errors import ConfigError
from zeal_asgi.response_cache import ResponseCacheMiddleware, invalidate

ETAG = re.compile(r'^"[0-9a-f]{32}"$')


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def app(cache: Cache, calls: list[str]) -> Starlette:
    async def page(request: Request) -> Response:
        calls.append(request.url.path)
        return JSONResponse({"path": request.url.path, "lang": request.headers.get("x-lang")})

    async def cookie(request: Request) -> Response:
        calls.append("cookie")
        r = PlainTextResponse("c")
        r.set_cookie("a", "b")
        return r

    async def missing(request: Request) -> Response:
        calls.append("missing")
        return PlainTextResponse("no", status_code=404)

    async def stream(request: Request) -> Response:
        calls.append("stream")

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(3):
                yield f"chunk{i};".encode()

        return StreamingResponse(chunks())

    async def post(request: Request) -> Response:
        calls.append("post")
        return PlainTextResponse("posted")

    routes = [
        Route("/api/page/{n}", page),
        Route("/api/cookie", cookie),
        Route("/api/missing", missing),
        Route("/api/stream", stream),
        Route("/api/post", post, methods=["POST", "GET"]),
        Route("/other", page),
    ]
    options = {"vary": ("X-Lang",), "tags": ("pages",), "prefixes": ("/api/",), "cache": cache}
    return Starlette(routes=routes, middleware=[Middleware(ResponseCacheMiddleware, 45, **options)])  # type: ignore[arg-type]


async def test_miss_hit_304_and_head(app: Starlette, calls: list[str]) -> None:
    async with client(app) as c:
        miss = await c.get("/api/page/1")
        hit = await c.get("/api/page/1")
        nm = await c.get("/api/page/1", headers={"if-none-match": f'"x", {miss.headers["etag"]}'})
        head = await c.head("/api/page/1")
    assert calls == ["/api/page/1"]
    assert miss.json() == hit.json() == {"path": "/api/page/1", "lang": None}
    assert ETAG.match(miss.headers["etag"]) and hit.headers["etag"] == miss.headers["etag"]
    assert miss.headers["cache-control"] == "public, max-age=45" and "age" not in miss.headers
    assert hit.headers["age"] == "0" and hit.headers["vary"] == "x-lang"
    assert nm.status_code == 304 and nm.content == b"" and nm.headers["vary"] == "x-lang"
    assert nm.headers["etag"] == miss.headers["etag"]
    assert nm.headers["cache-control"] == "public, max-age=45"
    assert head.status_code == 200 and head.content == b""
    assert head.headers["content-length"] == miss.headers["content-length"]


async def test_a_head_miss_goes_to_the_app_and_stores_nothing(
    app: Starlette, calls: list[str]
) -> None:
    async with client(app) as c:
        head = await c.head("/api/page/2")
        get = await c.get("/api/page/2")
    assert head.status_code == 200 and "etag" not in head.headers
    assert "age" not in get.headers  # the GET was the miss
    assert calls == ["/api/page/2", "/api/page/2"]


async def test_vary(app: Starlette, calls: list[str]) -> None:
    async with client(app) as c:
        a = await c.get("/api/page/1", headers={"x-lang": "a"})
        b = await c.get("/api/page/1", headers={"x-lang": "b"})
        a2 = await c.get("/api/page/1", headers={"x-lang": "a"})
    assert (a.json()["lang"], b.json()["lang"], a2.json()["lang"]) == ("a", "b", "a")
    assert a2.headers["age"] == "0" and len(calls) == 2


@pytest.mark.parametrize("path", ["/api/cookie", "/api/missing", "/other"])
async def test_not_stored(app: Starlette, calls: list[str], path: str) -> None:
    async with client(app) as c:
        first = await c.get(path)
        second = await c.get(path)
    assert len(calls) == 2
    assert first.content == second.content
    assert "etag" not in first.headers and "etag" not in second.headers


async def test_streams_pass_through_whole(app: Starlette, calls: list[str]) -> None:
    async with client(app) as c:
        for _ in range(2):
            r = await c.get("/api/stream")
            assert r.text == "chunk0;chunk1;chunk2;" and "etag" not in r.headers
    assert calls == ["stream", "stream"]


async def test_other_methods_pass_through(app: Starlette, calls: list[str]) -> None:
    async with client(app) as c:
        assert (await c.post("/api/post")).text == "posted"
        assert (await c.post("/api/post")).text == "posted"
    assert calls == ["post", "post"]


async def test_invalidate_a_middleware_tag(app: Starlette, cache: Cache, calls: list[str]) -> None:
    async with client(app) as c:
        await c.get("/api/page/1")
        await c.get("/api/page/2")
        assert await invalidate(tags=["pages"], cache=cache) == 1
        again = await c.get("/api/page/1")
    assert "age" not in again.headers
    assert calls == ["/api/page/1", "/api/page/2", "/api/page/1"]


def test_bad_configuration(cache: Cache) -> None:
    app = Starlette()
    with pytest.raises(ConfigError, match="fixed"):
        ResponseCacheMiddleware(app, 10, tags=("item:{id}",), cache=cache)
    with pytest.raises(ConfigError, match="prefixes"):
        ResponseCacheMiddleware(app, 10, prefixes="/api", cache=cache)
    with pytest.raises(ConfigError, match="ttl"):
        ResponseCacheMiddleware(app, 0, cache=cache)
