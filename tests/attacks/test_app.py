"""Regression tests of the app layer for issue 12's defects (launcher, boot, settings, errors)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi import FastAPI, WebSocket
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests._harness.apps import AppServer
from tests._harness.servers import HOST, RedisServer, free_port
from tests.app.conftest import ROOT, example_app_server
from zeal_asgi import Store, Zeal, ZealError, ZealMiddleware, ZealSettings
from zeal_asgi.errors import ConfigError, UnknownTableError
from zeal_asgi.middleware import zeal_error_handler

DEGRADED_APP = """
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    import zeal_asgi.health
    from zeal_asgi import Store, Zeal, ZealError, ZealMiddleware
    from zeal_asgi.middleware import zeal_error_handler

    zeal = Zeal()
    Store.make("kv", 64, {"v": (Store.TYPE_INT, 8)})


    async def read(request):
        return JSONResponse({"row": await Store.get_strict("kv", "k")})


    async def write(request):
        await Store.set("kv", "k", {"v": 1})
        return JSONResponse({"ok": True})


    app = Starlette(
        routes=[*zeal_asgi.health.starlette_routes(), Route("/read", read), Route("/write", write)],
        exception_handlers={ZealError: zeal_error_handler},
    )
    app.add_middleware(ZealMiddleware, zeal=zeal)
"""


def _state(pid: int) -> str:
    """The process state letter of ``pid`` (``T`` when stopped), ``-`` when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return "-"
    return raw[raw.rindex(")") + 2]


@contextlib.contextmanager
def _stopped(pid: int) -> Iterator[None]:
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)


def _both_workers_answer(server: AppServer, deadline: float) -> set[int]:
    pids: set[int] = set()
    while len(pids) < 2 and time.monotonic() < deadline:
        status, body = server.fetch("/health/live", timeout=2.0)
        assert status == 200
        pids.add(body["pid"])
    return pids


def test_a_stopped_worker_is_not_killed_within_the_configured_healthcheck_timeout() -> None:
    """Issue 12 item 8: a SIGSTOPped worker (a lock holder) was SIGKILLed after ~5 s; the
    timeout is now ``--timeout-worker-healthcheck`` / ZEAL_TIMEOUT_WORKER_HEALTHCHECK."""
    env = {"ZEAL_TIMEOUT_WORKER_HEALTHCHECK": "60"}
    with example_app_server(env) as server:
        victim = min(_both_workers_answer(server, time.monotonic() + 20))
        with _stopped(victim):
            time.sleep(9)  # well past uvicorn's 5 s default and several supervisor rounds
            assert victim in server.children() and _state(victim) == "T"
        # resumed, it serves again: the same process, nothing was replaced
        pids = _both_workers_answer(server, time.monotonic() + 20)
        assert victim in pids and len(pids) == 2


def test_a_stopped_worker_is_killed_and_replaced_after_the_healthcheck_timeout() -> None:
    """Issue 12 item 8, the documented other half: past the timeout the supervisor SIGKILLs the
    worker and starts a new one; the server keeps answering on two workers."""
    with example_app_server({"ZEAL_TIMEOUT_WORKER_HEALTHCHECK": "1"}) as server:
        victim = min(_both_workers_answer(server, time.monotonic() + 20))
        with _stopped(victim):
            deadline = time.monotonic() + 30
            while victim in server.children() and time.monotonic() < deadline:
                time.sleep(0.2)
            assert victim not in server.children(), "the stopped worker was never replaced"
        pids = _both_workers_answer(server, time.monotonic() + 30)
        assert len(pids) == 2 and victim not in pids


@pytest.fixture
def degraded_app(tmp_path: Path) -> Path:
    (tmp_path / "degraded_app.py").write_text(textwrap.dedent(DEGRADED_APP))
    return tmp_path


