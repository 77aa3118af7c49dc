"""The example app's chat and error answers under abuse: deep JSON, a full roster, a killed
worker, a backend outage. Each answers (a close code, a message, a typed 503) instead of
dropping the socket or answering a bare 500."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
from starlette.testclient import TestClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import ClientConnection, connect

from example_app import main
from example_app.rooms import MAX_DEPTH, MAX_FRAME, ROSTER, ROSTER_ROWS
from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer
from tests.app.conftest import example_app_server


def _ws(server: AppServer, query: str) -> ClientConnection:
    return connect(server.url.replace("http://", "ws://") + f"/ws/chat?{query}", open_timeout=5)


def _next(ws: ClientConnection, kind: str, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        doc: dict[str, Any] = json.loads(ws.recv(timeout=left))
        if doc.get("type") == kind:
            return doc
    raise AssertionError(f"no {kind} message within {timeout} s")


def _closed_with(ws: ClientConnection, timeout: float = 5.0) -> tuple[int, str]:
    deadline = time.monotonic() + timeout
    with contextlib.suppress(ConnectionClosed):
        while (left := deadline - time.monotonic()) > 0:
            ws.recv(timeout=left)
    assert ws.close_code is not None, "the socket was not closed"
    return ws.close_code, ws.close_reason or ""


@pytest.mark.servers
@pytest.mark.parametrize(
    "frame",
    [
        pytest.param("[" * 100_000 + "]" * 100_000, id="100k-deep-array"),
        pytest.param('{"a":' * (MAX_DEPTH + 1) + "1" + "}" * (MAX_DEPTH + 1), id="just-too-deep"),
        pytest.param(json.dumps({"text": "x" * (MAX_FRAME + 1)}), id="too-big"),
    ],
)
def test_an_oversized_frame_closes_with_1009(example_server: AppServer, frame: str) -> None:
    with _ws(example_server, "room=abuse&name=deep") as ws:
        ws.send(json.dumps({"type": "join"}))
        _next(ws, "welcome")
        ws.send(frame)
        code, reason = _closed_with(ws)
    assert code == 1009, (code, reason)
    assert "limit" in reason or "deeper" in reason
    # The worker that held the socket is fine: the app still answers and chats.
    assert example_server.fetch("/health/store")[0] == 200
    with _ws(example_server, "room=abuse&name=after") as ws:
        ws.send(json.dumps({"type": "join"}))
        _next(ws, "welcome")


@pytest.mark.servers
def test_deep_json_inside_a_string_is_just_text(example_server: AppServer) -> None:
    text = "[" * 400  # brackets in a string are not nesting
    with _ws(example_server, "room=brackets&name=b") as ws:
        ws.send(json.dumps({"type": "join"}))
        _next(ws, "welcome")
        ws.send(json.dumps({"text": text}))
        assert _next(ws, "message")["text"] == text


@pytest.fixture
def app_client() -> Iterator[TestClient]:
    with TestClient(main.app) as client:
        yield client


def test_join_past_the_roster_capacity_answers_and_keeps_the_socket(
    app_client: TestClient,
) -> None:
    store = main.zeal.store
    fillers = [f"filler-{i}" for i in range(ROSTER_ROWS)]
    row = {"room": "full", "name": "f", "pid": os.getpid(), "worker": main.router.worker}
    table = store.table(ROSTER)
    try:
        for key in fillers:
            if len(table) >= ROSTER_ROWS:
                break
            table.set(key, row)
        assert len(table) == ROSTER_ROWS
        with app_client.websocket_connect("/ws/chat?room=full&name=late") as ws:
            ws.send_text(json.dumps({"type": "join"}))
            error = ws.receive_json()
            assert error["type"] == "error" and str(ROSTER_ROWS) in error["error"]
            # Still connected, just not joined; once a member leaves, the join goes through.
            ws.send_text(json.dumps({"text": "hello"}))
            assert ws.receive_json() == {"type": "error", "error": 'send {"type": "join"} first'}
            table.delete(fillers[0])
            ws.send_text(json.dumps({"type": "join"}))
            assert ws.receive_json()["type"] in ("welcome", "presence")
    finally:
        for key in fillers:
            table.delete(key)


@pytest.mark.servers
def test_a_killed_workers_chat_clients_leave_the_roster() -> None:
    """SIGKILL the worker holding a chat client: the roster stops listing its pid."""
    with example_app_server() as server, contextlib.ExitStack() as clients:
        victim = 0
        for i in range(12):
            ws = clients.enter_context(_ws(server, f"room=reaped&name=c{i}"))
            ws.send(json.dumps({"type": "join"}))
            victim = _next(ws, "welcome")["worker_pid"]
            if victim in server.worker_pids:
                break
        status, online = server.fetch("/demo/rooms/online")
        assert status == 200 and online["by_worker"].get(str(victim), 0) >= 1, online
        os.kill(victim, signal.SIGKILL)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, online = server.fetch("/demo/rooms/online")
            if status == 200 and str(victim) not in online["by_worker"]:
                break
            time.sleep(0.1)
        assert str(victim) not in online["by_worker"], online
        status, members = server.fetch("/demo/rooms/members?room=reaped")
        assert status == 200 and all(m.split("-")[0] != "" for m in members["members"])


@pytest.mark.servers
@pytest.mark.redis
def test_a_backend_outage_answers_a_typed_503(fresh_redis: RedisServer) -> None:
    env = {"ZEAL_STORE_BACKEND": "redis", "ZEAL_REDIS_URL": fresh_redis.url}
    with example_app_server(env) as server:
        assert server.fetch("/demo/store/set-get")[0] == 200
        fresh_redis.stop()
        status, body = server.fetch("/demo/store/set-get", timeout=15)
        assert status == 503, body
        assert body["ok"] is False and body["backend"] == "redis"
        assert body["error_type"] in ("BackendUnavailableError", "BackendTimeoutError")
