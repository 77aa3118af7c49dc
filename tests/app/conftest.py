"""Fixtures of the app tests: the example app served by the real launcher, and stores to test on.

:class:`AppServer` runs ``python -m zeal_asgi run example_app.main:app --workers 2`` on a free
127.0.0.1 port in its own session, waits for ``/health/store``, and on stop sends SIGTERM (the
launcher's clean shutdown unlinks the server's shared memory), then SIGKILLs the group if needed.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import pytest

from tests.servers import HOST, RedisServer, free_port
from zeal_asgi import Store, Zeal
from zeal_asgi.store.backends.table import TableBackend

ROOT = Path(__file__).resolve().parents[2]
OUTPUT = ROOT / "test-output"
SCREENSHOTS = OUTPUT / "screenshots"
STARTUP_TIMEOUT = 40.0
STOP_TIMEOUT = 15.0


class AppServerError(RuntimeError):
    """The example app did not start, or did not answer."""


def http_get(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url``; (status, decoded JSON or text).  Non-2xx statuses are returned, not raised."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body, ctype = resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("content-type", "")
        exc.close()
    text = body.decode("utf-8", "replace")
    return status, json.loads(text) if "json" in ctype else text


class AppServer:
    """The example app (or another) under ``zeal-asgi run`` with N workers."""

    def __init__(
        self,
        app: str = "example_app.main:app",
        *,
        workers: int = 2,
        env: Mapping[str, str] | None = None,
        ready_path: str = "/health/store",
    ) -> None:
        self.app = app
        self.workers = workers
        self.ready_path = ready_path
        self.extra_env = dict(env or {})
        self.port = 0
        self.process: subprocess.Popen[bytes] | None = None
        self.dir: Path | None = None
        self._log_offset = 0

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{HOST}:{self.port}"

    @property
    def log_path(self) -> Path:
        """The launcher's combined stdout/stderr."""
        assert self.dir is not None
        return self.dir / "server.log"

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server log, for failure messages."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except (OSError, AssertionError):
            return "(no log)"

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
        env.update(self.extra_env)
        env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def start(self) -> Self:
        """Start and wait until every worker is up and ``ready_path`` answers."""
        self.dir = Path(tempfile.mkdtemp(prefix="zeal-app-"))
        try:
            for _ in range(3):
                if self._launch():
                    return self
            raise AppServerError(f"no free port after 3 attempts:\n{self.log_tail()}")
        except BaseException:
            self.stop()
            raise

    def _launch(self) -> bool:
        self.port = free_port()
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        argv = [sys.executable, "-m", "zeal_asgi", "run", self.app]
        argv += ["--workers", str(self.workers), "--host", HOST, "--port", str(self.port)]
        argv += ["--log-level", "info"]
        with self.log_path.open("ab") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=self.dir,
                env=self._env(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.process = None
                if "Address already in use" in self.log_tail():
                    return False
                raise AppServerError(f"launcher exited during startup:\n{self.log_tail()}")
            with contextlib.suppress(OSError):
                status, _ = http_get(self.url + self.ready_path, timeout=1.0)
                if status in (200, 503) and self._all_workers_up():
                    return True
            time.sleep(0.05)
        raise AppServerError(f"not ready after {STARTUP_TIMEOUT} s:\n{self.log_tail()}")

    def _all_workers_up(self) -> bool:
        # uvicorn logs this once per worker, after the worker's lifespan startup ran.
        with self.log_path.open("rb") as f:
            f.seek(self._log_offset)
            started = f.read().count(b"Application startup complete")
        return started >= self.workers and self.worker_pids_alive() >= self.workers

    def worker_pids_alive(self) -> int:
        """Children of the launcher that are running."""
        if self.process is None:
            return 0
        try:
            raw = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        except OSError:
            return 0
        return len(raw.split())

    def worker_pids(self) -> list[int]:
        """Pids of the launcher's children (the workers)."""
        assert self.process is not None
        raw = Path(f"/proc/{self.process.pid}/task/{self.process.pid}/children").read_text()
        return [int(p) for p in raw.split()]

    def get(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """GET ``path`` on the server."""
        return http_get(self.url + path, timeout)

    def stop(self) -> None:
        """SIGTERM the launcher (clean shutdown), SIGKILL the group after a timeout."""
        proc, self.process = self.process, None
        if proc is not None:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGTERM)
                try:
                    proc.wait(STOP_TIMEOUT)
                except subprocess.TimeoutExpired:
                    with contextlib.suppress(ProcessLookupError):
                        os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            # Workers of a killed group must not outlive the test either.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


@pytest.fixture(scope="session")
def example_server() -> Iterator[AppServer]:
    """The example app, 2 workers, table backend, shared by the session's app tests."""
    with AppServer() as server:
        yield server


@pytest.fixture(scope="session")
def app_redis() -> Iterator[RedisServer]:
    """A redis-server for the app tests' redis-backed example server."""
    from tests.servers import require_binary

    require_binary("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture(scope="session")
def example_server_redis(app_redis: RedisServer) -> Iterator[AppServer]:
    """The example app, 2 workers, on ``ZEAL_STORE_BACKEND=redis``."""
    env = {"ZEAL_STORE_BACKEND": "redis", "ZEAL_REDIS_URL": app_redis.url}
    with AppServer(env=env) as server:
        yield server


@pytest.fixture
def table_store() -> Iterator[Store]:
    """A private table-backend Store (unique segment namespace), unmapped after the test."""
    backend = TableBackend(namespace=f"test-{uuid.uuid4().hex[:10]}")
    yield Store(backend=backend)
    backend.close_all()


@pytest.fixture
def table_zeal(table_store: Store) -> Zeal:
    """A Zeal over :func:`table_store`."""
    return Zeal(store=table_store)
