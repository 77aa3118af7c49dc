"""A small app for multi-worker / multi-node tests of the tiered backend and the breaker.

Configured by the environment (``ZEAL_STORE_BACKEND``, ``ZEAL_REDIS_URL``, ...).
"""

from __future__ import annotations

import os
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from zeal_asgi import Counter, Store, Zeal
from zeal_asgi.errors import BackendUnavailableError

zeal = Zeal()
Store.make("kv", 1024, {"v": (Store.TYPE_INT, 8), "s": (Store.TYPE_STRING, 32)})
hits = Counter(0, name="hits")


def _out(**fields: Any) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), **fields})


async def pid(request: Request) -> JSONResponse:
    return _out()


async def put(request: Request) -> JSONResponse:
    p = request.path_params
    try:
        await Store.set("kv", p["key"], {"v": int(p["value"]), "s": "x"})
    except BackendUnavailableError as exc:
        return JSONResponse({"pid": os.getpid(), "error": str(exc)}, status_code=503)
    return _out(ok=True)


async def get(request: Request) -> JSONResponse:
    key = request.path_params["key"]
    row = await Store.get_strict("kv", key)
    return _out(row=row, cached=await Store.exists_cached("kv", key))


async def hit(request: Request) -> JSONResponse:
    return _out(total=await hits.increment())


async def total(request: Request) -> JSONResponse:
    return _out(total=await hits.get())


async def stats(request: Request) -> JSONResponse:
    st = Store.stats()
    return _out(breaker=st.get("breaker"), tiered=st.get("tiered"))


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/set/{key}/{value}", put),
        Route("/get/{key}", get),
        Route("/hit", hit),
        Route("/hits", total),
        Route("/stats", stats),
    ],
    lifespan=zeal.lifespan,
)
