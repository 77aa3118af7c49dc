"""The app of the response cache's multi-process tests, configured by environment variables.

``RC_TEST_DIR`` (cache dir), ``RC_TEST_CALLS`` (file every handler run appends ``pid key`` to),
plus the usual ``ZEAL_*`` (``ZEAL_STORE_BACKEND``, ``ZEAL_REDIS_URL``, ``ZEAL_KEY_PREFIX``,
``ZEAL_CACHE_SECRET``).  Every response carries ``x-pid``, the worker that answered it.
"""

from __future__ import annotations

import asyncio
import os
import secrets

from fastapi import FastAPI
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zeal_asgi import Zeal, ZealMiddleware
from zeal_asgi.cache import Cache
from zeal_asgi.response_cache import cache_response, invalidate

zeal = Zeal()
Cache.init(max_rows=256, cache_dir=os.environ["RC_TEST_DIR"], gc_interval_ms=0, zeal=zeal)
app = FastAPI(lifespan=zeal.lifespan)


class AnsweredBy:
    """Adds ``x-pid`` to every response (outside the cache, so hits carry it too)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def tagged(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = {
                    **message,
                    "headers": [*message["headers"], (b"x-pid", b"%d" % os.getpid())],
                }
            await send(message)

        await self.app(scope, receive, tagged)


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/slow/{key}")
@cache_response(60, tags=("slow", "key:{key}"))
async def slow(key: str, sleep: float = 0.3) -> dict[str, object]:
    # O_APPEND writes of one short line are atomic: lines of concurrent workers never mix
    fd = os.open(os.environ["RC_TEST_CALLS"], os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    try:
        os.write(fd, f"{os.getpid()} {key}\n".encode())
    finally:
        os.close(fd)
    await asyncio.sleep(sleep)
    return {"key": key, "by": os.getpid(), "nonce": secrets.token_hex(8)}


@app.post("/invalidate")
async def drop(tag: str) -> dict[str, int]:
    return {"pid": os.getpid(), "dropped": await invalidate(tags=[tag])}


app.add_middleware(ZealMiddleware, zeal=zeal)
app.add_middleware(AnsweredBy)
