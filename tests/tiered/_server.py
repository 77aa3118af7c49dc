"""A real ASGI server (uvicorn, N workers) running ``tests.tiered.apps.kv_app`` on loopback."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Self

import httpx

from tests.servers import free_port

REPO = Path(__file__).resolve().parents[2]
APP = "tests.tiered.apps.kv_app:app"


class Node:
    """``uvicorn APP --workers N`` in its own process group, with its log in a temp file."""

    def __init__(self, env: dict[str, str], workers: int = 2, app: str = APP) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.workers = workers
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open for the server's life
            prefix="zeal-tiered-node-", suffix=".log", delete=False
        )
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
        full_env.update(PYTHONPATH=str(REPO), **env)
        cmd = [sys.executable, "-m", "uvicorn", app, "--host", "127.0.0.1"]
        cmd += ["--port", str(self.port), "--workers", str(workers), "--log-level", "warning"]
        self.proc = subprocess.Popen(
            cmd,
            cwd=REPO,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.Client(
            base_url=self.url, timeout=10.0, limits=httpx.Limits(max_keepalive_connections=0)
        )
        self.pids: set[int] = set()

    def log_text(self) -> str:
        """What the server printed so far."""
        return Path(self.log.name).read_text(errors="replace")

    def get(self, path: str, expect: int = 200) -> dict[str, Any]:
        """GET on a fresh connection (requests spread over the workers)."""
        r = self.client.get(path)
        assert r.status_code == expect, (path, r.status_code, r.text)
        out: dict[str, Any] = r.json()
        return out

    def wait_ready(self, timeout: float = 40.0) -> None:
        """Until every worker has answered once."""
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

    def on_each_worker(self, path: str, expect: int = 200) -> dict[int, dict[str, Any]]:
        """GET ``path`` until every worker has answered it once; answers by pid."""
        out: dict[int, dict[str, Any]] = {}
        for _ in range(400):
            r = self.get(path, expect)
            out.setdefault(r["pid"], r)
            if len(out) >= self.workers:
                return out
        raise AssertionError(f"{path}: only workers {sorted(out)} answered")

    def stop(self) -> None:
        """SIGTERM (a clean shutdown unlinks the shared memory), SIGKILL if it hangs."""
        self.client.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # workers orphaned by a dead master
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None and Path(self.log.name).exists():
            print(f"--- server log ({self.url}) ---\n{self.log_text()}")
        self.stop()
