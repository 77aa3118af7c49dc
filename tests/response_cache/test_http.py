"""HTTP semantics of ``@cache_response`` under FastAPI, asserted on the raw headers."""

from __future__ import annotations

import re
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

import pytest
from fastapi import FastAPI, Header, HTTPException, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel

from tests.response_cache.conftest import client, counters
from zeal_asgi.cache import Cache
from zeal_asgi.response_cache import cache_response, engine

ETAG = re.compile(r'^"[0-9a-f]{32}"$')


class Item(BaseModel):
    id: int
    lang: str | None


def make_app(cache: Cache, calls: list[str], **options: Any) -> FastAPI:
    """Routes counting their handler runs in ``calls``."""
    app = FastAPI()
    options.setdefault("vary", ("Accept-Language",))
    options.setdefault("tags", ("items", "item:{item_id}"))

    @app.get("/items/{item_id}")
    @app.head("/items/{item_id}")
    @cache_response(60, cache=cache, **options)
    async def read_item(
        item_id: int, accept_language: Annotated[str | None, Header()] = None
    ) -> Item:
        calls.append(f"item {item_id}")
        return Item(id=item_id, lang=accept_language)

    @app.get("/cookie")
    @cache_response(60, cache=cache)
    async def cookie(response: Response) -> dict[str, int]:
        calls.append("cookie")
        response.set_cookie("session", "s1")
        return {"n": len(calls)}

    @app.get("/status/{code}")
    @cache_response(60, cache=cache, statuses=(200, 404))
    async def status(code: int) -> JSONResponse:
        calls.append(f"status {code}")
        return JSONResponse({"code": code}, status_code=code)

    @app.get("/raise")
    @cache_response(60, cache=cache)
    async def fail() -> dict[str, int]:
        calls.append("raise")
        raise HTTPException(404, "no such thing")

    @app.get("/stream")
    @cache_response(60, cache=cache)
    async def stream() -> StreamingResponse:
        calls.append("stream")

        async def chunks() -> AsyncIterator[bytes]:
            yield b"part1,"
            yield b"part2"

        return StreamingResponse(chunks(), media_type="text/plain")

    @app.get("/big")
    @cache_response(60, cache=cache, max_body_bytes=100)
    async def big() -> dict[str, str]:
        calls.append("big")
        return {"pad": "x" * 200}

    @app.get("/sync")
    @cache_response(60, cache=cache)
    def sync_route() -> dict[str, str]:
        calls.append("sync")
        return {"sync": "yes"}

    @app.get("/private")
    @cache_response(60, cache=cache, private=True)
    async def private(authorization: Annotated[str | None, Header()] = None) -> dict[str, Any]:
        calls.append(f"private {authorization}")
        return {"auth": authorization}

    return app


@pytest.fixture
def calls() -> list[str]:
    return []


@pytest.fixture
def app(cache: Cache, calls: list[str]) -> FastAPI:
    return make_app(cache, calls)


