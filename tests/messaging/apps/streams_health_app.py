"""``/health/store`` of an app whose Streams consumer gives up (``max_attempts``): real server."""

from __future__ import annotations

import os

from starlette.applications import Starlette

from zeal_asgi import Zeal
from zeal_asgi.health import starlette_routes
from zeal_asgi.streams import StreamEntry, Streams

zeal = Zeal()
streams = Streams(zeal.store, max_attempts=2, backoff_base=0.01, backoff_cap=0.05)
zeal.add_service(streams)


async def handle(payload: str, entry: StreamEntry) -> bool:
    return True


streams.subscribe(
    os.environ.get("HEALTH_STREAM", "health"), handle, block_ms=100, reclaim_interval=0.1
)

app = Starlette(routes=starlette_routes(), lifespan=zeal.lifespan)
