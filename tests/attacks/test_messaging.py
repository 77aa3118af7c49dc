"""Messaging defects found by black-box testing (issue 12), through the public API.

Real servers: the ``zeal-asgi`` launcher with two workers serving ``tests/messaging/apps``,
real redis-server processes, WebSocket clients over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time

import pytest
import redis.asyncio as aioredis
import websockets

from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer
from tests.messaging.conftest import MSG_APP
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.store import Store
from zeal_asgi.streams import Streams

pytestmark = pytest.mark.servers

SECRET = "a shared secret of enough bytes"


async def _hello(ws: websockets.ClientConnection) -> dict[str, object]:
    async with asyncio.timeout(5):
        doc: dict[str, object] = json.loads(await ws.recv())
    return doc


async def _quiet(ws: websockets.ClientConnection, within: float) -> list[str]:
    """Everything ``ws`` receives in ``within`` seconds."""
    got: list[str] = []
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(within):
            while True:
                msg = await ws.recv()
                got.append(msg if isinstance(msg, str) else msg.decode())
    return got


async def _connect_on(
    srv: AppServer, path: str, *, worker: str = "", avoid: str = ""
) -> tuple[websockets.ClientConnection, dict[str, object]]:
    """A socket on ``path`` held by ``worker`` (or by any worker but ``avoid``), its hello."""
    for _ in range(40):
        ws = await websockets.connect(srv.ws_url + path)
        hello = await _hello(ws)
        if hello["worker"] != avoid and (not worker or hello["worker"] == worker):
            return ws, hello
        await ws.close()
    raise AssertionError(f"no connection landed where wanted (worker={worker!r}, avoid={avoid!r})")


async def test_send_without_conn_id_reaches_only_the_owner_rows_connection() -> None:
    """Issue 12 item 4: a client reconnected to another worker while its old socket is still
    open; ``send_to_client(client_id, msg)`` from the old socket's worker must reach the new
    socket (the one the owner row names), never the superseded one."""
    with AppServer(MSG_APP, env={"ZEAL_STORE_BACKEND": "table"}) as srv:
        old, old_hello = await _connect_on(srv, "/ws/dave")
        new, new_hello = await _connect_on(srv, "/ws/dave", avoid=str(old_hello["worker"]))
        try:
            sent = set()
            for i in range(20):  # from both workers, the old socket's one first (get_from
                # may also send from the other worker on the way: a duplicate, never a loss)
                pid = int(str((old_hello if i % 2 == 0 else new_hello)["pid"]))
                out = await asyncio.to_thread(
                    srv.get_from, "/send", pid=pid, client="dave", msg=f"m{i}"
                )
                assert out["ok"] is True
                sent.add(f"m{i}")
            got: set[str] = set()
            async with asyncio.timeout(10):
                while got != sent:
                    got.add(str(await new.recv()))
            assert await _quiet(old, 0.5) == []
        finally:
            await old.close()
            await new.close()


async def test_a_signed_room_message_replayed_on_another_workers_channel_is_dropped(
    redis_url: str,
) -> None:
    """Issue 12 item 7: a signed room broadcast captured on worker A's channel and republished
    on worker B's channel must not reach a client that joined on B later."""
    env = {"ZEAL_STORE_BACKEND": "redis", "ZEAL_REDIS_URL": redis_url, "MSG_WS_SECRET": SECRET}
    spy = aioredis.Redis.from_url(redis_url)
    sniff = spy.pubsub()
    with AppServer(MSG_APP, env=env) as srv:
        await sniff.psubscribe("zeal:ws:w:*")
        confirmed = await sniff.get_message(timeout=2)
        assert confirmed is not None and confirmed["type"] == "psubscribe"
        early, hello = await _connect_on(srv, "/ws/early?room=lobby")
        late = None
        try:
            worker_a = str(hello["worker"])  # the app joins the room before its hello
            await asyncio.to_thread(srv.get, "/broadcast", room="lobby", msg="secret")
            captured = None
            async with asyncio.timeout(5):
                while captured is None:
                    msg = await sniff.get_message(ignore_subscribe_messages=True, timeout=1)
                    if msg is not None and b"secret" in msg["data"]:
                        assert msg["channel"] == f"zeal:ws:w:{worker_a}".encode()
                        captured = msg["data"]
            late, hello = await _connect_on(srv, "/ws/late?room=lobby", avoid=worker_a)
            assert await spy.publish(f"zeal:ws:w:{hello['worker']}", captured) == 2  # B, sniff
            assert await _quiet(late, 1.0) == []
            await asyncio.to_thread(srv.get, "/broadcast", room="lobby", msg="fresh")
            assert await _quiet(late, 1.0) == ["fresh"]  # it is in the room: only the replay died
            rejected = srv.get("/stats")["stats"]["ws"]["host"]
            assert rejected.get("rejected", 0) >= 1
        finally:
            await early.close()
            if late is not None:
                await late.close()
            await sniff.aclose()
            await spy.aclose()


