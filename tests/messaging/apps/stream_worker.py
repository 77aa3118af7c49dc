"""A reliable consumer process (E14): ``zeal.subscribe_reliable``, effects through apply_once."""

from __future__ import annotations

import asyncio
import os

from zeal_asgi import Zeal
from zeal_asgi.streams import StreamEntry, apply_once

zeal = Zeal()
DELAY = float(os.environ.get("E14_DELAY", "0"))
MAX_DELIVERIES = int(os.environ.get("E14_MAX_DELIVERIES", "3"))


async def handle(payload: str, entry: StreamEntry) -> bool:
    store = zeal.store
    await store.eval("return redis.call('INCR', KEYS[1])", ["e14:runs"], [])
    if payload == "poison":
        await store.eval("return redis.call('INCR', KEYS[1])", ["e14:poison_runs"], [])
        return False
    if DELAY:
        await asyncio.sleep(DELAY)
    # The effect and its idempotency mark in one script: a kill at any point never doubles it.
    await apply_once(f"e14:{entry.id}", [("HINCRBY", "e14:effects", payload, 1)])
    return True


zeal.subscribe_reliable(
    "e14",
    handle,
    group="e14",
    consumer=os.environ.get("E14_CONSUMER"),
    batch=16,
    concurrency=8,
    min_idle_ms=2000,
    reclaim_interval=0.5,
    max_deliveries=MAX_DELIVERIES,
    block_ms=500,
)


async def main() -> None:
    async with zeal:
        print("ready", flush=True)
        await asyncio.Event().wait()


if __name__ == "__main__":
    asyncio.run(main())
