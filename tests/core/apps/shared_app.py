"""A small app for the lifecycle tests: every worker reports its pid and the shared state."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from zeal_asgi import Counter, Store, Zeal, ZealMiddleware
from zeal_asgi.shm.segments import held_segments, server_identity

table = Store.make("shared", 256, {"v": (Store.TYPE_STRING, 64), "n": (Store.TYPE_INT, 8)})
hits = Counter(0, name="hits")
zeal = Zeal()


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def put(request: Request) -> JSONResponse:
    await Store.set("shared", request.query_params["k"], {"v": request.query_params["v"]})
    return JSONResponse({"pid": os.getpid()})


async def get(request: Request) -> JSONResponse:
    row = await Store.get_strict("shared", request.query_params["k"])
    return JSONResponse({"pid": os.getpid(), "v": None if row is None else row["v"]})


async def incr(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "n": await hits.increment()})


async def segments(request: Request) -> JSONResponse:
    ident = server_identity()
    return JSONResponse(
        {
            "pid": os.getpid(),
            "server_id": ident.server_id,
            "how": ident.how,
            "paths": sorted(p for _, p, _ in held_segments() if p),
            "nonce": table.nonce if table is not None else None,
        }
    )


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/put", put),
        Route("/get", get),
        Route("/incr", incr),
        Route("/segments", segments),
    ]
)
app.add_middleware(ZealMiddleware, zeal=zeal)
