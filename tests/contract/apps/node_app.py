"""One node of the multi-node tests: rows and a counter on the backend chosen by ``ZEAL_*``.

Run two of these against one Redis (``ZEAL_STORE_BACKEND=redis`` or ``tiered``, the same
``ZEAL_REDIS_URL`` and ``ZEAL_KEY_PREFIX``) and they share every row and counter.
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from zeal_asgi import Counter, Store, Zeal

zeal = Zeal()
Store.make("kv", 1024, {"v": (Store.TYPE_STRING, 64), "n": (Store.TYPE_INT, 8)})
hits = Counter(0, name="hits")


def _reply(**fields: Any) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), **fields})


def _synced() -> bool:
    # Only the tiered backend has a local tier that must be in sync before it is trusted.
    return bool(getattr(Store.default().backend, "synced", True))


async def info(request: Request) -> JSONResponse:
    """Which worker answered, on which backend, and whether its local tier is trusted."""
    return _reply(backend=str(Store.default_backend()), synced=_synced())


async def hit(request: Request) -> JSONResponse:
    """Count one hit on the shared Counter and on a shared row."""
    return _reply(counter=await hits.increment(), row=await Store.incr("kv", "total", "n"))


async def totals(request: Request) -> JSONResponse:
    """The shared Counter and the shared row's total."""
    return _reply(counter=await hits.get(), row=await Store.get_strict("kv", "total", "n"))


async def row(request: Request) -> JSONResponse:
    """GET: the row (``null`` on a miss); PUT ``?v=``: write it; DELETE: remove it."""
    key = request.path_params["key"]
    if request.method == "PUT":
        await Store.set("kv", key, {"v": request.query_params["v"]})
    elif request.method == "DELETE":
        return _reply(deleted=await Store.delete("kv", key))
    return _reply(row=await Store.get_strict("kv", key), synced=_synced())


async def cached(request: Request) -> JSONResponse:
    """Tiered only: whether this node's L1 holds a fresh copy of the row."""
    fresh = await Store.exists_cached("kv", request.path_params["key"])
    return _reply(cached=fresh, synced=_synced())


app = Starlette(
    routes=[
        Route("/info", info),
        Route("/hit", hit),
        Route("/totals", totals),
        Route("/row/{key}", row, methods=["GET", "PUT", "DELETE"]),
        Route("/cached/{key}", cached),
    ],
    lifespan=zeal.lifespan,
)
