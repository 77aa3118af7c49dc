"""The ``zeal-asgi`` command: version, help, one-line boot errors, the banner and ``inspect``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._harness.apps import AppServer
from tests._harness.servers import HOST, free_port
from tests.app.conftest import ROOT
from zeal_asgi.launcher import make_socket

RUN_OPTIONS = (
    "--host",
    "--port",
    "--workers",
    "--timeout-worker-healthcheck",
    "--timeout-graceful-shutdown",
    "--log-level",
    "--access-log",
    "--app-dir",
)

APPS = {
    "raises.py": """
        import os
        raise RuntimeError("the app is broken")
    """,
    "empty.py": "x = 1\n",
    "forgets_zeal.py": """
        from starlette.applications import Starlette
        from zeal_asgi import Zeal
        zeal = Zeal()
        app = Starlette()
    """,
    "own_lifespan.py": """
        import contextlib
        from starlette.applications import Starlette
        from zeal_asgi import Zeal
        zeal = Zeal()

        @contextlib.asynccontextmanager
        async def lifespan(app):
            raise RuntimeError("this lifespan fails")
            yield

        app = Starlette(lifespan=lifespan)
    """,
}


def cli(
    *args: str, cwd: Path = ROOT, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m zeal_asgi ARGS`` with a clean ``ZEAL_*`` environment."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    full.update(env or {}, PYTHONPATH=str(ROOT))
    return subprocess.run(
        [sys.executable, "-m", "zeal_asgi", *args],
        cwd=cwd,
        env=full,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def run_app(
    target: str, apps: Path, *extra: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``zeal-asgi run`` of an app in ``apps`` that is expected to stop by itself."""
    port = str(free_port())
    return cli(
        "run", target, "--app-dir", str(apps), "--host", HOST, "--port", port, *extra, env=env
    )


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """The failure's message; asserts it is one line, with no traceback and a non-zero status."""
    assert proc.returncode != 0, proc.stderr
    assert "Traceback" not in proc.stderr, proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("zeal-asgi: "), proc.stderr
    print(f"exit {proc.returncode}: {last}")
    return last


@pytest.fixture(scope="module")
def apps(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A directory of small app modules, for ``--app-dir``."""
    d = tmp_path_factory.mktemp("apps")
    for name, source in APPS.items():
        (d / name).write_text(textwrap.dedent(source))
    return d


def test_version() -> None:
    proc = cli("--version")
    assert proc.returncode == 0
    assert proc.stdout.startswith("zeal-asgi ") and proc.stdout.split()[1][0].isdigit()


def test_every_run_option_has_help_and_its_default() -> None:
    proc = cli("run", "--help")
    assert proc.returncode == 0
    entries: dict[str, str] = {}
    current = ""
    for line in proc.stdout.split("options:", 1)[1].splitlines():
        if line.startswith("  -"):
            current, _, rest = line.strip().partition(" ")
            entries[current] = rest
        elif line.strip():
            entries[current] += " " + line.strip()
    for option in RUN_OPTIONS:
        assert len(entries[option].split()) >= 4, f"{option} has no help: {entries[option]!r}"
    assert "(default: 127.0.0.1)" in entries["--host"] and "ZEAL_HOST" in entries["--host"]
    healthcheck = entries["--timeout-worker-healthcheck"]
    assert "(default: 5)" in healthcheck and "ZEAL_TIMEOUT_WORKER_HEALTHCHECK" in healthcheck


def test_a_busy_port_is_one_line() -> None:
    sock = make_socket(HOST, 0)
    try:
        port = str(sock.getsockname()[1])
        proc = cli("run", "tests.core.apps.shared_app:app", "--host", HOST, "--port", port)
    finally:
        sock.close()
    line = one_line_error(proc)
    assert f"{HOST}:{port}" in line and "Address already in use" in line


@pytest.mark.parametrize(
    ("target", "named"),
    [
        ("no_such_module:app", '"no_such_module"'),
        ("empty:app", 'Attribute "app" not found in module "empty"'),
        ("raises:app", "RuntimeError: the app is broken"),
        ("empty", "<module>:<attribute>"),
    ],
)
def test_an_app_that_does_not_import_is_one_line(apps: Path, target: str, named: str) -> None:
    line = one_line_error(run_app(target, apps))
    assert named in line
    if target == "raises:app":
        assert "raises.py:3" in line  # where the app's own code failed


def test_an_app_that_never_starts_its_zeal_fails_the_boot(apps: Path) -> None:
    line = one_line_error(run_app("forgets_zeal:app", apps))
    assert "never starts its Zeal" in line and "ZealMiddleware" in line and "lifespan" in line


@pytest.mark.parametrize("workers", ["1", "2"])
def test_a_worker_that_fails_to_start_exits_non_zero(apps: Path, workers: str) -> None:
    """An app's own lifespan counts as starting Zeal; when it fails, the launcher says so."""
    proc = run_app("own_lifespan:app", apps, "--workers", workers)
    assert proc.returncode == 3, proc.stderr
    assert "this lifespan fails" in proc.stderr


def test_the_banner_names_the_backend_and_the_tables(example_server: AppServer) -> None:
    log = example_server.log_path.read_text()
    banner = next(line for line in log.splitlines() if "worker(s) on http://" in line)
    print(banner)
    assert "table backend (demo_table, " in banner and "2 worker(s)" in banner


def inspect(server_id: str) -> dict[str, Any]:
    proc = cli("inspect", "--server", server_id, "--json")
    assert proc.returncode == 0, proc.stderr
    found: dict[str, Any] = json.loads(proc.stdout)
    return found


@pytest.fixture(params=["launcher", "uvicorn", "uvicorn-workers"])
def served(request: pytest.FixtureRequest) -> Iterator[AppServer]:
    """The lifecycle test app (a table ``shared`` and a counter ``hits``) under a server."""
    with AppServer("tests.core.apps.shared_app:app", server=request.param) as server:
        yield server


def test_inspect_lists_tables_counters_and_segments(served: AppServer) -> None:
    served.get("/put", k="a", v="x")
    served.get("/put", k="b", v="y")
    for _ in range(3):
        served.get("/incr")
    server_id = served.get("/segments")["server_id"]
    found = inspect(server_id)
    assert found["server_id"] == server_id and found["running"] is True
    tables = {t["name"]: t for t in found["tables"]}
    assert tables["shared"]["rows"] == 2 and tables["shared"]["capacity"] == 256
    assert tables["shared"]["memory"] > 256 * 64
    assert {c["name"]: c["value"] for c in found["counters"]}["hits"] == 3
    paths = {s["path"] for s in found["segments"]}
    assert tables["shared"]["segment"] in paths and all(p.startswith(found["dir"]) for p in paths)
    text = cli("inspect", "--server", server_id)
    assert text.returncode == 0 and "shared" in text.stdout and "hits" in text.stdout
    print(text.stdout)


def test_inspect_refuses_an_unknown_server() -> None:
    line = one_line_error(cli("inspect", "--server", "1-1"))
    assert "1-1" in line
