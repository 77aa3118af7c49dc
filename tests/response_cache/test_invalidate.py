"""``invalidate(tags=..., paths=...)`` on the table backend and on Redis, and the token table."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from typing import Any

import pytest
from fastapi import FastAPI

from tests._harness.servers import RedisServer
from tests.response_cache.conftest import SECRET, client, counters
from zeal_asgi.cache import Cache
from zeal_asgi.errors import ConfigError, InvalidKeyError, KeyTypeError
from zeal_asgi.response_cache import cache_response, invalidate
from zeal_asgi.response_cache.tokens import tokens_of
from zeal_asgi.store import Store


def make_app(cache: Cache, calls: list[str]) -> FastAPI:
    app = FastAPI()

    @app.get("/items/{item_id}")
    @cache_response(60, cache=cache, tags=("items", "item:{item_id}"), vary=("x-v",))
    async def item(item_id: int) -> dict[str, int]:
        calls.append(f"item {item_id}")
        return {"id": item_id, "run": len(calls)}

    @app.get("/other")
    @cache_response(60, cache=cache)
    async def other() -> dict[str, int]:
        calls.append("other")
        return {"run": len(calls)}

    return app


async def _hits(c: Any, *paths: str, **headers: str) -> list[bool]:
    return ["age" in (await c.get(p, headers=headers)).headers for p in paths]


async def test_tags_and_paths(any_cache: Cache) -> None:
    calls: list[str] = []
    app = make_app(any_cache, calls)
    async with client(app) as c:
        assert await _hits(c, "/items/1", "/items/2", "/other") == [False, False, False]
        assert await _hits(c, "/items/1", "/items/2", "/other") == [True, True, True]
        assert await invalidate(tags=["item:1"], cache=any_cache) == 1
        assert await _hits(c, "/items/1", "/items/2", "/other") == [False, True, True]
        assert await invalidate(tags=["items"], cache=any_cache) == 1
        assert await _hits(c, "/items/1", "/items/2", "/other") == [False, False, True]
        assert await invalidate(tags=["never-used"], cache=any_cache) == 0
        assert await _hits(c, "/items/1", "/items/2", "/other") == [True, True, True]


async def test_a_path_covers_its_queries_and_varied_headers(any_cache: Cache) -> None:
    calls: list[str] = []
    app = make_app(any_cache, calls)
    variants = ["/items/1", "/items/1?a=1", "/items/1?b=2&a=1"]
    async with client(app) as c:
        for headers in ({}, {"x-v": "1"}):
            await _hits(c, *variants, **headers)
            assert await _hits(c, *variants, **headers) == [True, True, True]
        await _hits(c, "/items/2")
        assert await invalidate(paths=["/items/1"], cache=any_cache) == 1
        for headers in ({}, {"x-v": "1"}):
            assert await _hits(c, *variants, **headers) == [False, False, False]
        assert await _hits(c, "/items/2") == [True]


async def test_lost_tokens_are_a_miss_never_a_stale_answer(any_cache: Cache) -> None:
    """Tokens may vanish (restart, eviction, expiry): the next request makes new ones and so
    looks under new keys; what was cached before is never served again."""
    calls: list[str] = []
    app = make_app(any_cache, calls)
    tokens = tokens_of(any_cache)
    async with client(app) as c:
        before = (await c.get("/items/1")).json()
        assert await _hits(c, "/items/1") == [True]
        await tokens.store().clear(tokens.table)
        after = await c.get("/items/1")
    assert "age" not in after.headers and after.json() != before


async def test_a_full_token_table_is_cleared_and_serving_goes_on(cache: Cache) -> None:
    calls: list[str] = []
    app = make_app(cache, calls)
    tokens = tokens_of(cache)
    async with client(app) as c:
        await c.get("/items/1")
        assert await _hits(c, "/items/1") == [True]
        store = tokens.store()
        t = store.table(tokens.table)
        filler = 0
        while len(t) < t.capacity:  # fill every row the table really has
            assert await tokens.current([f"t-filler-{filler}"]) is not None
            filler += 1
        before = counters().get("token_resets", 0)
        r = await c.get("/items/5")  # needs new tokens: the table is cleared first
        assert r.status_code == 200 and r.json()["id"] == 5
        assert counters().get("token_resets", 0) == before + 1
        assert await _hits(c, "/items/1") == [False]  # every key changed with the clear
        assert await _hits(c, "/items/1") == [True]


async def test_two_nodes_on_one_redis(
    redis_server: RedisServer, cache_factory: Callable[..., Cache]
) -> None:
    """Two Stores (two "nodes") on one Redis with one prefix: an entry stored through node A is
    a hit on node B, and an invalidation from node A is a miss on node B."""
    prefix = f"rc{uuid.uuid4().hex[:8]}"
    stores = [Store("redis", {"url": redis_server.url, "prefix": prefix}) for _ in range(2)]
    try:
        calls: list[str] = []
        caches = [cache_factory(s, secret=SECRET, namespace="rcnodes") for s in stores]
        apps = [make_app(cache, calls) for cache in caches]
        async with client(apps[0]) as a, client(apps[1]) as b:
            first = await a.get("/items/1")
            on_b = await b.get("/items/1")
            assert on_b.headers["age"] == "0" and on_b.json() == first.json()
            assert await invalidate(tags=["item:1"], cache=caches[0]) == 1
            assert await _hits(b, "/items/1") == [False]
            assert await _hits(a, "/items/1") == [True]
        assert calls == ["item 1", "item 1"]
    finally:
        for s in stores:
            await s.aclose()


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"tags": "items"}, KeyTypeError),
        ({"tags": [1]}, KeyTypeError),
        ({"paths": "/x"}, KeyTypeError),
        ({"tags": [""]}, InvalidKeyError),
        ({"paths": ["items/1"]}, InvalidKeyError),
    ],
)
async def test_invalidate_bad_input(cache: Cache, kwargs: dict[str, Any], error: type) -> None:
    with pytest.raises(error):
        await invalidate(**kwargs, cache=cache)


async def test_invalidate_without_a_cache_names_cache_init() -> None:
    try:
        previous: Cache | None = Cache.default()
    except ConfigError:
        previous = None
    Cache.set_default(None)
    try:
        with pytest.raises(ConfigError, match=r"Cache\.init"):
            await invalidate(tags=["x"])
    finally:
        Cache.set_default(previous)
