"""``ZealMiddleware`` (pure ASGI: exposes the Zeal object to requests, runs its lifecycle and,
if asked, records request metrics) and ``zeal_error_handler`` (typed JSON answers for a
``ZealError``)."""

from __future__ import annotations

import contextlib
import logging
from typing import overload

from starlette.requests import HTTPConnection, Request
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from zeal_asgi.app import Zeal
from zeal_asgi.errors import BackendTimeoutError, BackendUnavailableError
from zeal_asgi.metrics.http import http_metrics as http_metrics_of

log = logging.getLogger("zeal_asgi")


class ZealMiddleware:
    """Puts ``zeal`` in ``scope["state"]`` (so ``request.state.zeal`` works in plain Starlette)
    and starts/stops it on lifespan events when the app was not given ``zeal.lifespan``.

    With ``http_metrics=True`` it also records, in :mod:`zeal_asgi.metrics`' default registry,
    ``zeal_http_requests_total`` (method, route template, status),
    ``zeal_http_request_duration_seconds`` (method, route template) and
    ``zeal_http_requests_in_flight``.

    Example::

        app.add_middleware(ZealMiddleware, zeal=zeal, http_metrics=True)
    """

    def __init__(
        self, app: ASGIApp, zeal: Zeal | None = None, *, http_metrics: bool = False
    ) -> None:
        self.app = app
        self.zeal = zeal if zeal is not None else Zeal()
        self._metrics = http_metrics_of() if http_metrics else None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("state", {})["zeal"] = self.zeal
        if self._metrics is not None and scope["type"] == "http":
            await self._metrics(self.app, scope, receive, send)
            return
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        started_here = False
        failed = False

        async def wrapped_receive() -> Message:
            nonlocal started_here, failed
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.zeal.startup()
                    started_here = True
                except Exception as exc:
                    failed = True
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    raise
            elif message["type"] == "lifespan.shutdown" and started_here:
                started_here = False
                await self.zeal.shutdown()
            return message

        async def wrapped_send(message: Message) -> None:
            if failed and message["type"].startswith("lifespan.startup"):
                return
            await send(message)

        await self.app(scope, wrapped_receive, wrapped_send)


@overload
async def zeal_error_handler(conn: Request, exc: Exception) -> Response: ...
@overload
async def zeal_error_handler(conn: WebSocket, exc: Exception) -> None: ...
async def zeal_error_handler(conn: HTTPConnection, exc: Exception) -> Response | None:
    """Answer a :class:`~zeal_asgi.errors.ZealError` raised by an endpoint with typed JSON.

    ``{"error": "<class>", "detail": ...}`` with 503 and ``Retry-After`` when the backend is
    down or too slow (:class:`~zeal_asgi.errors.BackendUnavailableError`,
    :class:`~zeal_asgi.errors.BackendTimeoutError`), 500 otherwise; a WebSocket is closed with
    1013 (try again later) or 1011.  The same function serves FastAPI and Starlette::

        app.add_exception_handler(ZealError, zeal_error_handler)
        Starlette(..., exception_handlers={ZealError: zeal_error_handler})
    """
    outage = isinstance(exc, (BackendUnavailableError, BackendTimeoutError))
    if outage:
        log.warning("zeal_asgi: %s %s: %s", conn.url.path, type(exc).__name__, exc)
    else:
        log.error("zeal_asgi: %s failed", conn.url.path, exc_info=exc)
    if isinstance(conn, WebSocket):
        with contextlib.suppress(RuntimeError):  # already closed by the client
            await conn.close(1013 if outage else 1011)
        return None
    # The message may name hosts or keys: the client gets the kind of failure, the log the rest.
    detail = "the store backend is unavailable; retry later" if outage else "internal error"
    headers = {"Retry-After": "1"} if outage else None
    body = {"error": type(exc).__name__, "detail": detail}
    return JSONResponse(body, status_code=503 if outage else 500, headers=headers)