def test_redis_down_at_boot_with_the_breaker_boots_degraded(degraded_app: Path) -> None:
    """Issue 12 item 10: with ZEAL_ON_ERROR=fallback_table the app starts while Redis is down;
    health says 503 with the reason, reads come from the fallback, writes answer a typed 503."""
    env = {
        "PYTHONPATH": str(degraded_app),
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": f"redis://{HOST}:{free_port()}",
        "ZEAL_ON_ERROR": "fallback_table",
    }
    with AppServer("degraded_app:app", env=env, ready="/health/store") as server:
        status, body = server.fetch("/health/store")
        assert status == 503 and body["status"] == "unavailable", body
        assert server.fetch("/health/ready")[0] == 503
        assert server.fetch("/health/live")[0] == 200
        status, read = server.fetch("/read")
        assert status == 200 and read["row"] is None  # served by the fallback table
        status, write = server.fetch("/write")
        assert status == 503 and write["error"] == "BackendUnavailableError", write


def test_redis_down_at_boot_without_the_breaker_is_one_line_naming_the_url() -> None:
    """Issue 12 item 10: without the breaker the boot fails in the master, before any worker,
    in one line that names ZEAL_REDIS_URL (and the breaker that would boot degraded)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    env.update(
        PYTHONPATH=str(ROOT),
        ZEAL_STORE_BACKEND="redis",
        ZEAL_REDIS_URL=f"redis://{HOST}:{free_port()}",
    )
    argv = ["run", "tests.core.apps.shared_app:app", "--workers", "2", "--port", str(free_port())]
    proc = subprocess.run(
        [sys.executable, "-m", "zeal_asgi", *argv],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr and "Started server process" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zeal-asgi: ") and "ZEAL_REDIS_URL" in last, proc.stderr


def test_settings_refuse_a_url_that_is_not_redis() -> None:
    """Issue 12 item 14: ``ZealSettings(redis_url="http://x")`` validated; only Zeal() failed."""
    with pytest.raises(ConfigError, match=r"redis_url \(ZEAL_REDIS_URL\).*got http://") as err:
        ZealSettings(redis_url="http://user:hunter2@x")
    assert "hunter2" not in str(err.value)
    with pytest.raises(ConfigError, match="ZEAL_REDIS_URL"):
        ZealSettings.from_env({"ZEAL_REDIS_URL": "localhost:6379"})
    assert ZealSettings(redis_url="rediss://x:6380/1").redis_url == "rediss://x:6380/1"
    # the seed's tls:// (TLS, like rediss://) is accepted from the environment as by Store()
    tls = ZealSettings.from_env({"ZEAL_REDIS_URL": "tls://x:6380/1"})
    assert tls.redis_url == "tls://x:6380/1"


@pytest.mark.redis
def test_zeal_errors_answer_typed_json(fresh_redis: RedisServer) -> None:
    """Issue 12 item 15: a backend outage answered a bare 500; with ``zeal_error_handler`` it is
    a typed 503 (Retry-After), other ZealErrors a typed 500, a WebSocket is closed with 1013."""
    store = Store("redis", {"url": fresh_redis.url, "prefix": f"e{os.getpid()}"})
    store.make("kv", 16, {"v": (Store.TYPE_INT, 8)})
    zeal = Zeal(store=store)
    app = FastAPI(lifespan=zeal.lifespan)
    app.add_middleware(ZealMiddleware, zeal=zeal)
    app.add_exception_handler(ZealError, zeal_error_handler)

    @app.get("/row")
    async def row() -> object:
        return await store.get("kv", "k")

    @app.get("/unknown")
    async def unknown() -> object:
        return await store.get("no_such_table", "k")

    @app.websocket("/ws")
    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        await websocket.send_json(await store.get("kv", "k"))

    with TestClient(app, raise_server_exceptions=False) as client:
        assert client.get("/row").status_code == 200
        bad = client.get("/unknown")
        assert bad.status_code == 500
        assert bad.json() == {"error": UnknownTableError.__name__, "detail": "internal error"}
        fresh_redis.kill()
        down = client.get("/row")
        with client.websocket_connect("/ws") as conn, pytest.raises(WebSocketDisconnect) as closed:
            conn.receive_json()
        fresh_redis.start()
    assert down.status_code == 503 and down.headers["retry-after"] == "1"
    assert down.json()["error"] == "BackendUnavailableError"
    assert fresh_redis.url not in down.text  # where the backend lives stays in the log
    assert closed.value.code == 1013
