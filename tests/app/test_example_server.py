"""The example app as users run it: the launcher, 2 workers, on the table and redis backends."""

from __future__ import annotations

import contextlib
import http.client
import json
import socket
import statistics
import time
from typing import Any

import pytest
from websockets.sync.client import connect

from tests._harness.apps import AppServer
from zeal_asgi.launcher import make_socket


def _spread(
    server: AppServer,
    path: str,
    n: int,
    pids: set[int] | int | None = None,
    key: str = "worker_pid",
) -> list[dict[str, Any]]:
    """At least ``n`` GETs, each on a new connection; with ``pids`` (those workers, or that
    many), more (up to ``20 * n``) until they have all answered (``key`` of the body names the
    worker): the kernel does not deal new connections out in turn, so ten of them can all land
    on one worker."""
    out: list[dict[str, Any]] = []

    def answered() -> bool:
        seen = {b[key] for b in out}
        return pids is None or (len(seen) >= pids if isinstance(pids, int) else pids <= seen)

    while len(out) < n or (not answered() and len(out) < 20 * n):
        status, body = server.fetch(path)
        assert status == 200, body
        out.append(body)
    return out


def _check_shared_state(server: AppServer) -> None:
    bodies = _spread(server, "/demo/counter/increment", 30, 2, key="pid")
    totals = [b["total_requests"] for b in bodies]
    pids = {b["pid"] for b in bodies}
    assert len(pids) == 2, f"both workers should answer, got {pids}"
    # one counter for both workers: consecutive, no duplicates, no gaps
    assert totals == list(range(totals[0], totals[0] + len(totals)))
    status, value = server.fetch("/demo/counter")
    assert status == 200 and value["total_requests"] == totals[-1]

    # a row written by one worker is read by the other
    rows = _spread(server, "/demo/store-roundtrip", 10, pids)
    assert {r["worker_pid"] for r in rows} == pids
    assert all(r["incr"]["score"] == 50 and r["after_del"] is False for r in rows)

    # the cache computes once for the whole host; every worker serves that value
    cached = _spread(server, "/demo/cache", 10, pids)
    assert len({c["computed_by_pid"] for c in cached}) == 1
    assert {c["worker_pid"] for c in cached} == pids


def _check_pubsub(server: AppServer) -> None:
    msg = f"m-{time.time_ns()}"
    status, body = server.fetch(f"/demo/pubsub/publish?channel=demo:pubsub&msg={msg}")
    assert status == 200 and body["ok"] is True
    assert body["receivers"] == 2  # one subscriber per worker
    deadline = time.monotonic() + 5
    logged: list[dict[str, Any]] = []
    while time.monotonic() < deadline:
        _, log = server.fetch("/demo/pubsub/log")
        logged = [e for e in log["log"] if e["payload"] == msg]
        if len(logged) == 2:
            break
        time.sleep(0.05)
    assert len({e["worker_pid"] for e in logged}) == 2, logged


def _check_chat(server: AppServer, room: str) -> None:
    """Two WebSocket clients on different workers: a message from one reaches the other."""
    ws_url = server.url.replace("http://", "ws://") + f"/ws/chat?room={room}"
    with contextlib.ExitStack() as clients:
        pids: dict[int, Any] = {}
        for i in range(12):
            ws = clients.enter_context(connect(f"{ws_url}&name=c{i}", open_timeout=5))
            ws.send(json.dumps({"type": "join"}))
            welcome = _next(ws, "welcome")
            pids.setdefault(welcome["worker_pid"], ws)
            if len(pids) == 2:
                break
        assert len(pids) == 2, "every client landed on the same worker"
        a, b = pids.values()
        text = f"hi-{time.time_ns()}"
        a.send(json.dumps({"text": text}))
        got = _next(b, "message", lambda m: m["text"] == text)
        assert got["worker_pid"] != next(k for k, v in pids.items() if v is b)
        status, push = server.fetch(f"/demo/rooms/push?room={room}&msg=from-http")
        assert status == 200 and push["receivers"] == 2
        for ws in (a, b):
            _next(ws, "message", lambda m: m["text"] == "from-http")
        status, members = server.fetch(f"/demo/rooms/members?room={room}")
        assert status == 200 and len(members["servers"]) == 2


