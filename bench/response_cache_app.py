"""The app of ``python -m bench response_cache``: one small cached route per candidate.

``BENCH_RC_BACKEND`` picks the peers' backend: ``memory`` (each peer's per-worker memory store)
or ``redis`` (each peer's Redis backend, at ``BENCH_REDIS_URL``); zeal follows the usual
``ZEAL_STORE_BACKEND``.  Every candidate serves ``/c/<candidate>/{i}`` with the same small
payload; a handler run (a miss) increments the candidate's counter, read at ``/bench/misses``.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Awaitable, Callable
from typing import Any

from cashews import cache as cashews
from fastapi import APIRouter, FastAPI
from fastapi_cache import FastAPICache
from fastapi_cache.decorator import cache as fc2_cache
from fastapi_cachex import BackendProxy, cache as cachex_cache
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

import zeal_asgi.health
from zeal_asgi import Counter, Zeal, ZealMiddleware
from zeal_asgi.cache import Cache
from zeal_asgi.response_cache import cache_response

from .response_cache import CANDIDATES

__all__ = ["PAYLOAD", "build"]

PAYLOAD: dict[str, Any] = {"id": 1, "name": "widget", "price": 9.99, "tags": ["a", "b"]}
"""The small payload every route answers (about 60 bytes of JSON)."""
TTL = 300


def _peers(kind: str, url: str | None) -> Callable[[], Awaitable[None]]:
    """Configure the peers' backends (in each worker, at startup)."""

    async def start() -> None:
        if kind == "redis":
            import redis.asyncio as aioredis
            from fastapi_cache.backends.redis import RedisBackend
            from fastapi_cachex.backends import AsyncRedisCacheBackend

            assert url is not None, "BENCH_REDIS_URL is not set"
            port = int(url.rsplit(":", 1)[1].split("/")[0])
            FastAPICache.init(RedisBackend(aioredis.from_url(url)), prefix="fc2")
            BackendProxy.set(AsyncRedisCacheBackend(host="127.0.0.1", port=port))
            cashews.setup(url)
        else:
            from fastapi_cache.backends.inmemory import InMemoryBackend
            from fastapi_cachex.backends import MemoryBackend

            FastAPICache.init(InMemoryBackend(), prefix="fc2")
            BackendProxy.set(MemoryBackend())
            cashews.setup("mem://")

    return start


class _Peers:
    """Per-worker setup of the peers, run by the app's lifecycle."""

    def __init__(self, start: Callable[[], Awaitable[None]]) -> None:
        self._start = start

    async def start(self) -> None:
        await self._start()

    async def stop(self) -> None:
        await cashews.close()


class _ByName:
    """The app of ``/c``: each candidate's router, picked by the first segment of the path."""

    def __init__(self, routers: dict[str, APIRouter]) -> None:
        self.routers = routers

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        name = scope["path"][len(scope.get("root_path", "")) :].split("/", 2)[1]
        router = self.routers.get(name)
        if router is None:
            await Response(status_code=404)(scope, receive, send)
            return
        await router(scope, receive, send)


def build() -> FastAPI:
    """The app (runs in the launcher's master, or in the measuring process)."""
    zeal = Zeal()
    cache_dir = os.environ.get("BENCH_RC_DIR") or tempfile.mkdtemp(prefix="zeal-bench-rc-")
    Cache.init(cache_dir=cache_dir, gc_interval_ms=0, zeal=zeal)
    misses = {c: Counter(0, name=f"bench_rc_{c}") for c in CANDIDATES}
    zeal.add_service(
        _Peers(
            _peers(os.environ.get("BENCH_RC_BACKEND", "memory"), os.environ.get("BENCH_REDIS_URL"))
        )
    )
    app = FastAPI(lifespan=zeal.lifespan)
    app.add_middleware(ZealMiddleware, zeal=zeal)
    app.include_router(zeal_asgi.health.router)

    # The router tries routes in order, each failed match costing about a microsecond: every
    # candidate's route sits alone in its own router, picked by its name in a dict, so the
    # ceiling and the candidates are routed at the same cost, whatever the order.
    routes = {c: APIRouter() for c in CANDIDATES}

    @routes["constant"].get("/constant/{i}")
    async def constant(i: int) -> dict[str, Any]:
        return PAYLOAD

    @routes["zeal"].get("/zeal/{i}")
    @cache_response(TTL)
    async def zeal_route(i: int) -> dict[str, Any]:
        await misses["zeal"].increment()
        return PAYLOAD

    @routes["fc2"].get("/fc2/{i}")
    @fc2_cache(expire=TTL)
    async def fc2_route(i: int) -> dict[str, Any]:
        await misses["fc2"].increment()
        return PAYLOAD

    @routes["cashews"].get("/cashews/{i}")
    @cashews(ttl=TTL)
    async def cashews_route(i: int) -> dict[str, Any]:
        await misses["cashews"].increment()
        return PAYLOAD

    @routes["cachex"].get("/cachex/{i}")
    @cachex_cache(ttl=TTL)
    async def cachex_route(i: int) -> dict[str, Any]:
        await misses["cachex"].increment()
        return PAYLOAD

    app.mount("/c", _ByName(routes))

    @app.get("/bench/misses")
    async def read_misses() -> dict[str, int]:
        return {c: await m.get() for c, m in misses.items()}

    return app


def __getattr__(name: str) -> Any:
    # Lazily, so importing the module allocates nothing; ``zeal-asgi run
    # bench.response_cache_app:app`` builds it in the master before the workers start.
    if name == "app":
        app = build()
        globals()["app"] = app
        return app
    raise AttributeError(name)
