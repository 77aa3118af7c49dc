"""Test app of the locks tests: a ``zeal.every`` job that records which worker ran which period,
a route that hammers one lock from 8 coroutines, and leadership (real servers, real workers).

Environment: ``LOCKS_JOB_SECONDS`` (period, default 0.05), ``LOCKS_JOB_SLEEP`` (seconds each run
takes, default 0.005), ``LOCKS_SCOPE`` (``host`` or ``cluster``), plus the ``ZEAL_*`` store
settings.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import time

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

import zeal_asgi.health
from zeal_asgi import Store, Zeal
from zeal_asgi.locks.host import host_locks

SECONDS = float(os.environ.get("LOCKS_JOB_SECONDS", "0.05"))
SLEEP = float(os.environ.get("LOCKS_JOB_SLEEP", "0.005"))
SCOPE = os.environ.get("LOCKS_SCOPE", "host")

zeal = Zeal()
Store.make(
    "runs",
    4096,
    {"n": (Store.TYPE_INT, 4), "pid": (Store.TYPE_INT, 4), "ended": (Store.TYPE_INT, 4)},
)
Store.make("shared", 16, {"inside": (Store.TYPE_INT, 4), "total": (Store.TYPE_INT, 8)})


async def _period() -> int:
    """The period this run claimed: the job's lock mark, read while the job holds the lock."""
    if SCOPE == "host" or Store.default().kind == "table":
        return int(host_locks().table.get("zeal:job:tick", "mark"))
    got = await Store.eval("return redis.call('GET', KEYS[1])", ["lock:{zeal:job:tick}:mark"])
    return int(got)


@zeal.every(SECONDS, name="tick", scope=SCOPE)
async def tick() -> None:
    period = await _period()
    key = str(period)
    await Store.incr("runs", key, "n")
    await Store.set("runs", key, {"pid": os.getpid()})
    await asyncio.sleep(SLEEP)
    # when the run ended (ms from its period's start): one that outlasted the next period
    # took that period with it, as zeal.every documents
    await Store.set("runs", key, {"ended": int(time.time() * 1000) - period})


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def runs(request: Request) -> JSONResponse:
    rows = {k if isinstance(k, str) else k.decode(): r async for k, r in Store.iterate("runs")}
    return JSONResponse({"pid": os.getpid(), "runs": rows})


async def hammer(request: Request) -> JSONResponse:
    """8 coroutines x ``n`` times: inside the lock, count holders and update a shared total with
    a read and a write apart (a second holder would lose updates); tokens must only grow."""
    n = int(request.query_params.get("n", "100"))
    scope = request.query_params.get("scope", "host")
    seen: list[int] = []
    overlaps = 0

    async def one() -> None:
        nonlocal overlaps
        for _ in range(n):
            async with zeal.lock("hammer", ttl=10, scope=scope) as lease:
                if await Store.incr("shared", "x", "inside") != 1:
                    overlaps += 1
                total = await Store.get_strict("shared", "x", "total")
                await asyncio.sleep(0)
                await Store.set("shared", "x", {"total": total + 1})
                seen.append(lease.token)
                await Store.decr("shared", "x", "inside")

    await asyncio.gather(*(one() for _ in range(8)))
    rising = all(a < b for a, b in itertools.pairwise(seen))
    return JSONResponse({"pid": os.getpid(), "overlaps": overlaps, "rising": rising})


async def total(request: Request) -> JSONResponse:
    value = await Store.get_strict("shared", "x", "total")
    return JSONResponse({"pid": os.getpid(), "total": value})


async def leader(request: Request) -> JSONResponse:
    scope = request.query_params.get("scope", "host")
    return JSONResponse({"pid": os.getpid(), "leader": await zeal.is_leader(scope)})


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/runs", runs),
        Route("/hammer", hammer),
        Route("/total", total),
        Route("/leader", leader),
        *zeal_asgi.health.starlette_routes(),
    ],
    lifespan=zeal.lifespan,
)
