"""Fixtures of the messaging tests: real ASGI servers (the zeal-asgi launcher) on loopback, and
the WebSocket registry on each of its stores."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.messaging.helpers import redis_link
from tests.servers import free_port
from zeal_asgi.messaging.ws.rooms import RedisRegistry, Registry, ShmRegistry
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.store import Store

REPO = Path(__file__).resolve().parents[2]
MSG_APP = "tests.messaging.apps.msg_app:app"


class AppServer:
    """``zeal-asgi run APP --workers N`` in its own process group, with its log."""

    def __init__(
        self,
        app: str = MSG_APP,
        workers: int = 2,
        env: dict[str, str] | None = None,
        kind: str = "launcher",
    ):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.ws_url = f"ws://127.0.0.1:{self.port}"
        self.workers = workers
        self._log = tempfile.NamedTemporaryFile(prefix="zeal-msg-", suffix=".log", delete=False)  # noqa: SIM115
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
        full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env or {})
        bind = ["--host", "127.0.0.1", "--port", str(self.port)]
        if kind == "launcher":  # imports the app in the master, then spawns the workers
            cmd = [sys.executable, "-m", "zeal_asgi", "run", app, "--workers", str(workers)]
            cmd += [*bind, "--log-level", "warning"]
        elif kind == "uvicorn":  # spawned workers; the master never imports the app
            cmd = [sys.executable, "-m", "uvicorn", app, *bind, "--workers", str(workers)]
            cmd += ["--log-level", "warning"]
        elif kind in ("gunicorn", "gunicorn-preload"):  # forked workers
            cmd = [sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker"]
            cmd += ["-w", str(workers), "-b", f"127.0.0.1:{self.port}", "--graceful-timeout", "5"]
            cmd += ["--preload", app] if kind == "gunicorn-preload" else [app]
        else:
            raise ValueError(kind)
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=full_env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(
            base_url=self.url, timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.pids: set[int] = set()

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        """GET on a fresh connection (so requests spread over the workers)."""
        r = self.client.get(path, params=params)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def wait_ready(self, timeout: float = 30.0) -> None:
        """Until every worker has answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited early:\n{self.log_text()}")
            try:
                self.pids.add(self.get("/pid")["pid"])
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            if len(self.pids) >= self.workers:
                return
        raise AssertionError(f"only workers {self.pids} answered:\n{self.log_text()}")

    def get_from(
        self, path: str, *, pid: int | None = None, avoid: int | None = None, **params: Any
    ) -> dict[str, Any]:
        """GET until served by worker ``pid`` (or any worker but ``avoid``)."""
        for _ in range(400):
            out = self.get(path, **params)
            if (pid is None or out["pid"] == pid) and (avoid is None or out["pid"] != avoid):
                return out
        raise AssertionError(f"no answer from the wanted worker (pid={pid}, avoid={avoid})")

    def log_text(self) -> str:
        """Everything the server printed so far."""
        return Path(self._log.name).read_text(errors="replace")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL the group if it lingers; remove the log."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.proc.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.wait(10)
        self._log.close()
        Path(self._log.name).unlink(missing_ok=True)


@contextlib.contextmanager
def app_servers(count: int, **kw: Any) -> Iterator[list[AppServer]]:
    """Start ``count`` servers at once, wait for all, stop all."""
    servers = [AppServer(**kw) for _ in range(count)]
    try:
        for s in servers:
            s.wait_ready()
        yield servers
    finally:
        for s in servers:
            s.stop()


@pytest.fixture
def host_bus_cleanup() -> Iterator[None]:
    """Unlink this process's host bus after the test."""
    yield
    close_host_bus()


@pytest.fixture(params=["table", "redis"])
async def registry(request: pytest.FixtureRequest) -> AsyncIterator[Registry]:
    """A WebSocket registry on shared memory, then on a real Redis."""
    if request.param == "table":
        reg = ShmRegistry(owner_capacity=64, room_capacity=64)
        yield reg
        reg.close()
        return
    url = request.getfixturevalue("redis_url")
    store = Store("redis", {"url": url})
    await store.start()
    yield RedisRegistry(redis_link(store))
    await store.aclose()
