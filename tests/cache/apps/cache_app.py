"""A small app for the cache's multi-process tests, configured by environment variables.

``CACHE_TEST_DIR`` (cache dir), ``CACHE_TEST_GC_MS`` (GC interval), ``CACHE_TEST_CALLS`` (file
that every computation appends its pid to), ``CACHE_TEST_NAMESPACE``, plus the usual ``ZEAL_*``
(``ZEAL_STORE_BACKEND``, ``ZEAL_REDIS_URL``, ``ZEAL_KEY_PREFIX``, ``ZEAL_CACHE_SECRET``).
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from zeal_asgi import Zeal, ZealMiddleware
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.shm.hoststats import host_stats

NAMESPACE = os.environ.get("CACHE_TEST_NAMESPACE", "cache")
zeal = Zeal()
cache = Cache.init(
    max_rows=256,
    cache_dir=os.environ["CACHE_TEST_DIR"],
    gc_interval_ms=int(os.environ.get("CACHE_TEST_GC_MS", "0")),
    namespace=NAMESPACE,
    lock_lease=float(os.environ.get("CACHE_TEST_LEASE", "10")),
    zeal=zeal,
)


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def compute(request: Request) -> JSONResponse:
    key = request.path_params["key"]
    delay = float(request.query_params.get("sleep", "0.3"))

    async def fn() -> dict[str, object]:
        # O_APPEND writes of one short line are atomic: lines of concurrent workers never mix
        fd = os.open(os.environ["CACHE_TEST_CALLS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        try:
            os.write(fd, f"{os.getpid()} {key}\n".encode())
        finally:
            os.close(fd)
        await asyncio.sleep(delay)
        return {"by": os.getpid(), "key": key}

    value = await Cache.get_or_compute(key, fn, ttl=float(request.query_params.get("ttl", "0")))
    return JSONResponse({"pid": os.getpid(), "value": value})


async def put(request: Request) -> JSONResponse:
    key = request.path_params["key"]
    size = int(request.query_params.get("size", "10"))
    value = {"key": key, "pad": "p" * size}
    return JSONResponse({"pid": os.getpid(), "stored": await Cache.set(key, value)})


async def get(request: Request) -> JSONResponse:
    value = await Cache.get(request.path_params["key"], MISSING)
    found = value is not MISSING
    return JSONResponse({"pid": os.getpid(), "found": found, "value": value if found else None})


async def stats(request: Request) -> JSONResponse:
    prefix = "cache.gc_sweeps" if NAMESPACE == "cache" else f"cache_{NAMESPACE}.gc_sweeps"
    sweeps = {str(p): m.get(prefix, 0) for p, m in host_stats().workers().items() if m.get(prefix)}
    return JSONResponse({"pid": os.getpid(), "cache": Cache.stats(), "gc_sweeps": sweeps})


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/compute/{key}", compute),
        Route("/put/{key}", put),
        Route("/get/{key}", get),
        Route("/stats", stats),
    ]
)
app.add_middleware(ZealMiddleware, zeal=zeal)