def _receivers(srv: AppServer) -> int:
    status, reply = srv.fetch("/publish?channel=news&payload=up")
    return int(reply["receivers"]) if status == 200 else -1  # refused while the breaker is open


async def test_an_app_with_a_ws_router_boots_degraded_with_redis_down(
    fresh_redis: RedisServer,
) -> None:
    """Issue 12 item 10: Redis down at boot with ``ZEAL_ON_ERROR=fallback_table``: an app with
    a WSRouter starts (its heartbeat retries in the background) and recovers once Redis is up."""
    fresh_redis.kill()
    env = {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": fresh_redis.url,
        "ZEAL_ON_ERROR": "fallback_table",
        "MSG_WORKER_TTL": "0.6",
    }
    with AppServer(MSG_APP, env=env) as srv:
        stats = srv.get("/stats")["stats"]
        assert stats["pubsub"]["state"] in ("connecting", "backoff")
        assert stats["ws"]["host"]["heartbeat_errors"] >= 1
        fresh_redis.start()
        deadline = time.monotonic() + 30
        while _receivers(srv) != 2:
            assert time.monotonic() < deadline, srv.log_text()
            await asyncio.sleep(0.2)
        ws, hello = await _connect_on(srv, "/ws/erin")
        try:
            out = await asyncio.to_thread(
                srv.get_from, "/send", avoid=int(str(hello["pid"])), client="erin", msg="back"
            )
            assert out["ok"] is True
            assert set(await _quiet(ws, 1.0)) == {"back"}  # get_from may have sent it twice
        finally:
            await ws.close()


async def test_a_subscriber_that_gave_up_says_failed(fresh_redis: RedisServer) -> None:
    """Issue 12 item 14: pub/sub and Streams subscribers with ``max_attempts`` give up for good
    when Redis stays away: ``Store.stats()`` (and so ``/health/store``) must say ``failed``."""
    store = Store("redis", {"url": fresh_redis.url, "socket_timeout": 0.5})
    await store.start()
    pubsub = PubSub(store, max_attempts=2, backoff_base=0.01, backoff_cap=0.05, ready_timeout=1)
    pubsub.subscribe("news", lambda payload, channel: None)
    streams = Streams(store, max_attempts=2, backoff_base=0.01, backoff_cap=0.05)
    streams.subscribe("jobs", lambda payload, entry: True, block_ms=100, reclaim_interval=0.1)
    await pubsub.start()
    await streams.start()
    try:
        assert store.stats()["pubsub"]["state"] == "subscribed"
        assert store.stats()["streams"]["state"] == "running"
        fresh_redis.kill()
        deadline = time.monotonic() + 20
        while {store.stats()[f]["state"] for f in ("pubsub", "streams")} != {"failed"}:
            assert time.monotonic() < deadline, store.stats()
            await asyncio.sleep(0.05)
    finally:
        await streams.stop()
        await pubsub.stop()
        await store.aclose()


@pytest.mark.parametrize("kind", ["table", "redis", "tiered", "cluster"])
async def test_publish_counts_each_worker_reached_once(
    kind: str, request: pytest.FixtureRequest
) -> None:
    """Issue 12 item 12: a worker subscribed to a channel and to a matching pattern is one
    receiver on every backend (Redis said 2), and a Cluster counts the workers of every node
    (it said 0)."""
    if kind == "table":
        store = Store("table")
    elif kind == "cluster":
        cluster = request.getfixturevalue("redis_cluster")
        conn = cluster.routing_conn(prefix=f"c{time.monotonic_ns()}")
        store = Store("redis", conn)
    else:
        store = Store(kind, {"url": request.getfixturevalue("redis_url")})
    await store.start()
    got: list[tuple[str, str]] = []
    workers = [PubSub(store) for _ in range(3)]  # each with its own subscriber, as a worker
    for ps in workers[:2]:
        ps.subscribe("news", lambda p, c: got.append(("news", p)))
        ps.subscribe("ne*", lambda p, c: got.append(("ne*", p)))
        ps.subscribe("n?ws", lambda p, c: got.append(("n?ws", p)))
    workers[2].subscribe("other", lambda p, c: got.append(("other", p)))
    try:
        for ps in workers:
            await ps.start()
        assert await store.publish("news", "a") == 2
        assert await store.publish("nexus", "b") == 2
        assert await store.publish("other", "c") == 1
        assert await store.publish("nobody", "d") == 0
        want = sorted([(t, "a") for t in ("news", "ne*", "n?ws")] * 2 + [("ne*", "b")] * 2)
        deadline = time.monotonic() + 5
        while sorted(got) != sorted([*want, ("other", "c")]):
            assert time.monotonic() < deadline, sorted(got)
            await asyncio.sleep(0.02)
        await workers[1].stop()  # a worker that stops is no receiver any more
        assert await store.publish("news", "e") == 1
    finally:
        for ps in workers:
            await ps.stop()
        await store.aclose()
        if kind == "table":
            close_host_bus()
