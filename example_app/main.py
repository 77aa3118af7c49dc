"""The example app: a live demo on FastAPI, with every worker sharing one state.

Run it with ``./scripts/run-example`` (``zeal-asgi run example_app.main:app --workers 2``, table
backend), or with ``ZEAL_STORE_BACKEND=redis ZEAL_REDIS_URL=redis://127.0.0.1:6379`` set.
``/`` is the live page ("Try it" buttons), ``/pubsub`` the multi-tab chat, ``/docs`` the API
(Swagger UI served from ``static/swagger``, so it works offline).

A backend that fails (Redis down, a timeout) answers **503** with a JSON body naming the error
type; an operation the backend cannot do answers **501**; any other ``ZealError`` **500**.
"""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.staticfiles import StaticFiles
from starlette.responses import FileResponse, HTMLResponse, JSONResponse

import zeal_asgi.health
from zeal_asgi import Store, Zeal, ZealMiddleware
from zeal_asgi.cache import Cache
from zeal_asgi.errors import BackendError, UnsupportedOperationError, ZealError
from zeal_asgi.ws import WSRouter

from . import demo, rooms
from .models import CounterResult, DemoError

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
rooms.install(zeal, router)

app = FastAPI(
    title="zeal-asgi example",
    summary="Store, Counter, Cache and pub/sub shared by every worker.",
    lifespan=zeal.lifespan,
    docs_url=None,  # served below from the app's own copy of Swagger UI
    redoc_url=None,
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


@app.exception_handler(ZealError)
async def zeal_error(request: Request, exc: Exception) -> JSONResponse:
    """A typed JSON answer instead of a bare 500: 503 when the backend fails, 501 when it
    cannot do the operation, 500 for any other ``ZealError``."""
    status = 500
    if isinstance(exc, UnsupportedOperationError):
        status = 501
    elif isinstance(exc, BackendError):
        status = 503
    body = DemoError(error=str(exc), error_type=type(exc).__name__, backend=_backend(request))
    return JSONResponse(body.model_dump(), status_code=status)


def _backend(request: Request) -> str:
    z = getattr(request.state, "zeal", None)
    return str((z.store if isinstance(z, Zeal) else Store.default()).kind)


@app.get("/docs", include_in_schema=False)
async def swagger_ui() -> HTMLResponse:
    """Swagger UI from ``static/swagger`` (no CDN)."""
    return get_swagger_ui_html(
        openapi_url=app.openapi_url or "/openapi.json",
        title=f"{app.title} - API",
        swagger_js_url="/static/swagger/swagger-ui-bundle.js",
        swagger_css_url="/static/swagger/swagger-ui.css",
        swagger_favicon_url="/static/swagger/favicon-32x32.png",
        swagger_ui_parameters={"validatorUrl": None},
    )


@app.get("/", include_in_schema=False)
async def index() -> FileResponse:
    """The live demo page: one "Try it" button per endpoint."""
    return FileResponse(STATIC / "index.html")


@app.get("/pubsub", include_in_schema=False)
async def pubsub_page() -> FileResponse:
    """The multi-tab WebSocket chat across workers."""
    return FileResponse(STATIC / "pubsub.html")
