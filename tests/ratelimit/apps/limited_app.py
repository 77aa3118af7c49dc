"""A FastAPI app limited by zeal_asgi under a real server: ``/dep`` by the dependency, ``/mw``
by the middleware, ``/pid`` and ``/health/*`` exempt.  ``RL_LIMIT`` and ``RL_ALGORITHM`` pick
the limit (default ``100/minute``, fixed window) and ``RL_ON_ERROR`` the dependency's
``on_backend_error``; the ``ZEAL_*`` variables pick the backend."""

from __future__ import annotations

import os
from typing import Any

from fastapi import Depends, FastAPI

from zeal_asgi import Zeal, health
from zeal_asgi.ratelimit import RateLimiter, RateLimitMiddleware, client_ip

zeal = Zeal()
LIMIT = os.environ.get("RL_LIMIT", "100/minute")
ALGORITHM: Any = os.environ.get("RL_ALGORITHM", "fixed_window")
ON_ERROR: Any = os.environ.get("RL_ON_ERROR", "allow")
dep = RateLimiter(LIMIT, name="dep", algorithm=ALGORITHM, on_backend_error=ON_ERROR, zeal=zeal)
mw = RateLimiter(LIMIT, name="mw", algorithm=ALGORITHM, zeal=zeal)

app = FastAPI(lifespan=zeal.lifespan)
app.add_middleware(
    RateLimitMiddleware, limiter=mw, key=client_ip, exempt=("/pid", "/dep", "/health")
)
app.include_router(health.router)


@app.get("/pid")
async def pid() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/dep", dependencies=[Depends(dep.depends(key=client_ip))])
async def limited_by_dependency() -> dict[str, int]:
    return {"pid": os.getpid()}


@app.get("/mw")
async def limited_by_middleware() -> dict[str, int]:
    return {"pid": os.getpid()}
