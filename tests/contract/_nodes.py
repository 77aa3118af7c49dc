"""Server processes ("nodes") running ``apps/node_app.py``, for the multi-node tests."""

from __future__ import annotations

import asyncio
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
APP = "tests.contract.apps.node_app:app"
READY_TIMEOUT = 30.0
STOP_TIMEOUT = 15.0


def node_command(launcher: str, port: int, workers: int) -> list[str]:
    """``uvicorn`` (one worker) or the project's launcher (``workers`` workers) on ``port``."""
    bind = ["--host", "127.0.0.1", "--port", str(port)]
    if launcher == "uvicorn":
        return [sys.executable, "-m", "uvicorn", APP, *bind, "--no-access-log"]
    return [sys.executable, "-m", "zeal_asgi", "run", APP, "--workers", str(workers), *bind]


class Node:
    """One server process group, its log, and an HTTP client that opens a connection per request.

    A new connection per request lets the kernel hand requests to every worker of the node.
    """

    def __init__(self, launcher: str, env: dict[str, str], workers: int = 1) -> None:
        self.port = free_port()
        self.workers = workers
        self.log = tempfile.NamedTemporaryFile(  # noqa: SIM115 - open for the server's life
            prefix="zeal-contract-node-", suffix=".log", delete=False
        )
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
        full_env.update(env, PYTHONPATH=str(REPO))
        self.proc = subprocess.Popen(
            node_command(launcher, self.port, workers),
            cwd=REPO,
            env=full_env,
            stdout=self.log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.client = httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{self.port}",
            timeout=10.0,
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        self.pids: set[int] = set()

    async def call(self, method: str, path: str, **params: Any) -> dict[str, Any]:
        """One request; the JSON reply (HTTP errors raise)."""
        reply = await self.client.request(method, path, params=params)
        reply.raise_for_status()
        body: dict[str, Any] = reply.json()
        self.pids.add(body["pid"])
        return body

    async def wait_ready(self) -> None:
        """Wait until every worker answers (and, on tiered, trusts its L1)."""
        deadline = time.monotonic() + READY_TIMEOUT
        ready: set[int] = set()
        while len(ready) < self.workers:
            if self.proc.poll() is not None:
                raise AssertionError(f"node exited during startup:\n{self.log_text()}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(ready)} workers ready:\n{self.log_text()}")
            try:
                body = await self.call("GET", "/info")
            except httpx.HTTPError:
                await asyncio.sleep(0.05)
                continue
            if body["synced"]:
                ready.add(body["pid"])
            else:
                await asyncio.sleep(0.01)

    def log_text(self) -> str:
        """Everything the node printed so far."""
        return Path(self.log.name).read_text(errors="replace")

    async def stop(self) -> str:
        """Graceful stop (SIGTERM to the master); SIGKILL the group if it hangs. The log."""
        await self.client.aclose()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(self.proc.wait, STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self._kill_group()
        return await asyncio.to_thread(self._drop_log)

    def _drop_log(self) -> str:
        text = self.log_text()
        self.log.close()
        Path(self.log.name).unlink(missing_ok=True)
        return text

    def _kill_group(self) -> None:
        # Only while the leader is unreaped: its pid (the group id) cannot have been reused.
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
