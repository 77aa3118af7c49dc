"""Test app for pub/sub and WebSocket routing across workers and nodes (real servers)."""

from __future__ import annotations

import asyncio
import json
import os

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route, WebSocketRoute
from starlette.websockets import WebSocket, WebSocketDisconnect

from zeal_asgi import Store, Zeal
from zeal_asgi.ws import WSRouter

zeal = Zeal()
received: list[str] = []


async def on_news(payload: str, channel: str) -> None:
    received.append(payload)


zeal.subscribe("news", on_news)


router = WSRouter(
    zeal,
    secret=os.environ.get("MSG_WS_SECRET") or None,
    worker_ttl=float(os.environ.get("MSG_WORKER_TTL", "30")),
)


async def pid(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid()})


async def publish(request: Request) -> JSONResponse:
    q = request.query_params
    n = await Store.publish(q["channel"], q["payload"])
    return JSONResponse({"receivers": n, "pid": os.getpid()})


async def log(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "received": received})


async def send(request: Request) -> JSONResponse:
    q = request.query_params
    ok = await router.send_to_client(q["client"], q["msg"], conn_id=q.get("conn"))
    return JSONResponse({"ok": ok, "pid": os.getpid()})


async def broadcast(request: Request) -> JSONResponse:
    q = request.query_params
    n = await router.broadcast(q["room"], q["msg"])
    return JSONResponse({"receivers": n, "pid": os.getpid()})


async def rooms(request: Request) -> JSONResponse:
    servers = await router.room_servers(request.query_params["room"])
    return JSONResponse({"servers": servers, "pid": os.getpid()})


async def stats(request: Request) -> JSONResponse:
    return JSONResponse({"pid": os.getpid(), "stats": Store.stats()})


async def ws(websocket: WebSocket) -> None:
    client = websocket.path_params["client"]
    await websocket.accept()
    conn_id = router.own(client, websocket)
    room = websocket.query_params.get("room")
    if room:
        await router.join(room, client)
    # The hello comes last: a client that has it is registered and in its room.
    hello = {"hello": conn_id, "pid": os.getpid(), "worker": router.worker}
    await router.send_to_client(client, json.dumps(hello), conn_id=conn_id)
    try:
        while True:
            text = await websocket.receive_text()
            if text == "bye":
                break
            await command(text)
    except WebSocketDisconnect:
        pass
    finally:
        await router.release(client, conn_id)


async def command(text: str) -> None:
    """``send CLIENT CONN MSG``: one targeted send; ``flood CLIENT CONN TAG N``: N of them."""
    parts = text.split(" ")
    if parts[0] == "send":
        await router.send_to_client(parts[1], parts[3], conn_id=parts[2])
    elif parts[0] == "flood":
        tasks.add(asyncio.get_running_loop().create_task(flood(*parts[1:])))


async def flood(client: str, conn: str, tag: str, n: str) -> None:
    try:
        for i in range(int(n)):
            await router.send_to_client(client, f"{tag}.{i}", conn_id=conn)
            await asyncio.sleep(0)
    finally:
        me = asyncio.current_task()
        if me is not None:
            tasks.discard(me)


tasks: set[asyncio.Task[None]] = set()


async def chat(websocket: WebSocket) -> None:
    """The recommended shape: ``router.serve`` with a room; every message goes to the room."""
    client = websocket.path_params["client"]

    async def on_message(data: str | bytes) -> None:
        await router.broadcast("chat", f"{client}: {data!s}")

    await router.serve(client, websocket, on_message, rooms=["chat"])


app = Starlette(
    routes=[
        Route("/pid", pid),
        Route("/publish", publish),
        Route("/log", log),
        Route("/send", send),
        Route("/broadcast", broadcast),
        Route("/rooms", rooms),
        Route("/stats", stats),
        WebSocketRoute("/ws/{client}", ws),
        WebSocketRoute("/chat/{client}", chat),
    ],
    lifespan=zeal.lifespan,
)
