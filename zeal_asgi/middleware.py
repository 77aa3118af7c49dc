"""``ZealMiddleware``: pure ASGI; exposes the Zeal object to requests and runs its lifecycle."""

from __future__ import annotations

from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from zeal_asgi.app import Zeal

__all__ = ["ZealMiddleware"]


class ZealMiddleware:
    """Puts ``zeal`` in ``scope["state"]`` (so ``request.state.zeal`` works in plain Starlette)
    and starts/stops it on lifespan events when the app was not given ``zeal.lifespan``.

    Example::

        app.add_middleware(ZealMiddleware, zeal=zeal)
    """

    def __init__(self, app: ASGIApp, zeal: Zeal | None = None) -> None:
        if zeal is None:
            from zeal_asgi.app import Zeal

            zeal = Zeal()
        self.app = app
        self.zeal = zeal

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(scope, receive, send)
            return
        if scope["type"] in ("http", "websocket"):
            scope.setdefault("state", {})["zeal"] = self.zeal
        await self.app(scope, receive, send)

    async def _lifespan(self, scope: Scope, receive: Receive, send: Send) -> None:
        zeal = self.zeal
        started_here = False
        failed = False

        async def wrapped_receive() -> Message:
            nonlocal started_here, failed
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await zeal.startup()
                    started_here = True
                except Exception as exc:
                    failed = True
                    await send({"type": "lifespan.startup.failed", "message": repr(exc)})
                    raise
            elif message["type"] == "lifespan.shutdown" and started_here:
                started_here = False
                await zeal.shutdown()
            return message

        async def wrapped_send(message: Message) -> None:
            if failed and message["type"].startswith("lifespan.startup"):
                return
            await send(message)

        await self.app(scope, wrapped_receive, wrapped_send)
