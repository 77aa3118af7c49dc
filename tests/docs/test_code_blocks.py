"""Every code block of README.md and docs/ runs, and every Python block is ruff-clean.

How a block runs is set by its marker (see :mod:`tests.docs.blocks`): Python programs run in
their own interpreter; app modules are served by ``zeal-asgi run`` with two workers and
exercised over HTTP and WebSocket by the probe named in their marker; shell commands run, and
those that start a server are probed and then stopped.
"""

from __future__ import annotations

import contextlib
import json
import operator
import os
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest
from websockets.sync.client import ClientConnection, connect

from tests._harness.apps import PORT, REPO, AppServer, CommandServer
from tests.docs.blocks import Block, all_blocks

BLOCKS = all_blocks()
PY_BLOCKS = [b for b in BLOCKS if b.lang in ("python", "py")]
RUN_TIMEOUT = 120.0
DOC_PORT = "8000"
DOC_REDIS_URL = "redis://127.0.0.1:6379/0"
VENV_BIN = str(Path(sys.executable).parent)


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    env["PATH"] = VENV_BIN + os.pathsep + env.get("PATH", "")
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[2])
    env.update(extra)
    return env


def _blocks(*kinds: str) -> list[Any]:
    return [pytest.param(b, id=b.id) for b in BLOCKS if b.kind in kinds]


# -- ruff --------------------------------------------------------------------------------------


