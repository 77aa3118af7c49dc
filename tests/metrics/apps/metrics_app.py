"""An app for the metrics tests under real servers: metrics declared at import, before the
workers start, recorded by endpoints and by ``ZealMiddleware(http_metrics=True)``."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from zeal_asgi import Zeal, ZealMiddleware, metrics

JOBS = metrics.Counter("test_jobs_total", "Jobs done.", labels=("kind",))
JOB_SECONDS = metrics.Histogram("test_job_seconds", "Job time.")
HELD = metrics.Gauge("test_held", "Held by each live worker.", mode="livesum")
zeal = Zeal()


def _rss_kib() -> int:
    with open(f"/proc/{os.getpid()}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def job(request: Request) -> JSONResponse:
    JOBS.labels("a").inc()
    JOB_SECONDS.observe(0.25)
    return JSONResponse({"pid": os.getpid()})


async def hold(request: Request) -> JSONResponse:
    HELD.set(1)  # this worker holds one, however often it is asked
    return JSONResponse({"pid": os.getpid()})


async def scrape(request: Request) -> JSONResponse:
    text = metrics.render(metrics.default_registry().collect())
    return JSONResponse({"pid": os.getpid(), "text": text})


async def memory(request: Request) -> JSONResponse:
    rows = len(metrics.default_registry().table)
    return JSONResponse({"pid": os.getpid(), "rows": rows, "rss_kib": _rss_kib()})


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/job", job),
        Route("/hold", hold),
        Route("/memory", memory),
        Route("/scrape", scrape),
        Route("/items/{item_id}", pid),
        *metrics.routes(),
    ]
)
app.add_middleware(ZealMiddleware, zeal=zeal, http_metrics=True)
