"""E19 (reliability.md section 6): WebSocket id reuse never delivers to the wrong tenant."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from tests._harness.apps import AppServer
from tests.messaging.conftest import MSG_APP

pytestmark = pytest.mark.servers

CYCLES = 10_000
LANES = 16
FLOOD = 3


async def _hello(ws: websockets.ClientConnection) -> str:
    async with asyncio.timeout(10):
        doc = json.loads(await ws.recv())
    return str(doc["hello"])


async def _lane(url: str, lane: int, cycles: int, tally: dict[str, int]) -> None:
    # One client id per lane, reused by every connection of the lane, like a reused fd.
    client = f"slot{lane}"
    # A long-lived connection whose worker sends the floods: often not the worker of A, so
    # its messages are in flight between workers while A closes and B connects.
    async with websockets.connect(f"{url}/ws/sender{lane}") as sender:
        await _hello(sender)
        for i in range(cycles):
            async with websockets.connect(f"{url}/ws/{client}") as a:  # tenant 1
                conn_a = await _hello(a)
                await sender.send(f"flood {client} {conn_a} t1-{i} {FLOOD}")
            async with websockets.connect(f"{url}/ws/{client}") as b:  # tenant 2, same id
                conn_b = await _hello(b)
                assert conn_b != conn_a
                await b.send(f"send {client} {conn_a} t1-late-{i}")  # to the closed connection
                await b.send(f"send {client} {conn_b} t2-{i}")
                async with asyncio.timeout(10):
                    while True:
                        msg = str(await b.recv())
                        if msg.startswith("t1"):
                            tally["cross_tenant"] += 1
                        if msg == f"t2-{i}":
                            break
            tally["cycles"] += 1


async def test_e19_no_cross_tenant_delivery_after_reuse() -> None:
    with AppServer(MSG_APP, env={"ZEAL_STORE_BACKEND": "table"}) as srv:
        tally = {"cycles": 0, "cross_tenant": 0}
        t0 = time.monotonic()
        per_lane = CYCLES // LANES
        await asyncio.gather(*(_lane(srv.ws_url, n, per_lane, tally) for n in range(LANES)))
        elapsed = time.monotonic() - t0
        ws = (await asyncio.to_thread(srv.get, "/stats"))["stats"]["ws"]["host"]
        line = (
            f"EXPERIMENT E19 ws-reuse | cycles={tally['cycles']} lanes={LANES} "
            f"flood={FLOOD}/cycle workers=2 | cross_tenant={tally['cross_tenant']} "
            f"stale_dropped_at_receiver={ws.get('stale_dropped', 0)} "
            f"owner_mismatch_refused={ws.get('owner_missing', 0)} "
            f"release_kept_newer_row={ws.get('release_kept', 0)} elapsed={elapsed:.1f}s | "
            f"{'PASS' if tally['cross_tenant'] == 0 and tally['cycles'] == CYCLES else 'FAIL'}"
        )
        print(line)
        assert tally["cycles"] == CYCLES
        assert tally["cross_tenant"] == 0
        assert line.endswith("PASS")
