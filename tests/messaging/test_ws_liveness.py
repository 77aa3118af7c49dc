"""Rows of dead WebSocket workers are reaped; a worker whose registration was lost re-registers.

Registry level on shared memory and on a real Redis; router level with planted rows of a worker
that never released them (a pid that no longer runs, or a Redis liveness mark that expired); and
real processes: a launcher worker SIGKILLed while its client sits in a room.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import websockets

from tests._harness.apps import AppServer
from tests._harness.servers import RedisCluster, RedisServer
from tests.messaging.conftest import MSG_APP
from tests.messaging.helpers import Socket, redis_link, until
from zeal_asgi.errors import ConfigError
from zeal_asgi.messaging.ws.rooms import RedisRegistry, Registry, ShmRegistry
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Store
from zeal_asgi.ws import WSRouter


def _stat(name: str) -> int:
    return host_stats().worker().get(name, 0)


def _dead_pid() -> int:
    proc = subprocess.Popen(["true"])
    proc.wait()
    return proc.pid


# -- registry ----------------------------------------------------------------------------------


async def test_only_if_absent_never_moves_a_newer_row(registry: Registry) -> None:
    assert await registry.set_owner("a", "1" * 32, "w1", only_if_absent=True) is True
    assert await registry.set_owner("a", "2" * 32, "w2", only_if_absent=True) is False
    assert await registry.get_owner("a") == ("1" * 32, "w1")
    assert await registry.set_owner("a", "2" * 32, "w2") is True  # newest wins otherwise
    assert await registry.get_owner("a") == ("2" * 32, "w2")
    assert await registry.join("r", "a", "w2")
    assert not await registry.join("r", "a", "w1", only_if_absent=True)
    assert await registry.room_servers("r") == ["w2"]
    assert await registry.join("r", "b", "w1", only_if_absent=True)
    assert sorted(await registry.room_servers("r")) == ["w1", "w2"]


async def test_purge_removes_one_workers_members_only(registry: Registry) -> None:
    for client, worker in (("a", "w1"), ("b", "w2"), ("c", "w1"), ("d", "w3")):
        assert await registry.join("r", client, worker)
    assert await registry.join("other", "e", "w1")
    assert sorted(await registry.purge("r", "w1")) == ["a", "c"]
    assert sorted(await registry.room_servers("r")) == ["w2", "w3"]
    assert await registry.room_servers("other") == ["w1"]  # another room is untouched
    assert await registry.purge("r", "w1") == []
    assert await registry.join("r", "a", "w2")  # a purged client can join again
    assert await registry.leave("r", "b")
    assert sorted(await registry.room_servers("r")) == ["w2", "w3"]


async def test_shared_memory_liveness_is_the_pid() -> None:
    reg = ShmRegistry(owner_capacity=16, room_capacity=16)
    try:
        assert reg.beats is False
        assert await reg.worker_alive(f"host-x:{os.getpid()}")
        assert not await reg.worker_alive(f"host-x:{_dead_pid()}")
        assert await reg.worker_alive("not-a-worker-name")  # unknown: never reaped
    finally:
        reg.close()


async def test_redis_liveness_marks_expire(redis_url: str) -> None:

    store = Store("redis", {"url": redis_url, "prefix": f"lv{time.monotonic_ns()}"})
    await store.start()
    try:
        reg = RedisRegistry(redis_link(store))
        assert reg.beats is True
        assert not await reg.worker_alive("w1")
        # marks that outlive a loaded machine's slowest call; then a short one, left to expire
        assert await reg.beat("w1", 30) is False  # first beat: there was no mark
        assert await reg.worker_alive("w1")
        assert await reg.beat("w1", 0.3) is True
        await asyncio.sleep(0.45)
        assert not await reg.worker_alive("w1")
        assert await reg.beat("w1", 30) is False  # the mark had expired
        await reg.forget_worker("w1")
        assert not await reg.worker_alive("w1")
    finally:
        await store.aclose()


# -- router ------------------------------------------------------------------------------------


@pytest.fixture(params=["table", "redis"])
async def router(request: pytest.FixtureRequest) -> AsyncIterator[WSRouter]:
    if request.param == "table":
        store = Store("table")
    else:
        url = request.getfixturevalue("redis_url")
        store = Store("redis", {"url": url, "prefix": f"lv{time.monotonic_ns()}"})
        await store.start()
    r = WSRouter(store, worker_ttl=0.6)
    await r.start()
    yield r
    await r.stop()
    if isinstance(r.registry, ShmRegistry):
        r.registry.close()
        close_host_bus()
    else:
        await store.aclose()


def _ghost(router: WSRouter) -> str:
    """The name of a worker of this server that died without releasing anything."""
    return f"{router.server}:{_dead_pid()}"


def test_worker_ttl_is_validated() -> None:
    for bad in (0, -1, 0.1, float("nan"), float("inf"), True, "30"):
        with pytest.raises(ConfigError, match="worker_ttl"):
            WSRouter(Store("redis", {"url": "redis://127.0.0.1:1"}), worker_ttl=bad)  # type: ignore[arg-type]


async def test_a_dead_workers_members_and_owner_rows_are_reaped(router: WSRouter) -> None:
    events: list[tuple[str, str, str]] = []
    router.on_presence(lambda e, r, c: events.append((e, r, c)))
    sock = Socket()
    router.own("u1", sock)
    assert await router.join("lobby", "u1")
    ghost = _ghost(router)
    reg = router.registry
    await reg.set_owner("g1", "f" * 32, ghost)
    assert await reg.join("lobby", "g1", ghost)
    assert await reg.join("lobby", "g2", ghost)
    assert await reg.join("quiet", "g3", ghost)
    assert sorted(await router.room_servers("lobby")) == sorted([router.worker, ghost])
    reaped = _stat("ws_reaped_members")

    assert await router.broadcast("lobby", "hi") == 1  # only this worker received it
    await until(lambda: ("leave", "lobby", "g2") in events and ("leave", "lobby", "g1") in events)
    assert await router.room_servers("lobby") == [router.worker]
    assert _stat("ws_reaped_members") - reaped == 2
    assert "hi" in sock.sent
    # a room nobody sent to keeps its rows until a message finds the worker gone
    assert await router.room_servers("quiet") == [ghost]

    assert await router.send_to_client("g1", "x") is False
    for _ in range(500):
        if await reg.get_owner("g1") is None:
            break
        await asyncio.sleep(0.01)
    assert await reg.get_owner("g1") is None


async def test_a_live_worker_that_missed_a_message_is_not_reaped(router: WSRouter) -> None:
    reg = router.registry
    if reg.beats:
        alive = "elsewhere-node:1"
        await reg.beat(alive, 30)  # another node's worker, renewing its mark
    else:
        alive = f"{router.server}:{os.getppid()}"  # a process that runs, subscribed or not
    assert await reg.join("lobby", "far", alive)
    assert await router.broadcast("lobby", "hi") == 0  # nobody received it
    await until(lambda: alive in router._alive_until)
    assert await router.room_servers("lobby") == [alive]
    if reg.beats:
        await reg.forget_worker(alive)


async def test_a_lost_registration_is_written_again(redis_url: str) -> None:
    store = Store("redis", {"url": redis_url, "prefix": f"lv{time.monotonic_ns()}"})
    await store.start()
    router = WSRouter(store, worker_ttl=0.6)
    await router.start()
    try:
        reg = router.registry
        assert isinstance(reg, RedisRegistry)
        mine = router.own("u1", Socket())
        moved = router.own("u2", Socket())
        assert await router.join("lobby", "u1")
        assert await router.join("lobby", "u2")
        before = _stat("ws_reregistrations")
        owner_u2 = reg._owner_key("u2")
        members, servers = reg._room_keys("lobby")

        async def lose_everything(c: Any) -> None:
            # Redis loses its data and, in the same step, u2 reconnects to another worker
            async with c.pipeline(transaction=True) as p:
                p.flushdb()
                p.hset(owner_u2, mapping={"c": "9" * 32, "w": "other:1"})
                p.hset(members, "u2", "other:1")
                p.hset(servers, "other:1", 1)
                await p.execute()

        await reg.redis.run(lose_everything, what="test", idempotent=False)
        for _ in range(300):
            if await reg.get_owner("u1") is not None:
                break
            await asyncio.sleep(0.01)
        assert await reg.get_owner("u1") == (mine, router.worker)
        await until(lambda: _stat("ws_reregistrations") > before)
        for _ in range(300):
            if sorted(await router.room_servers("lobby")) == sorted([router.worker, "other:1"]):
                break
            await asyncio.sleep(0.01)
        assert sorted(await router.room_servers("lobby")) == sorted([router.worker, "other:1"])
        # u2 lives elsewhere now: its newer rows were kept
        assert await reg.get_owner("u2") == ("9" * 32, "other:1")
        assert moved != "9" * 32
        assert await reg.worker_alive(router.worker)
    finally:
        await router.stop()
        assert not await router.registry.worker_alive(router.worker)  # a clean stop drops it
        await store.aclose()


# -- real processes ----------------------------------------------------------------------------


@pytest.mark.servers
async def test_a_sigkilled_workers_room_members_are_reaped(redis_server: RedisServer) -> None:
    env = {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": redis_server.url,
        "MSG_WORKER_TTL": "1",
    }
    redis_server.command("FLUSHALL")
    with AppServer(MSG_APP, env=env, workers=2) as srv:
        async with websockets.connect(f"{srv.ws_url}/ws/victim?room=lobby") as ws:
            async with asyncio.timeout(5):
                hello = json.loads(await ws.recv())
            dead_worker, pid = str(hello["worker"]), int(hello["pid"])
            rooms = await asyncio.to_thread(srv.get, "/rooms", room="lobby")  # joined before hello
            assert rooms["servers"] == [dead_worker]
            os.kill(pid, signal.SIGKILL)  # no release: its rows stay behind
            t0 = time.monotonic()
            deadline = t0 + 15
            while True:
                await asyncio.to_thread(srv.get, "/broadcast", room="lobby", msg="anyone?")
                rooms = await asyncio.to_thread(srv.get, "/rooms", room="lobby")
                if dead_worker not in rooms["servers"]:
                    break
                assert time.monotonic() < deadline, f"never reaped: {rooms}"
                await asyncio.sleep(0.1)
            print(f"the killed worker's members were reaped {time.monotonic() - t0:.2f} s after")
            assert rooms["servers"] == []


# -- room publishing in one round trip -----------------------------------------------------------


async def test_room_publish_is_one_script_on_redis(
    registry: Registry, request: pytest.FixtureRequest
) -> None:
    assert await registry.join("r", "a", "w1")
    assert await registry.join("r", "b", "w2")
    if isinstance(registry, ShmRegistry):
        assert await registry.publish_room("r", "ch:", b"x") is None  # the router publishes
        return
    import redis.asyncio as aioredis

    url = request.getfixturevalue("redis_url")
    client = aioredis.Redis.from_url(url)
    try:
        async with client.pubsub() as sub:
            await sub.subscribe("ch:w1")
            pairs = await registry.publish_room("r", "ch:", b"hello")
            assert sorted(pairs or []) == [("w1", 1), ("w2", 0)]
            got = None
            for _ in range(200):
                msg = await sub.get_message(ignore_subscribe_messages=True, timeout=0.05)
                if msg is not None:
                    got = msg["data"]
                    break
            assert got == b"hello"
        assert await registry.leave("r", "a")
        assert await registry.publish_room("r", "ch:", b"again") == [("w2", 0)]
        assert await registry.publish_room("empty", "ch:", b"x") == []
    finally:
        await client.aclose()


async def test_room_publish_on_a_cluster(redis_cluster: RedisCluster) -> None:

    conn = redis_cluster.routing_conn(prefix=f"lv{time.monotonic_ns()}")
    store = Store("redis", conn)
    await store.start()
    try:
        reg = RedisRegistry(redis_link(store))
        for room in ("r1", "r2", "r3"):  # rooms hash to different slots
            assert await reg.join(room, "a", "w1")
            assert await reg.publish_room(room, "ch:", b"x") == [("w1", 0)]
            assert await reg.purge(room, "w1") == ["a"]
            assert await reg.publish_room(room, "ch:", b"x") == []
    finally:
        await store.aclose()
