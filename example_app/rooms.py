"""The multi-tab chat (``/ws/chat``) and the ``/demo/rooms`` endpoints, over ``WSRouter``.

A tab opens ``/ws/chat?room=lobby&name=alice`` and sends ``{"type": "join"}``; its worker joins
it to the room and answers with a ``welcome`` naming the worker.  Each ``{"text": ...}`` it
sends is broadcast to the room, so it reaches every tab whichever worker (or node) holds it.
A roster table records who is connected where, for ``members`` / ``online`` / ``state``.

Limits, each answered rather than crashing the socket:

- a frame over ``MAX_FRAME`` bytes, or JSON nested deeper than ``MAX_DEPTH``, closes the socket
  with code **1009** (message too big) and a reason naming the limit; a frame that is not UTF-8
  closes it with **1007**; JSON that is not an object is an ``error`` message;
- a ``join`` past the roster's ``ROSTER_ROWS`` members (or the router's room capacity) is an
  ``error`` message; the socket stays open, not joined;
- a worker that dies without releasing its sockets (SIGKILL, OOM) leaves roster rows behind:
  they are dropped when the router reports that worker gone (a presence ``leave`` from its
  reaping) and whenever a roster listing finds the worker dead (its pid on the table backend,
  its liveness mark, ``worker_ttl`` seconds, on Redis).
"""

from __future__ import annotations

import json
import os
import secrets
import time
from typing import Annotated, Any

from fastapi import APIRouter, Query, WebSocket

from zeal_asgi import Store, Zeal
from zeal_asgi.errors import CapacityError, TableFullError
from zeal_asgi.fastapi import StoreDep, WSRouterDep
from zeal_asgi.ws import WSRouter

from .models import RoomMembers, RoomOnline, RoomPush, RoomState

__all__ = ["MAX_DEPTH", "MAX_FRAME", "ROSTER", "ROSTER_ROWS", "install", "router", "ws_router"]

ROSTER = "demo_chat_clients"
ROSTER_ROWS = 1024
MAX_TEXT = 500
MAX_FRAME = 4096
"""Bytes of one chat frame (a 500-character text fits with room to spare)."""
MAX_DEPTH = 8
"""Nesting of a chat frame's JSON (``{"text": ...}`` is 1 deep)."""

Store.make(
    ROSTER,
    ROSTER_ROWS,
    {
        "room": (Store.TYPE_STRING, 64),
        "name": (Store.TYPE_STRING, 32),
        "pid": (Store.TYPE_INT, 4),
        "worker": (Store.TYPE_STRING, 160),  # WSRouter's ``server:pid``, to check liveness
        "since": (Store.TYPE_FLOAT,),
    },
)

router = APIRouter(prefix="/demo/rooms", tags=["rooms"])
ws_router = APIRouter(tags=["chat"])

Room = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
Name = Annotated[str, Query(pattern=r"^[A-Za-z0-9_.-]{1,32}$")]


class FrameRejected(ValueError):
    """A chat frame over a limit: the socket is closed with ``code`` and ``reason``."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason


def parse_frame(data: str | bytes) -> Any:
    """The frame's JSON, parsed only once its size and nesting are known to be bounded.

    Raises:
        FrameRejected: over ``MAX_FRAME`` bytes or ``MAX_DEPTH`` levels (1009), not UTF-8 (1007).
        ValueError: not JSON.
    """
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else data
    if len(raw) > MAX_FRAME:
        raise FrameRejected(1009, f"frame is {len(raw)} bytes; limit {MAX_FRAME}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise FrameRejected(1007, "frame is not UTF-8") from None
    if _depth(text) > MAX_DEPTH:
        raise FrameRejected(1009, f"JSON nested deeper than {MAX_DEPTH} levels")
    return json.loads(text)


def _depth(text: str) -> int:
    """Deepest ``[``/``{`` nesting outside strings (stops counting past ``MAX_DEPTH``)."""
    depth = deepest = 0
    in_string = escaped = False
    for ch in text:
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DEPTH:
                break
        elif ch in "]}":
            depth -= 1
    return deepest


async def _roster(store: Store, rooms: WSRouter) -> list[tuple[str, dict[str, Any]]]:
    """The roster, without (and dropping) the rows of workers that are gone."""
    rows = [(str(key), row) async for key, row in store.iterate(ROSTER)]
    alive: dict[str, bool] = {}
    live = []
    for key, row in rows:
        worker = row["worker"]
        if worker not in alive:
            alive[worker] = await rooms.worker_alive(worker)
        if alive[worker]:
            live.append((key, row))
        else:
            await store.delete(ROSTER, key)
    return live


def install(zeal: Zeal, rooms: WSRouter) -> None:
    """Drop a client's roster row when the router reports it left (its worker reaped it)."""
    store = zeal.store

    async def on_presence(event: str, room: str, client_id: str) -> None:
        if event == "leave":
            await store.delete(ROSTER, client_id)

    rooms.on_presence(on_presence)


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
            doc = parse_frame(data)
        except FrameRejected as exc:
            await websocket.close(code=exc.code, reason=exc.reason)
            return
        except ValueError:
            doc = None
        if not isinstance(doc, dict):
            await say({"type": "error", "error": "messages are JSON objects"})
            return
        if doc.get("type") == "join":
            if not joined:
                if not await _join(rooms, store, room, client_id, name):
                    await say({"type": "error", "error": f"the chat is full ({ROSTER_ROWS})"})
                    return
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


async def _join(rooms: WSRouter, store: Store, room: str, client_id: str, name: str) -> bool:
    """Roster row, then room membership; ``False`` (nothing kept) when either is full."""
    row = {"room": room, "name": name, "pid": os.getpid(), "since": time.time()}
    row["worker"] = rooms.worker
    try:
        await store.set(ROSTER, client_id, row)
    except TableFullError:
        return False
    try:
        await rooms.join(room, client_id)
    except (CapacityError, TableFullError):
        await store.delete(ROSTER, client_id)
        return False
    return True


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
    names = sorted(key for key, row in await _roster(store, rooms) if row["room"] == room)
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
async def online(store: StoreDep, rooms: WSRouterDep) -> RoomOnline:
    """Chat clients connected to the app, per worker (pid)."""
    by_worker: dict[str, int] = {}
    roster = await _roster(store, rooms)
    for _, row in roster:
        by_worker[str(row["pid"])] = by_worker.get(str(row["pid"]), 0) + 1
    return RoomOnline(total=len(roster), by_worker=by_worker)


@router.get("/state", response_model=RoomState)
async def state(store: StoreDep, rooms: WSRouterDep) -> RoomState:
    """The chat clients whose socket this worker holds."""
    mine = sorted(key for key, row in await _roster(store, rooms) if row["worker"] == rooms.worker)
    return RoomState(worker_pid=os.getpid(), local_clients=mine)
