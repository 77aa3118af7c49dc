"""An app on the redis backend for the multi-worker tests (configured by ZEAL_* variables).

With ``REDIS_APP_WARM=1`` the module also talks to Redis at import time, as an app that uses the
Store before the server forks its workers would: every worker must then build its own client.
"""

from __future__ import annotations

import asyncio
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from zeal_asgi import Counter, Store, Zeal

zeal = Zeal()
Store.make("hits", 64, {"n": (Store.TYPE_INT, 8)})
requests = Counter(0, name="requests")

if os.environ.get("REDIS_APP_WARM") == "1":
    # Left open on purpose: the master's client (and its closed loop) must not leak into workers.
    asyncio.run(Store.start())


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def hit(request: Request) -> JSONResponse:
    n = await Store.incr("hits", "all", "n", 1)
    c = await requests.increment()
    await asyncio.sleep(0.005)  # keep a worker busy a little, so requests spread
    return JSONResponse({"pid": os.getpid(), "n": n, "c": c})


app = Starlette(routes=[Route("/pid", pid), Route("/hit", hit)], lifespan=zeal.lifespan)
