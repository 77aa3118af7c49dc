"""Start the lifecycle test app under real server programs and talk to its workers."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
APP = "tests.core.apps.shared_app:app"
BIN = Path(sys.executable).parent


def command(kind: str, port: int, app: str = APP) -> list[str]:
    """The command line of one server model."""
    bind = ["--host", "127.0.0.1", "--port", str(port)]
    if kind == "uvicorn":
        return [sys.executable, "-m", "uvicorn", app, *bind, "--no-access-log"]
    if kind == "uvicorn-workers":
        return [sys.executable, "-m", "uvicorn", app, *bind, "--workers", "2", "--no-access-log"]
    if kind in ("gunicorn", "gunicorn-preload"):
        cmd = [
            str(BIN / "gunicorn"),
            "-k",
            "uvicorn_worker.UvicornWorker",
            "-w",
            "2",
            "-b",
            f"127.0.0.1:{port}",
            "--graceful-timeout",
            "5",
            app,
        ]
        return [*cmd[:-1], "--preload", app] if kind == "gunicorn-preload" else cmd
    if kind == "launcher":
        return [sys.executable, "-m", "zeal_asgi", "run", app, "--workers", "2", *bind]
    raise ValueError(kind)


class ServerProc:
    """A server process group with its log; ``stop()`` is graceful, ``kill()`` is SIGKILL."""

    def __init__(self, kind: str, app: str = APP, env: dict[str, str] | None = None) -> None:
        self.kind = kind
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - kept open for the server's life
            prefix=f"zeal-{kind}-", suffix=".log", delete=False
        )
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
        full_env["PYTHONPATH"] = str(REPO)
        full_env.update(env or {})
        self.proc = subprocess.Popen(
            command(kind, self.port, app),
            cwd=REPO,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(
            base_url=self.url, timeout=5.0, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.worker_pids: set[int] = set()
        self._saved_log: str | None = None

    def wait_ready(self, workers: int = 1, timeout: float = 30.0) -> None:
        """Wait until ``workers`` distinct workers have answered."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"{self.kind} exited early:\n{self.log_text()}")
            try:
                self.worker_pids.add(self.get("/pid")["pid"])
            except httpx.HTTPError:
                time.sleep(0.05)
                continue
            if len(self.worker_pids) >= workers:
                return
        raise AssertionError(
            f"{self.kind}: {len(self.worker_pids)} workers seen\n{self.log_text()}"
        )

    def get(self, path: str, **params: Any) -> dict[str, Any]:
        """GET on a fresh connection (so requests spread over the workers)."""
        r = self.client.get(path, params=params)
        r.raise_for_status()
        out: dict[str, Any] = r.json()
        return out

    def get_from(
        self,
        path: str,
        pid: int | None = None,
        avoid: int | None = None,
        tries: int = 400,
        **params: Any,
    ) -> dict[str, Any]:
        """GET until served by worker ``pid`` (or by any worker but ``avoid``)."""
        for _ in range(tries):
            out = self.get(path, **params)
            if (pid is None or out["pid"] == pid) and (avoid is None or out["pid"] != avoid):
                return out
        raise AssertionError(f"no response from the wanted worker (pid={pid}, avoid={avoid})")

    def log_text(self) -> str:
        """Everything the server printed."""
        if self._saved_log is not None:
            return self._saved_log
        return Path(self.log.name).read_text(errors="replace")

    def stop(self, timeout: float = 20.0) -> int:
        """Graceful stop (SIGTERM to the master) and wait."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill_group()
        self._cleanup()
        return self.proc.returncode

    def kill_group(self) -> None:
        """SIGKILL every process of the server."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def _cleanup(self) -> None:
        self._saved_log = self.log_text()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def close(self) -> None:
        """Make sure nothing of the server is left running."""
        self.client.close()
        if self.proc.poll() is None:
            self.kill_group()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # orphaned workers of a killed master
        if not self.log.closed:
            self._cleanup()


def wait_gone(paths: list[str], timeout: float = 5.0) -> list[str]:
    """Paths still present after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    left = [p for p in paths if os.path.exists(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if os.path.exists(p)]
    return left
