"""The multi-tab chat (``/ws/chat``) and the ``/demo/rooms`` endpoints, over ``WSRouter``.

A tab opens ``/ws/chat?room=lobby&name=alice`` and sends ``{"type": "join"}``; its worker joins
it to the room and answers with a ``welcome`` naming the worker.  Each ``{"text": ...}`` it
sends is broadcast to the room, so it reaches every tab whichever worker (or node) holds it.
A roster table records who is connected where, for ``members`` / ``online`` / ``state``.
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket

from zeal_asgi import Store
from zeal_asgi.fastapi import StoreDep, WSRouterDep

from .models import RoomMembers, RoomOnline, RoomPush, RoomState

__all__ = ["ROSTER", "router", "ws_router"]

ROSTER = "demo_chat_clients"
MAX_TEXT = 500

Store.make(
    ROSTER,
    1024,
    {
        "room": (Store.TYPE_STRING, 64),
        "name": (Store.TYPE_STRING, 32),
        "pid": (Store.TYPE_INT, 4),
        "since": (Store.TYPE_FLOAT,),
    },
)

router = APIRouter(prefix="/demo/rooms", tags=["rooms"])
ws_router = APIRouter(tags=["chat"])

Room = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Name = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]


async def _roster(store: Store) -> list[tuple[str, dict[str, Any]]]:
    return [(str(key), row) async for key, row in store.iterate(ROSTER)]


@ws_router.websocket("/ws/chat")
async def chat(
    websocket: WebSocket,
    rooms: WSRouterDep,
    store: StoreDep,
    room: Room = "lobby",
    name: Name = "guest",
) -> None:
    """One chat tab: join on ``{"type": "join"}``, broadcast each ``{"text": ...}``."""
    client_id = f"{name}-{secrets.token_hex(4)}"
    joined = False

    async def say(doc: dict[str, Any]) -> None:
        await rooms.send_to_client(client_id, doc)

    async def on_message(data: str | bytes) -> None:
        nonlocal joined
        try:
            doc = json.loads(data)
        except ValueError:
            await say({"type": "error", "error": "messages are JSON objects"})
            return
        if not isinstance(doc, dict):
            await say({"type": "error", "error": "messages are JSON objects"})
            return
        if doc.get("type") == "join":
            if not joined:
                await rooms.join(room, client_id)
                row = {"room": room, "name": name, "pid": os.getpid(), "since": time.time()}
                await store.set(ROSTER, client_id, row)
                joined = True
                await rooms.broadcast(room, _presence("join", room, client_id))
            await say(
                {"type": "welcome", "client": client_id, "room": room, "worker_pid": os.getpid()}
            )
            return
        text = doc.get("text")
        if not isinstance(text, str) or not text.strip():
            await say({"type": "error", "error": 'send {"text": "..."}'})
        elif len(text) > MAX_TEXT:
            await say({"type": "error", "error": f"text is {len(text)} chars; limit {MAX_TEXT}"})
        elif not joined:
            await say({"type": "error", "error": 'send {"type": "join"} first'})
        else:
            await rooms.broadcast(room, _message(room, name, text))

    try:
        await rooms.serve(client_id, websocket, on_message=on_message)
    finally:
        if joined:
            await store.delete(ROSTER, client_id)
            await rooms.broadcast(room, _presence("leave", room, client_id))


def _message(room: str, sender: str, text: str) -> dict[str, Any]:
    return {
        "type": "message",
        "room": room,
        "sender": sender,
        "text": text,
        "worker_pid": os.getpid(),
    }


def _presence(event: str, room: str, client_id: str) -> dict[str, Any]:
    return {"type": "presence", "event": event, "room": room, "client": client_id}


@router.get("/members", response_model=RoomMembers)
async def members(store: StoreDep, rooms: WSRouterDep, room: Room = "lobby") -> RoomMembers:
    """Who is in ``room``, and which workers hold its members (``room_servers``)."""
    names = sorted(key for key, row in await _roster(store) if row["room"] == room)
    return RoomMembers(
        room=room, size=len(names), members=names, servers=await rooms.room_servers(room)
    )


@router.get("/push", response_model=RoomPush)
async def push(
    rooms: WSRouterDep,
    room: Room = "lobby",
    msg: Annotated[str, Query(min_length=1, max_length=MAX_TEXT)] = "hello",
) -> RoomPush:
    """Broadcast a server message to ``room``; ``receivers`` = workers that got it."""
    receivers = await rooms.broadcast(room, _message(room, "server", msg))
    return RoomPush(room=room, msg=msg, receivers=receivers)


@router.get("/online", response_model=RoomOnline)
async def online(store: StoreDep) -> RoomOnline:
    """Chat clients connected to the app, per worker."""
    by_worker: dict[str, int] = {}
    roster = await _roster(store)
    for _, row in roster:
        by_worker[str(row["pid"])] = by_worker.get(str(row["pid"]), 0) + 1
    return RoomOnline(total=len(roster), by_worker=by_worker)


@router.get("/state", response_model=RoomState)
async def state(store: StoreDep) -> RoomState:
    """The chat clients whose socket this worker holds."""
    mine = sorted(key for key, row in await _roster(store) if row["pid"] == os.getpid())
    return RoomState(worker_pid=os.getpid(), local_clients=mine)
