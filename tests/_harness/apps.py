"""An ASGI app under a real server program: the one launcher of the tests and of ``bench/``.

``AppServer(app, server=..., workers=...)`` runs ``app`` under one of :data:`SERVER_MODELS` on a
free 127.0.0.1 port, in its own session and temp dir (its working directory, holding its log),
with the ``ZEAL_*`` variables of this process removed and ``env`` added. It is ready once each
of its ``workers`` workers is: when the ``ready`` route names the worker that answers (a JSON
``pid``), once that many workers of its own answered it; otherwise once the route answers and
the log shows that many completed startups. ``stop()`` sends SIGTERM to the master only (it stops
its workers and unlinks the server's shared memory), SIGKILLs the group after a timeout and then
kills any worker its master left behind.

``CommandServer(argv, ready=..., env=..., cwd=...)`` runs a given command instead (the one a
document or the Dockerfile shows), with :data:`PORT` in it replaced by the port picked. Handles of
both kinds register with the same safety nets as the backing servers.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from tests._harness.servers import HOST, Server, start_all, stop_all

__all__ = [
    "PORT",
    "REPO",
    "SERVER_MODELS",
    "AppServer",
    "AppServers",
    "CommandServer",
    "http_get",
    "wait_gone",
]

REPO = Path(__file__).resolve().parents[2]
"""The repository root: on the servers' ``PYTHONPATH``, so ``tests.*`` and ``bench.*`` import."""

SERVER_MODELS = ("uvicorn", "uvicorn-workers", "gunicorn", "gunicorn-preload", "launcher")
"""``uvicorn`` (one process), ``uvicorn --workers N`` (spawned workers), gunicorn with uvicorn
workers (forked; ``gunicorn-preload``: the app is imported before the fork) and
``zeal-asgi run --workers N``."""

STARTED = "Application startup complete"
"""What uvicorn logs (level info) once a worker's lifespan startup has run."""

PORT = "{port}"
"""Stands for the port in a :class:`CommandServer`'s argv and environment values."""

_STARTING = 503
"""The status of a route that answers before the app is ready (e.g. ``/health/store``)."""


def _command(server: str, app: str, port: int, workers: int) -> list[str]:
    # Level info, access logs off: a few lines per worker, among them STARTED.
    bind = ["--host", HOST, "--port", str(port)]
    if server in ("uvicorn", "uvicorn-workers"):
        argv = [sys.executable, "-m", "uvicorn", app, *bind, "--log-level", "info"]
        return [*argv, "--no-access-log"] + (["--workers", str(workers)] if workers > 1 else [])
    if server in ("gunicorn", "gunicorn-preload"):
        argv = [sys.executable, "-m", "gunicorn", "-k", "uvicorn_worker.UvicornWorker"]
        argv += ["-w", str(workers), "-b", f"{HOST}:{port}", "--graceful-timeout", "5"]
        argv += ["--log-level", "info"]
        return [*argv, "--preload", app] if server == "gunicorn-preload" else [*argv, app]
    if server == "launcher":
        argv = [sys.executable, "-m", "zeal_asgi", "run", app, "--workers", str(workers)]
        return [*argv, *bind, "--log-level", "info"]
    raise ValueError(f"unknown server model {server!r}; one of {SERVER_MODELS}")


