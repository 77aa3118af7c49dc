"""The smallest app the harness's own tests serve: each worker's pid and what it was given."""

from __future__ import annotations

import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route


async def pid(request: Request) -> JSONResponse:
    """This worker's pid and its parent's."""
    return JSONResponse({"pid": os.getpid(), "ppid": os.getppid()})


async def env(request: Request) -> JSONResponse:
    """The worker's environment variables named in ``?name=``."""
    return JSONResponse({n: os.environ.get(n) for n in request.query_params.getlist("name")})


app = Starlette(routes=[Route("/pid", pid), Route("/env", env)])
