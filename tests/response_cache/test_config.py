"""Declaring a cached route: bad arguments are typed errors naming the route and the limit;
a backend that fails while serving never fails the request."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from fastapi import FastAPI

from tests._harness.servers import RedisServer
from tests.response_cache.conftest import SECRET, client, counters
from zeal_asgi.cache import Cache
from zeal_asgi.errors import ConfigError, ZealError
from zeal_asgi.response_cache import cache_response, invalidate
from zeal_asgi.store import Store


async def handler(item_id: int) -> dict[str, int]:
    return {"id": item_id}


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"ttl": 0}, r"ttl must be in \(0"),
        ({"ttl": -1}, "ttl"),
        ({"ttl": math.nan}, "ttl must be a number"),
        ({"ttl": True}, "ttl must be a number"),
        ({"ttl": "60"}, "ttl must be a number"),
        ({"ttl": 400 * 86400}, "ttl must be in"),
        ({"ttl": 1, "vary": "accept-language"}, "vary must be a list"),
        ({"ttl": 1, "vary": ("bad header",)}, "not an HTTP header name"),
        ({"ttl": 1, "vary": ("",)}, "non-empty str"),
        ({"ttl": 1, "tags": ("item:{nope}",)}, "not a parameter"),
        ({"ttl": 1, "tags": ("item:{item_id.real}",)}, "simple|{name} fields"),
        ({"ttl": 1, "tags": ("item:{",)}, "not a valid template"),
        ({"ttl": 1, "tags": "items"}, "tags must be a list"),
        ({"ttl": 1, "statuses": ()}, "at least one"),
        ({"ttl": 1, "statuses": (304,)}, "cannot be stored"),
        ({"ttl": 1, "statuses": (99,)}, r"\[200, 599\]"),
        ({"ttl": 1, "max_body_bytes": 0}, "max_body_bytes"),
        ({"ttl": 1, "private": "yes"}, "private must be a bool"),
    ],
)
def test_bad_arguments_raise_config_error_naming_the_route(
    cache: Cache, kwargs: dict[str, Any], match: str
) -> None:
    with pytest.raises(ConfigError, match=match) as info:
        cache_response(cache=cache, **kwargs)(handler)
    assert "handler" in str(info.value)


def test_a_generator_endpoint_is_refused(cache: Cache) -> None:
    async def gen() -> AsyncIterator[bytes]:
        yield b"x"

    with pytest.raises(ConfigError, match="streaming"):
        cache_response(10, cache=cache)(gen)


def test_tag_fields_and_vary_names_are_normalised(cache: Cache) -> None:
    wrapped = cache_response(10, cache=cache, vary=("X-A", "x-a"), tags=("item:{item_id}",))
    assert wrapped(handler).__wrapped__ is handler  # type: ignore[attr-defined]


async def test_a_dead_backend_serves_uncached(
    fresh_redis: RedisServer,
    cache_factory: Callable[..., Cache],
) -> None:
    """Redis killed: every request is still answered (uncached), counted and never a 500;
    an invalidation, which must not be lost silently, raises."""
    store = Store("redis", {"url": fresh_redis.url, "prefix": "rcdown"})
    try:
        cache = cache_factory(store, secret=SECRET)
        runs: list[int] = []
        app = FastAPI()

        @app.get("/x")
        @cache_response(30, cache=cache)
        async def x() -> dict[str, int]:
            runs.append(1)
            return {"n": len(runs)}

        async with client(app) as c:
            await c.get("/x")
            assert (await c.get("/x")).headers["age"] == "0"
            fresh_redis.stop()
            before = counters().get("errors", 0)
            answers = [await c.get("/x") for _ in range(3)]
        assert [a.status_code for a in answers] == [200, 200, 200]
        assert [a.json()["n"] for a in answers] == [2, 3, 4]
        assert counters().get("errors", 0) >= before + 3
        with pytest.raises(ZealError):
            await invalidate(tags=["t"], cache=cache)
    finally:
        await store.aclose()