async def test_miss_and_hit_headers(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        miss = await c.get("/items/1")
        hit = await c.get("/items/1")
    assert miss.status_code == hit.status_code == 200
    assert miss.json() == hit.json() == {"id": 1, "lang": None}
    assert calls == ["item 1"]
    assert ETAG.match(miss.headers["etag"])
    assert hit.headers["etag"] == miss.headers["etag"]
    assert miss.headers["cache-control"] == "public, max-age=60"
    assert miss.headers["vary"] == "accept-language"
    assert "age" not in miss.headers
    assert hit.headers["age"] == "0"
    assert hit.headers["cache-control"] == "public, max-age=60"
    assert hit.headers["vary"] == "accept-language"
    assert hit.headers["content-type"] == "application/json"
    assert hit.headers["content-length"] == str(len(hit.content))
    # one header of each kind, never two
    names = [k.lower() for k, _ in hit.headers.raw]
    assert len(names) == len(set(names)), hit.headers.raw


async def test_max_age_is_the_remaining_ttl_and_age_counts_up(
    app: FastAPI, calls: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    async with client(app) as c:
        await c.get("/items/1")

        class Later:
            @staticmethod
            def time() -> float:
                return time.time() + 25.5

        monkeypatch.setattr(engine, "time", Later)
        hit = await c.get("/items/1")
    assert calls == ["item 1"]
    assert hit.headers["age"] == "25"
    assert hit.headers["cache-control"] == "public, max-age=35"


@pytest.mark.parametrize(
    "header",
    ["{etag}", '"nope", {etag}', "W/{etag}", "*", '"a",W/"b" , {etag}'],
)
async def test_if_none_match_answers_304_with_the_cache_headers_and_no_body(
    app: FastAPI, calls: list[str], header: str
) -> None:
    async with client(app) as c:
        first = await c.get("/items/1")
        etag = first.headers["etag"]
        r = await c.get("/items/1", headers={"if-none-match": header.format(etag=etag)})
    assert r.status_code == 304
    assert r.content == b""
    assert r.headers["etag"] == etag
    assert r.headers["cache-control"] == "public, max-age=60"
    assert r.headers["vary"] == "accept-language"
    assert r.headers["age"] == "0"
    assert "content-length" not in r.headers and "content-type" not in r.headers
    assert calls == ["item 1"]


async def test_if_none_match_that_does_not_match_gets_the_body(
    app: FastAPI, calls: list[str]
) -> None:
    async with client(app) as c:
        await c.get("/items/1")
        r = await c.get("/items/1", headers={"if-none-match": '"other", W/"x"'})
    assert r.status_code == 200 and r.json() == {"id": 1, "lang": None}


async def test_if_none_match_on_a_miss_is_a_304_after_one_computation(
    app: FastAPI, calls: list[str]
) -> None:
    async with client(app) as c:
        r = await c.get("/items/7", headers={"if-none-match": "*"})
        again = await c.get("/items/7")
    assert r.status_code == 304 and r.content == b"" and "age" not in r.headers
    assert r.headers["etag"] == again.headers["etag"]
    assert again.headers["age"] == "0"
    assert calls == ["item 7"]


async def test_vary_header_values_get_entries_of_their_own(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        en = await c.get("/items/1", headers={"accept-language": "en"})
        fr = await c.get("/items/1", headers={"accept-language": "fr"})
        en2 = await c.get("/items/1", headers={"accept-language": "en"})
        other_header = await c.get("/items/1", headers={"accept-language": "en", "x-other": "1"})
    assert en.json()["lang"] == "en" and fr.json()["lang"] == "fr"
    assert en.headers["etag"] != fr.headers["etag"]
    assert en2.headers["etag"] == en.headers["etag"] and en2.headers["age"] == "0"
    assert other_header.headers["age"] == "0"  # a header not in vary does not split entries
    assert calls == ["item 1", "item 1"]


async def test_query_order_does_not_split_entries(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        await c.get("/items/1?a=1&b=2")
        hit = await c.get("/items/1?b=2&a=1")
        other = await c.get("/items/1?a=2&b=2")
    assert hit.headers["age"] == "0"
    assert "age" not in other.headers
    assert calls == ["item 1", "item 1"]


async def test_head_is_served_from_the_get_entry(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        get = await c.get("/items/1")
        head = await c.head("/items/1")
    assert head.status_code == 200
    assert head.content == b""
    assert head.headers["etag"] == get.headers["etag"]
    assert head.headers["content-length"] == get.headers["content-length"]
    assert head.headers["age"] == "0"
    assert calls == ["item 1"]


async def test_head_first_fills_the_entry_get_then_hits(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        head = await c.head("/items/3")
        get = await c.get("/items/3")
    assert head.content == b"" and int(head.headers["content-length"]) == len(get.content)
    assert get.headers["age"] == "0" and get.json() == {"id": 3, "lang": None}
    assert calls == ["item 3"]


async def test_set_cookie_responses_are_never_stored(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        first = await c.get("/cookie")
        second = await c.get("/cookie")
    assert calls == ["cookie", "cookie"]
    assert first.headers["set-cookie"].startswith("session=s1")
    assert second.json() == {"n": 2}
    for r in (first, second):
        assert "etag" not in r.headers and "cache-control" not in r.headers


async def test_authorization_requests_are_not_cached(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        for _ in range(2):
            r = await c.get("/items/1", headers={"authorization": "Bearer alice"})
            assert r.status_code == 200
            assert "etag" not in r.headers and "cache-control" not in r.headers
        plain = await c.get("/items/1")
    assert calls == ["item 1", "item 1", "item 1"]
    assert "age" not in plain.headers  # the Authorization responses stored nothing


async def test_private_caches_one_entry_per_credential(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        a1 = await c.get("/private", headers={"authorization": "Bearer alice"})
        b1 = await c.get("/private", headers={"authorization": "Bearer bob"})
        a2 = await c.get("/private", headers={"authorization": "Bearer alice"})
    assert a1.json() == a2.json() == {"auth": "Bearer alice"}
    assert b1.json() == {"auth": "Bearer bob"}
    assert calls == ["private Bearer alice", "private Bearer bob"]
    assert a1.headers["cache-control"] == "private, max-age=60"
    assert a2.headers["cache-control"] == "private, max-age=60" and a2.headers["age"] == "0"
    assert a1.headers["vary"] == "authorization"


async def test_statuses_not_listed_are_never_stored(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        for _ in range(2):
            r = await c.get("/status/500")
            assert r.status_code == 500 and "etag" not in r.headers
        for _ in range(2):
            r = await c.get("/status/404")
            assert r.status_code == 404 and r.json() == {"code": 404}
            assert ETAG.match(r.headers["etag"])
        nm = await c.get("/status/404", headers={"if-none-match": r.headers["etag"]})
    assert calls == ["status 500", "status 500", "status 404"]
    assert nm.status_code == 404  # conditional requests only turn 2xx answers into 304


async def test_handler_exceptions_propagate_and_are_not_stored(
    app: FastAPI, calls: list[str]
) -> None:
    async with client(app) as c:
        for _ in range(2):
            r = await c.get("/raise")
            assert r.status_code == 404 and r.json() == {"detail": "no such thing"}
    assert calls == ["raise", "raise"]


async def test_streaming_responses_are_never_stored(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        for _ in range(2):
            r = await c.get("/stream")
            assert r.text == "part1,part2" and "etag" not in r.headers
    assert calls == ["stream", "stream"]


async def test_bodies_over_max_body_bytes_are_served_not_stored(
    app: FastAPI, calls: list[str]
) -> None:
    async with client(app) as c:
        for _ in range(2):
            r = await c.get("/big")
            assert r.json() == {"pad": "x" * 200} and "etag" not in r.headers
    assert calls == ["big", "big"]


async def test_sync_endpoints_are_cached(app: FastAPI, calls: list[str]) -> None:
    async with client(app) as c:
        first = await c.get("/sync")
        second = await c.get("/sync")
    assert first.json() == second.json() == {"sync": "yes"}
    assert calls == ["sync"] and second.headers["age"] == "0"


async def test_other_methods_pass_through(cache: Cache, calls: list[str]) -> None:
    app = FastAPI()

    @app.api_route("/both", methods=["GET", "POST"], operation_id="both")
    @cache_response(60, cache=cache)
    async def both() -> dict[str, int]:
        calls.append("both")
        return {"n": len(calls)}

    async with client(app) as c:
        await c.get("/both")
        posted = [await c.post("/both") for _ in range(2)]
        got = await c.get("/both")
    assert [p.json() for p in posted] == [{"n": 2}, {"n": 3}]
    assert "etag" not in posted[0].headers
    assert got.json() == {"n": 1} and got.headers["age"] == "0"


async def test_counters(app: FastAPI) -> None:
    before = counters()
    async with client(app) as c:
        first = await c.get("/items/9")
        await c.get("/items/9")
        await c.get("/items/9", headers={"if-none-match": first.headers["etag"]})
        await c.get("/items/9", headers={"authorization": "x"})
        await c.get("/cookie")
    after = counters()

    def delta(name: str) -> int:
        return after.get(name, 0) - before.get(name, 0)

    assert (delta("misses"), delta("hits"), delta("not_modified")) == (1, 2, 1)
    assert (delta("bypass"), delta("uncacheable")) == (1, 1)
