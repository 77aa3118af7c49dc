"""The example app: the seed's live demo on FastAPI, with every worker sharing one state.

Run it with ``./scripts/run-example`` (``zeal-asgi run example_app.main:app --workers 2``, table
backend), or with ``ZEAL_STORE_BACKEND=redis ZEAL_REDIS_URL=redis://127.0.0.1:6379`` set.
``/`` is the live page ("Try it" buttons), ``/pubsub`` the multi-tab chat, ``/docs`` the API.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse

import zeal_asgi.health
from zeal_asgi import Zeal, ZealMiddleware
from zeal_asgi.cache import Cache
from zeal_asgi.ws import WSRouter

from . import demo, rooms
from .models import CounterResult

__all__ = ["app", "cache", "router", "zeal"]

STATIC = Path(__file__).resolve().parent / "static"

# Everything below runs at import: in the launcher's master, before any worker starts, so every
# table, counter, cache and message bus is allocated once and shared by all the workers.
zeal = Zeal()
"""Configuration from ``ZEAL_*`` (``ZEAL_STORE_BACKEND=table`` by default)."""
cache = Cache.init(
    max_rows=1024,
    cache_dir=zeal.settings.cache_dir,
    secret=zeal.settings.cache_secret,
    zeal=zeal,
)
router = WSRouter(zeal, owner_capacity=4096, room_capacity=16384)
demo.install(zeal)

app = FastAPI(
    title="zeal-asgi example",
    summary="Store, Counter, Cache and pub/sub shared by every worker.",
    lifespan=zeal.lifespan,
)
app.add_middleware(ZealMiddleware, zeal=zeal)
# The hot route, /demo/counter/increment, goes on the app itself and before the routers:
# routes are matched in order, and each included router tried on the way costs FastAPI a few
# microseconds per request (it re-checks the router's route version), a tenth of the request.
app.add_api_route(
    "/demo/counter/increment",
    demo.counter_increment,
    methods=["GET"],
    response_model=CounterResult,
    tags=["demo"],
    summary="Counter Increment",
)
app.include_router(demo.router)
app.include_router(zeal_asgi.health.router)
app.include_router(rooms.router)
app.include_router(rooms.ws_router)
app.mount("/static", StaticFiles(directory=STATIC), name="static")


@app.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The live demo page: one "Try it" button per endpoint."""
    return FileResponse(STATIC / "index.html")


@app.get("/pubsub", include_in_schema=False)
async def pubsub_page() -> FileResponse:
    """The multi-tab WebSocket chat across workers."""
    return FileResponse(STATIC / "pubsub.html")
