"""A slowapi app: ``/limited`` at 100/minute per client address, in the storage named by
``RL_STORAGE`` (``zeal://`` by default: one count for every worker of the host; ``memory://``
keeps one per worker).  Refusals answer 429 with the worker's pid."""

from __future__ import annotations

import os

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from slowapi import Limiter
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address

import zeal_asgi.ratelimit  # noqa: F401 - registers the zeal:// scheme with limits

limiter = Limiter(key_func=get_remote_address, storage_uri=os.environ.get("RL_STORAGE", "zeal://"))
app = FastAPI()
app.state.limiter = limiter


async def refused(request: Request, exc: Exception) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()}, status_code=429)


app.add_exception_handler(RateLimitExceeded, refused)


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/limited")
@limiter.limit("100/minute")
async def limited(request: Request) -> dict[str, int]:
    return {"pid": os.getpid()}