def _next(ws: Any, kind: str, pred: Any = None, timeout: float = 5.0) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        assert left > 0, f"no {kind} message within {timeout} s"
        doc: dict[str, Any] = json.loads(ws.recv(timeout=left))
        if doc.get("type") == kind and (pred is None or pred(doc)):
            return doc


@pytest.mark.servers
def test_table_backend_workers_share_everything(example_server: AppServer) -> None:
    _check_shared_state(example_server)
    _check_pubsub(example_server)
    status, body = example_server.fetch("/demo/pubsub/publish-reliable?msg=x")
    assert status == 200 and body["ok"] is False  # Streams need Redis: a clean JSON error
    _check_chat(example_server, "table-room")


@pytest.mark.servers
@pytest.mark.redis
def test_redis_backend_runs_the_same_app(example_server_redis: AppServer) -> None:
    server = example_server_redis
    status, health = server.fetch("/health/store")
    assert status == 200 and health["backend"] == "redis"
    _check_shared_state(server)
    _check_pubsub(server)
    msg = f"r-{time.time_ns()}"
    status, body = server.fetch(f"/demo/pubsub/publish-reliable?stream=demo:reliable&msg={msg}")
    assert status == 200 and body["ok"] is True and "-" in body["message_id"]
    deadline = time.monotonic() + 10
    entries: list[dict[str, Any]] = []
    while time.monotonic() < deadline and not entries:
        _, log = server.fetch("/demo/pubsub/log")
        entries = [e for e in log["log"] if e["payload"] == msg]
        time.sleep(0.05)
    # one consumer group: exactly one worker logs the entry, under its stream id
    assert len(entries) == 1 and entries[0]["pattern"] == body["message_id"]
    _check_chat(server, "redis-room")


@pytest.mark.servers
def test_keep_alive_requests_are_not_delayed_by_nagle(example_server: AppServer) -> None:
    """Sequential requests on one keep-alive connection take well under the ~40 ms a missing
    TCP_NODELAY costs on the pure-Python stack (uvicorn --workers with h11)."""
    conn = http.client.HTTPConnection("127.0.0.1", example_server.port, timeout=5)
    try:
        times = []
        for _ in range(60):
            t0 = time.perf_counter()
            conn.request("GET", "/demo/counter/increment")
            resp = conn.getresponse()
            resp.read()
            assert resp.status == 200
            times.append(time.perf_counter() - t0)
    finally:
        conn.close()
    p50 = statistics.median(times[10:]) * 1000
    print(f"keep-alive GET p50 {p50:.2f} ms over {len(times) - 10} requests")
    assert p50 < 10.0


def test_launcher_socket_sets_tcp_nodelay_on_accepted_connections() -> None:
    server = make_socket("127.0.0.1", 0)
    client = socket.create_connection(server.getsockname())
    accepted, _ = server.accept()
    try:
        assert accepted.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
    finally:
        accepted.close()
        client.close()
        server.close()


@pytest.mark.servers
def test_hit_every_worker_reaches_both_workers_from_a_keep_alive_client(
    example_server: AppServer,
) -> None:
    """A browser-like client keeps one connection: the counter route always shows one pid, the
    demo's hit route (``Connection: close``) shows both, on one shared count."""
    conn = http.client.HTTPConnection("127.0.0.1", example_server.port, timeout=5)
    try:

        def get(path: str) -> tuple[dict[str, Any], str | None]:
            conn.request("GET", path)
            resp = conn.getresponse()
            body = json.loads(resp.read())
            return body, resp.getheader("connection")

        kept = [get("/demo/counter/increment")[0] for _ in range(10)]
        assert len({b["pid"] for b in kept}) == 1
        hits = []
        for _ in range(60):
            body, connection = get("/demo/workers/hit")
            assert connection == "close"
            hits.append(body)
            if len({b["pid"] for b in hits}) == 2 and len(hits) >= 10:
                break
    finally:
        conn.close()
    assert len({b["pid"] for b in hits}) == 2, hits
    totals = [b["total_requests"] for b in hits]
    assert totals == list(range(totals[0], totals[0] + len(totals)))
