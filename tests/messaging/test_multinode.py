"""Real servers: two nodes x 2 workers sharing one Redis, and one node x 2 workers without Redis."""

from __future__ import annotations

import asyncio
import json
import time

import pytest
import websockets

from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer, running
from tests.messaging.conftest import MSG_APP

pytestmark = pytest.mark.servers


def _wait_receivers(server: AppServer, want: int, timeout: float = 15.0) -> int:
    """Publish until ``want`` workers receive (subscriptions start with the workers)."""
    deadline = time.monotonic() + timeout
    n = -1
    while time.monotonic() < deadline:
        n = int(server.get("/publish", channel="news", payload="warmup")["receivers"])
        if n == want:
            return n
        time.sleep(0.1)
    return n


async def _recv_until(ws: websockets.ClientConnection, want: str) -> list[str]:
    got: list[str] = []
    async with asyncio.timeout(5):
        while want not in got:
            msg = await ws.recv()
            got.append(msg if isinstance(msg, str) else msg.decode())
    return got


async def _hello(ws: websockets.ClientConnection) -> dict[str, object]:
    async with asyncio.timeout(5):
        doc: dict[str, object] = json.loads(await ws.recv())
    return doc


async def test_two_nodes_share_pubsub_and_websockets(redis_server: RedisServer) -> None:
    redis_server.command("FLUSHALL")
    env = {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": redis_server.url,
        "MSG_WS_SECRET": "a shared secret of enough bytes",
    }
    with running(AppServer(MSG_APP, env=env), AppServer(MSG_APP, env=env)) as (a, b):
        # publish receivers = one per subscribed worker per node = 2 x 2
        assert _wait_receivers(a, 4) == 4
        out = b.get("/publish", channel="news", payload="hello-4")
        print(f"publish via node B: receivers={out['receivers']}")
        assert out["receivers"] == 4
        deadline = time.monotonic() + 5
        seen: dict[int, list[str]] = {}
        while time.monotonic() < deadline and len(seen) < 4:
            for srv in (a, b):
                doc = srv.get("/log")
                if "hello-4" in doc["received"]:
                    seen[doc["pid"]] = doc["received"]
        assert len(seen) == 4, f"workers that got it: {sorted(seen)}"

        # a WebSocket client on node A receives a message sent through node B
        async with websockets.connect(f"{a.ws_url}/ws/alice?room=lobby") as wa:
            hello = await _hello(wa)
            assert len(str(hello["hello"])) == 32  # 128-bit conn_id
            async with websockets.connect(f"{b.ws_url}/ws/bob?room=lobby") as wb:
                await _hello(wb)
                sent = await asyncio.to_thread(b.get, "/send", client="alice", msg="from-B")
                assert sent["ok"] is True
                assert "from-B" in await _recv_until(wa, "from-B")
                # rooms span both nodes; the broadcast goes to the 2 workers holding members
                rooms = await asyncio.to_thread(b.get, "/rooms", room="lobby")
                assert len(rooms["servers"]) == 2, rooms
                out = await asyncio.to_thread(a.get, "/broadcast", room="lobby", msg="all")
                assert out["receivers"] == 2
                assert "all" in await _recv_until(wa, "all")
                assert "all" in await _recv_until(wb, "all")
                # a stale connection id is refused, not delivered to the current socket
                stale = await asyncio.to_thread(
                    b.get, "/send", client="alice", msg="x", conn="0" * 32
                )
                assert stale["ok"] is False
        # released when the server sees the close: then no owner row is left
        deadline = time.monotonic() + 5
        while (await asyncio.to_thread(b.get, "/send", client="alice", msg="late"))["ok"]:
            assert time.monotonic() < deadline, "the owner row outlived the connection"
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["launcher", "uvicorn-workers", "gunicorn", "gunicorn-preload"])
async def test_one_node_without_redis_crosses_workers(kind: str) -> None:
    env = {"ZEAL_STORE_BACKEND": "table"}
    with AppServer(MSG_APP, env=env, server=kind) as srv:
        assert _wait_receivers(srv, 2) == 2
        async with websockets.connect(f"{srv.ws_url}/ws/carol?room=r1") as ws:
            hello = await _hello(ws)
            owner = int(str(hello["pid"]))
            # sent by the other worker: crosses through the shared-memory bus
            out = await asyncio.to_thread(
                srv.get_from, "/send", avoid=owner, client="carol", msg="x"
            )
            assert out["ok"] is True and out["pid"] != owner
            assert "x" in await _recv_until(ws, "x")
            out = await asyncio.to_thread(
                srv.get_from, "/broadcast", avoid=owner, room="r1", msg="y"
            )
            assert out["receivers"] == 1
            assert "y" in await _recv_until(ws, "y")
        # router.serve(): a chat room across the two workers
        async with (
            websockets.connect(f"{srv.ws_url}/chat/u1") as c1,
            websockets.connect(f"{srv.ws_url}/chat/u2") as c2,
        ):
            # the joins run right after the handshakes: resend until both are in the room
            deadline = time.monotonic() + 5
            while True:
                await c1.send("hello")
                try:
                    async with asyncio.timeout(0.3):
                        assert "u1: hello" in await _recv_until(c2, "u1: hello")
                    break
                except TimeoutError:
                    assert time.monotonic() < deadline, "no chat message crossed"
            assert "u1: hello" in await _recv_until(c1, "u1: hello")
        stats = srv.get("/stats")["stats"]
        assert stats["pubsub"]["state"] == "subscribed"
        assert stats["ws"]["host"]["owns"] >= 1