@pytest.mark.parametrize("block", [pytest.param(b, id=b.id) for b in PY_BLOCKS])
def test_python_block_is_ruff_clean(block: Block) -> None:
    config = str(Path(__file__).resolve().parents[2] / "pyproject.toml")
    for cmd in (["check"], ["format", "--diff"]):
        out = subprocess.run(
            [f"{VENV_BIN}/ruff", *cmd, "--config", config, "--stdin-filename", "block.py", "-"],
            input=block.code,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert out.returncode == 0, f"ruff {cmd[0]} on {block.id}:\n{out.stdout}{out.stderr}"


# -- Python programs ---------------------------------------------------------------------------


# Blocks that show a defect of the library, by page and a line of their code: expected to fail
# (strictly: once the defect is fixed, the entry must go).
KNOWN_DEFECTS: dict[tuple[str, str], str] = {}
KNOWN_DEFECT_TIMEOUT = 20.0


def _known_defect(block: Block) -> str | None:
    page = str(block.page.relative_to(Path(__file__).resolve().parents[2]))
    return next(
        (why for (p, line), why in KNOWN_DEFECTS.items() if p == page and line in block.code), None
    )


@pytest.mark.parametrize("block", _blocks("script"))
def test_python_program_runs(block: Block, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    defect = _known_defect(block)
    if defect is not None:
        request.applymarker(
            pytest.mark.xfail(raises=subprocess.TimeoutExpired, reason=defect, strict=True)
        )
    extra = {}
    if "redis" in block.args:
        extra["ZEAL_REDIS_URL"] = request.getfixturevalue("redis_url")
    script = tmp_path / "block.py"
    script.write_text(block.code)
    out = subprocess.run(
        [sys.executable, "-W", "error", str(script)],
        cwd=tmp_path,
        env=_env(**extra),
        capture_output=True,
        text=True,
        timeout=KNOWN_DEFECT_TIMEOUT if defect else RUN_TIMEOUT,
    )
    assert out.returncode == 0, f"{block.id} exited {out.returncode}:\n{out.stderr[-3000:]}"


# -- apps, served and probed ------------------------------------------------------------------


def _get_many(server: AppServer, path: str, n: int) -> list[dict[str, Any]]:
    """``n`` GETs, each on a fresh connection, so both workers answer some."""
    bodies = []
    for _ in range(n):
        status, body = server.fetch(path)
        assert status == 200, body
        bodies.append(body)
    return bodies


def _post(server: AppServer, path: str) -> tuple[int, Any]:
    req = urllib.request.Request(server.url + path, method="POST", data=b"")
    with urllib.request.urlopen(req, timeout=5) as resp:
        return resp.status, json.loads(resp.read())


def _ws(server: AppServer, path: str) -> ClientConnection:
    return connect(server.url.replace("http://", "ws://") + path, open_timeout=5)


def _recv_json(ws: ClientConnection, pred: Callable[[Any], bool], timeout: float) -> Any:
    deadline = time.monotonic() + timeout
    while (left := deadline - time.monotonic()) > 0:
        try:
            doc = json.loads(ws.recv(timeout=left))
        except TimeoutError:
            break
        if pred(doc):
            return doc
    raise AssertionError(f"no matching message within {timeout} s")


def _delivered(sender: ClientConnection, receiver: ClientConnection, sender_name: str) -> None:
    """``sender``'s text reaches ``receiver``. A room join completes after the socket opens, so
    the message is sent again (a fresh text each time) until one arrives."""
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        text = f"hello-{time.monotonic_ns()}"
        sender.send(text)
        with contextlib.suppress(AssertionError):
            _recv_json(receiver, partial(operator.eq, {"from": sender_name, "text": text}), 0.5)
            return
    raise AssertionError(f"no message from {sender_name} reached the other client")


def _counts_up_on_every_worker(bodies: list[dict[str, Any]], key: str) -> None:
    counts = [b[key] for b in bodies]
    assert counts == list(range(counts[0], counts[0] + len(counts))), counts
    assert len({b["pid"] for b in bodies}) == 2, "both workers should have answered"


def probe_readme(server: AppServer) -> None:
    _counts_up_on_every_worker(_get_many(server, "/", 30), "hits")


def probe_quickstart(server: AppServer) -> None:
    bodies = _get_many(server, "/demo/counter/increment", 30)
    _counts_up_on_every_worker(bodies, "total_requests")
    assert server.fetch("/demo/counter") == (200, {"total_requests": bodies[-1]["total_requests"]})
    assert server.fetch("/hits/home") == (200, {"hits": 1, "top": {"page": "home"}})
    assert server.fetch("/hits/home")[1]["hits"] == 2
    status, health = server.fetch("/health/store")
    assert status == 200 and health["status"] == "ok"
    with _ws(server, "/ws/alice") as alice, _ws(server, "/ws/bob") as bob:
        _delivered(bob, alice, "bob")
        _delivered(alice, bob, "alice")


def probe_starlette(server: AppServer) -> None:
    first = server.fetch("/")[1]["visits"]
    assert [server.fetch("/")[1]["visits"] for _ in range(4)] == list(range(first + 1, first + 5))
    assert server.fetch("/health/store")[0] == 200


def probe_websockets(server: AppServer) -> None:
    with _ws(server, "/ws/room1/alice") as alice, _ws(server, "/ws/room1/bob") as bob:
        _delivered(alice, bob, "alice")
        _delivered(bob, alice, "bob")
        assert _post(server, "/notify/bob?text=direct") == (200, {"delivered": True})
        got = _recv_json(bob, lambda m: m.get("from") == "server", 5)
        assert got == {"from": "server", "text": "direct"}
    assert _post(server, "/notify/nobody?text=x") == (200, {"delivered": False})


def probe_health(server: AppServer) -> None:
    status, body = server.fetch("/healthz")
    assert status == 200 and body["status"] == "ok" and body["backend"] == "table"
    status, text = server.fetch("/metrics")
    assert status == 200 and "zeal_up 1" in text


def probe_ratelimit(server: AppServer) -> None:
    from tests.ratelimit.conftest import away_from_minute_end

    away_from_minute_end(10)  # the 5/minute window is aligned to the clock
    codes = [server.fetch("/search?q=x")[0] for _ in range(7)]  # a new connection each
    assert codes == [200] * 5 + [429] * 2, codes
    assert all(server.fetch("/health/store")[0] == 200 for _ in range(3))  # exempt


PROBES: dict[str, tuple[Callable[[AppServer], None], str]] = {
    "readme": (probe_readme, "/openapi.json"),
    "quickstart": (probe_quickstart, "/health/store"),
    "starlette": (probe_starlette, "/health/store"),
    "websockets": (probe_websockets, "/openapi.json"),
    "health": (probe_health, "/healthz"),
    "ratelimit": (probe_ratelimit, "/health/store"),
}


def test_every_app_block_has_a_probe() -> None:
    names = [b.args[0] for b in BLOCKS if b.kind == "app"]
    assert sorted(names) == sorted(PROBES), "each app block needs exactly one probe"


@pytest.mark.servers
@pytest.mark.parametrize("block", _blocks("app"))
def test_app_block_serves(block: Block, tmp_path: Path) -> None:
    probe, ready = PROBES[block.args[0]]
    module = f"docs_app_{block.args[0]}"
    (tmp_path / f"{module}.py").write_text(block.code)
    env = {"PYTHONPATH": str(tmp_path)}
    with AppServer(f"{module}:app", workers=2, env=env, ready=ready) as server:
        probe(server)


# -- shell ---------------------------------------------------------------------------------


@pytest.mark.parametrize("block", _blocks("sh"))
def test_shell_block_runs(block: Block, tmp_path: Path) -> None:
    out = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", block.code],
        cwd=Path(__file__).resolve().parents[2],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert out.returncode == 0, f"{block.id}:\n{out.stdout}{out.stderr}"


@pytest.mark.servers
@pytest.mark.parametrize("block", _blocks("server"))
def test_server_block_serves(block: Block, request: pytest.FixtureRequest) -> None:
    path = block.args[0]
    code = block.code.replace(DOC_PORT, PORT)
    if "redis" in block.args:
        code = code.replace(DOC_REDIS_URL, request.getfixturevalue("redis_url"))
    with tempfile.TemporaryDirectory(prefix="zeal-docs-") as tmp:
        # run-example uses the environment running this suite (ZEAL_VENV), which is up to date:
        # it must start without installing anything.
        env = _env(ZEAL_PORT=PORT, ZEAL_CACHE_DIR=f"{tmp}/cache", ZEAL_VENV=sys.prefix)
        with CommandServer(["bash", "-c", code], ready=path, env=env, cwd=REPO) as server:
            status = server.ready_status
            assert status == 200, f"{block.id}: {path} answered {status}\n{server.log_text()}"
            if "run-example" in code:
                log = server.log_text()
                assert "the environment is up to date (no install)" in log
                assert "pip" not in log.replace("no install", "")
