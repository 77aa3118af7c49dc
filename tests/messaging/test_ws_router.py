"""WSRouter pieces: conditional release, room bookkeeping, names, signed envelopes."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from starlette.applications import Starlette
from starlette.routing import WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocket

from tests.messaging.helpers import Socket, until
from zeal_asgi import Zeal
from zeal_asgi.errors import InvalidKeyError, KeyTypeError, SerializationError, ValueTooLargeError
from zeal_asgi.messaging.ws.rooms import Registry, ShmRegistry
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.store import Store
from zeal_asgi.ws import WSRouter, check_client_id, check_room


async def test_release_only_removes_the_matching_connection(registry: Registry) -> None:
    await registry.set_owner("alice", "a" * 32, "w1")
    await registry.set_owner("alice", "b" * 32, "w2")  # reconnected elsewhere
    assert await registry.release_owner("alice", "a" * 32) is False  # the late close
    assert await registry.get_owner("alice") == ("b" * 32, "w2")
    assert await registry.release_owner("alice", "b" * 32) is True
    assert await registry.get_owner("alice") is None
    assert await registry.release_owner("alice", "") is False


async def test_room_servers_follow_joins_and_leaves(registry: Registry) -> None:
    assert await registry.join("r", "c1", "w1")
    assert await registry.join("r", "c2", "w2")
    assert await registry.join("r", "c3", "w1")
    assert not await registry.join("r", "c3", "w1")  # already there
    assert sorted(await registry.room_servers("r")) == ["w1", "w2"]
    assert await registry.leave("r", "c2")
    assert await registry.room_servers("r") == ["w1"]
    assert await registry.join("r", "c1", "w2")  # moved: w1 keeps c3, w2 has c1
    assert sorted(await registry.room_servers("r")) == ["w1", "w2"]
    assert not await registry.leave("r", "c1", "w1")  # a late leave from the old worker
    assert await registry.leave("r", "c3", "w1")
    assert await registry.room_servers("r") == ["w2"]
    assert await registry.leave("r", "c1")
    assert await registry.room_servers("r") == []
    assert await registry.room_servers("other") == []


def test_names_are_validated() -> None:
    for bad in ("", "a b", "x" * 65, "a/b", "{r}", "é"):
        with pytest.raises(InvalidKeyError, match="room name"):
            check_room(bad)
    with pytest.raises(KeyTypeError):
        check_room(3)
    assert check_room("lobby-1.a_b") == "lobby-1.a_b"
    with pytest.raises(InvalidKeyError, match="200"):
        check_client_id("x" * 201)
    with pytest.raises(InvalidKeyError):
        check_client_id("")


@pytest.fixture
async def router() -> AsyncIterator[WSRouter]:
    r = WSRouter(Store("table"), secret="a ws secret that is long enough")
    await r.start()
    yield r
    await r.stop()
    assert isinstance(r.registry, ShmRegistry)
    r.registry.close()
    close_host_bus()


async def test_signed_envelopes_reject_forgery_and_replay(router: WSRouter) -> None:
    sock = Socket()
    conn = router.own("bob", sock)
    assert len(conn) == 32 and int(conn, 16) >= 0  # 128 random bits
    channel = router._channel(router.worker)
    assert router.signer is not None
    good = router.signer.sign({"t": "d", "c": "bob", "n": conn, "p": "hi", "to": router.worker})
    assert await router.pubsub.publish_system(channel, good) == 1
    await until(lambda: sock.sent == ["hi"], within=5.0)
    forged = json.loads(good)
    forged["p"] = "evil"
    await router.pubsub.publish_system(channel, json.dumps(forged).encode())  # bad MAC
    await router.pubsub.publish_system(channel, good)  # replayed nonce
    unsigned = {"t": "d", "c": "bob", "n": conn, "p": "unsigned"}
    await router.pubsub.publish_system(channel, json.dumps(unsigned).encode())
    signer = router.signer
    await until(lambda: sum(signer.counter.rejected.values()) == 3, within=5.0)
    assert router.signer.counter.rejected["bad_mac"] == 1
    assert router.signer.counter.rejected["replay"] == 1
    assert router.signer.counter.rejected["malformed"] == 1
    assert sock.sent == ["hi"]


async def test_delivery_needs_the_current_conn_id(router: WSRouter) -> None:
    old, new = Socket(), Socket()
    first = router.own("carol", old)
    second = router.own("carol", new)  # same client id, new connection on this worker
    assert await router.send_to_client("carol", "to-old", conn_id=first) is False
    assert await router.send_to_client("carol", "to-new", conn_id=second) is True
    assert await router.send_to_client("carol", {"k": 1}) is True
    assert await router.send_to_client("carol", b"\x00\x01") is True
    await until(lambda: len(new.sent) == 3, within=5.0)
    assert new.sent == ["to-new", '{"k":1}', b"\x00\x01"]
    assert old.sent == []
    with pytest.raises(ValueTooLargeError, match="65536"):
        await router.send_to_client("carol", "x" * 70_000)
    with pytest.raises(SerializationError):
        await router.send_to_client("carol", object())  # type: ignore[arg-type]
    assert await router.release("carol", first) is False  # not the row's connection
    assert await router.release("carol", second) is True
    assert await router.send_to_client("carol", "after") is False


async def test_rooms_and_presence_are_separate(router: WSRouter) -> None:
    events: list[tuple[str, str, str]] = []
    router.on_presence(lambda e, r, c: events.append((e, r, c)))
    s1, s2 = Socket(), Socket()
    router.own("u1", s1)
    router.own("u2", s2)
    assert await router.join("lobby", "u1")
    assert await router.join("lobby", "u2")
    assert await router.room_servers("lobby") == [router.worker]
    # a user payload that looks like presence is still just a payload
    assert await router.broadcast("lobby", {"type": "join", "client_id": "x"}) == 1
    await until(lambda: len(s1.sent) == 1 and len(s2.sent) == 1, within=5.0)
    assert json.loads(s1.sent[0]) == {"type": "join", "client_id": "x"}
    await until(lambda: len(events) == 2, within=5.0)
    assert events == [("join", "lobby", "u1"), ("join", "lobby", "u2")]
    assert await router.leave("lobby", "u2")
    assert await router.broadcast("lobby", "only-u1") == 1
    await until(lambda: s1.sent[-1] == "only-u1", within=5.0)
    assert len(s2.sent) == 1
    with pytest.raises(InvalidKeyError):
        await router.join("bad room", "u1")
    assert not await router.join("lobby", "nobody")


def test_a_session_closed_while_serve_releases_ends_cleanly() -> None:
    """A chat client that never joined a room disconnects, and the test client cancels the
    handler at once, in the middle of its release: the cancellation stays the test client's
    own (no CancelledError leaks out of the session), and the release still completes."""
    zeal = Zeal(store=Store("table"))
    router = WSRouter(zeal)

    async def chat(websocket: WebSocket) -> None:
        await router.serve(websocket.path_params["client"], websocket, lambda data: None)

    app = Starlette(routes=[WebSocketRoute("/chat/{client}", chat)], lifespan=zeal.lifespan)
    clients = [f"u{i}" for i in range(20)]
    try:
        with TestClient(app) as http:
            for client in clients:
                with http.websocket_connect(f"/chat/{client}") as ws:
                    ws.send_text("hi")
        owners = [asyncio.run(router.registry.get_owner(c)) for c in clients]
    finally:
        assert isinstance(router.registry, ShmRegistry)
        router.registry.close()
        close_host_bus()
    assert owners == [None] * len(clients)


async def test_worker_alive_answers_for_live_and_dead_workers(router: WSRouter) -> None:
    assert await router.worker_alive(router.worker) is True
    dead = await asyncio.create_subprocess_exec("true")
    await dead.wait()
    assert await router.worker_alive(f"{router.server}:{dead.pid}") is False


def test_the_router_is_a_top_level_name() -> None:
    """``from zeal_asgi import WSRouter``, where users of the seed reach for it first, is the
    router of ``zeal_asgi.ws``."""
    import zeal_asgi
    import zeal_asgi.ws

    assert zeal_asgi.WSRouter is zeal_asgi.ws.WSRouter
    assert "WSRouter" in zeal_asgi.__all__