def http_get(url: str, timeout: float = 5.0) -> tuple[int, Any]:
    """GET ``url`` on a new connection; (status, decoded JSON or text): any status is returned,
    ``OSError`` when nothing answers."""
    req = urllib.request.Request(url, headers={"Accept": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, body, ctype = resp.status, resp.read(), resp.headers.get("content-type", "")
    except urllib.error.HTTPError as exc:
        status, body, ctype = exc.code, exc.read(), exc.headers.get("content-type", "")
        exc.close()
    text = body.decode("utf-8", "replace")
    return status, json.loads(text) if "json" in ctype else text


def _parent_of(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[1])


class _HttpServer(Server):
    """A server spoken to over HTTP on its loopback port."""

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``."""
        return f"http://{self.host}:{self.port}"

    @property
    def ws_url(self) -> str:
        """``ws://127.0.0.1:PORT``."""
        return f"ws://{self.host}:{self.port}"

    def fetch(self, path: str, timeout: float = 5.0) -> tuple[int, Any]:
        """GET ``path``; (status, decoded JSON or text): any status is returned, not raised."""
        return http_get(self.url + path, timeout)


class AppServer(_HttpServer):
    """``app`` (``module:attribute``) under the server program ``server``, with ``workers``
    workers (``uvicorn`` has one), ready (see the module docstring) once the ``ready`` route
    answered and ``ready_when`` holds for the reply. ``worker_pids`` holds the workers that
    answered ``ready`` during startup, ``children()`` the workers alive now."""

    kind = "app"
    startup_timeout = 60.0
    stop_timeout = 20.0
    poll_interval = 0.05

    def __init__(
        self,
        app: str,
        *,
        server: str = "launcher",
        workers: int = 2,
        env: dict[str, str] | None = None,
        ready: str = "/pid",
        ready_when: Callable[[Any], bool] = lambda reply: True,
    ) -> None:
        if server not in SERVER_MODELS:
            raise ValueError(f"unknown server model {server!r}; one of {SERVER_MODELS}")
        super().__init__()
        self.app = app
        self.server = server
        self.workers = 1 if server == "uvicorn" else workers
        self.extra_env = dict(env or {})
        self.ready = ready
        self.ready_when = ready_when
        self.kind = f"app-{server}"
        self.worker_pids: set[int] = set()

    def _argv(self, port: int) -> list[str]:
        self.worker_pids = set()
        return _command(self.server, self.app, port, self.workers)

    def _env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")} | self.extra_env
        paths = [str(REPO), self.extra_env.get("PYTHONPATH"), os.environ.get("PYTHONPATH")]
        env["PYTHONPATH"] = os.pathsep.join(filter(None, paths))
        env["PYTHONUNBUFFERED"] = "1"
        return env

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        try:
            _, reply = http_get(self.url + self.ready, timeout=2.0)
        except (OSError, http.client.HTTPException, ValueError):
            return False
        if not self.ready_when(reply):
            return False
        pid = reply.get("pid") if isinstance(reply, dict) else None
        if not isinstance(pid, int):
            return self.log_since_launch().count(STARTED) >= self.workers
        # Only workers of this process count: until it fails to bind, another server that
        # holds the port (say, from a parallel test run) could answer.
        if proc.pid in (pid, _parent_of(pid)):
            self.worker_pids.add(pid)
        return len(self.worker_pids) >= self.workers

    def _signal_stop(self, proc: subprocess.Popen[bytes]) -> None:
        # The master alone: it stops its workers in order and cleans up after them.
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)

    def _after_exit(self, proc: subprocess.Popen[bytes]) -> None:
        # Workers of a master that was killed (or that exited on its own) must not outlive it;
        # the group id stays reserved while any of them lives.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)

    def children(self) -> list[int]:
        """Pids of the master's children: its workers as its supervisor keeps them now."""
        try:
            raw = Path(f"/proc/{self.pid}/task/{self.pid}/children").read_text()
        except OSError:
            return []
        return [int(p) for p in raw.split()]

    def get(self, path: str, *, expect: int = 200, **params: Any) -> dict[str, Any]:
        """GET ``path?params`` on a new connection (so that the kernel hands requests to every
        worker); its JSON reply, after checking the status."""
        query = f"?{urllib.parse.urlencode(params, doseq=True)}" if params else ""
        status, reply = http_get(self.url + path + query, timeout=10.0)
        assert status == expect, (path, status, reply)
        out: dict[str, Any] = reply
        return out

    def get_from(
        self,
        path: str,
        *,
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
        raise AssertionError(f"no answer from the wanted worker (pid={pid}, avoid={avoid})")

    def on_each_worker(self, path: str, expect: int = 200) -> dict[int, dict[str, Any]]:
        """GET ``path`` until every worker has answered it once; the replies by pid."""
        out: dict[int, dict[str, Any]] = {}
        for _ in range(400):
            r = self.get(path, expect=expect)
            out.setdefault(r["pid"], r)
            if len(out) >= self.workers:
                return out
        raise AssertionError(f"{path}: only workers {sorted(out)} answered")


class CommandServer(_HttpServer):
    """A server started by the command ``argv``, run as given: :data:`PORT` in ``argv`` and in
    the values of ``env`` is replaced by the port picked, ``env`` is its whole environment and
    ``cwd`` its working directory (its log is in its temp dir all the same).

    It is ready once ``ready`` answers with any status but 503 (still starting); that status is
    kept in ``ready_status``. ``stop()`` sends SIGTERM to the whole process group, since the
    command may be a shell that passes no signal on, SIGKILLs it after ``stop_timeout``, and
    then waits for the rest of the group (workers) to end.
    """

    kind = "command"
    startup_timeout = 90.0
    stop_timeout = 20.0
    poll_interval = 0.1

    def __init__(
        self, argv: Sequence[str], *, ready: str, env: Mapping[str, str], cwd: Path
    ) -> None:
        super().__init__()
        self.argv = list(argv)
        self.env = dict(env)
        self.cwd = cwd
        self.ready = ready
        self.ready_status: int | None = None

    def _argv(self, port: int) -> list[str]:
        self.ready_status = None
        return [arg.replace(PORT, str(port)) for arg in self.argv]

    def _env(self) -> dict[str, str]:
        return {name: value.replace(PORT, str(self.port)) for name, value in self.env.items()}

    def _cwd(self) -> Path:
        return self.cwd

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        # The answer is not matched to ``proc`` (a command need not report its pid): a server
        # already on the port could answer in the moment before the command fails to bind and
        # exits, after which the command is started again on another port.
        try:
            status, _ = http_get(self.url + self.ready, timeout=2.0)
        except (OSError, http.client.HTTPException, ValueError):
            return False
        self.ready_status = status
        return status != _STARTING

    def _after_exit(self, proc: subprocess.Popen[bytes]) -> None:
        # The SIGTERM reached every process of the group: workers may still be unlinking their
        # shared memory after the command's own process exited, so they get time before SIGKILL.
        deadline = time.monotonic() + self.stop_timeout
        while time.monotonic() < deadline:
            try:
                os.killpg(proc.pid, 0)
            except (ProcessLookupError, PermissionError):  # gone (its id may be another's now)
                return
            time.sleep(self.poll_interval)
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)


class AppServers:
    """The app servers of one test (the ``app_servers`` fixture), every one stopped when the
    test ends."""

    def __init__(self) -> None:
        self.started: list[AppServer] = []

    def start(self, app: str, **options: Any) -> AppServer:
        """A started server of ``app`` (options as for :class:`AppServer`)."""
        return self.start_all([AppServer(app, **options)])[0]

    def start_all(self, servers: Iterable[AppServer]) -> list[AppServer]:
        """``servers`` launched together, then each waited for."""
        servers = list(servers)
        self.started += servers
        return start_all(servers)

    def stop(self) -> None:
        """Stop every server started so far."""
        stop_all(self.started)


def wait_gone(paths: list[str], timeout: float = 5.0) -> list[str]:
    """Paths still present after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    left = [p for p in paths if os.path.exists(p)]
    while left and time.monotonic() < deadline:
        time.sleep(0.05)
        left = [p for p in left if os.path.exists(p)]
    return left
