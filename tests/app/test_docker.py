"""docker/: what can be checked without a Docker engine.

The compose file parses and its environment, ports, shm size and health check match the app;
the Dockerfile copies everything the build needs and builds with the same commands as CI.  In
long mode (``ZEAL_TEST_LONG=1``) the build stage's script really runs: wheels are built from
source into a temp dir and installed into a fresh venv, which then imports the extension.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import tomllib
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._harness.servers import free_port
from tests.app.conftest import ROOT
from tests.conftest import LONG
from zeal_asgi.settings import ZealSettings

DOCKER = ROOT / "docker"
LAUNCHER_ENV = {"ZEAL_HOST", "ZEAL_PORT", "ZEAL_WORKERS"}


def dockerfile() -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` of docker/Dockerfile, continuation lines joined."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line = pending + line
        pending = ""
        op, _, args = line.partition(" ")
        out.append((op.upper(), args.strip()))
    return out


def stages() -> dict[str, list[tuple[str, str]]]:
    """Instructions per stage name."""
    result: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] | None = None
    for op, args in dockerfile():
        if op == "FROM":
            m = re.search(r"\bAS\s+(\S+)$", args, re.IGNORECASE)
            assert m, f"unnamed stage: FROM {args}"
            current = result.setdefault(m.group(1), [])
        elif current is not None:
            current.append((op, args))
    return result


def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())
    return data


def _interpolate(value: str) -> str:
    """Compose's ``${VAR:-default}`` with the variable unset."""
    return re.sub(r"\$\{[A-Z_]+:-([^}]*)\}", r"\1", value)


def _bytes(size: str) -> int:
    m = re.fullmatch(r"(\d+)([kmg]?)b?", size.strip().lower())
    assert m, f"not a size: {size!r}"
    return int(m.group(1)) * {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}[m.group(2)]


def test_dockerfile_is_multi_stage_and_builds_from_source() -> None:
    st = stages()
    assert set(st) == {"build", "runtime"}
    build_runs = [args for op, args in st["build"] if op == "RUN"]
    assert build_runs == ["bash docker/build-wheels.sh /wheels"]
    runtime = st["runtime"]
    assert ("COPY", "--from=build /wheels /wheels") in runtime
    install = next(args for op, args in runtime if op == "RUN" and " pip " in args)
    assert "--no-index" in install and '"zeal-asgi[example]"' in install
    assert "import zeal_asgi.shm._shmtable" in install  # the image fails to build without the .so
    assert ("USER", "zeal") in runtime


def test_build_stage_runs_the_same_commands_as_ci() -> None:
    """CI (scripts/test) and the image build share the build-dependency check and build the
    package from source with pip (the pyproject's Cython ext-module)."""
    ci = (ROOT / "scripts" / "test").read_text()
    build = (DOCKER / "build-wheels.sh").read_text()
    shared = "bash scripts/ensure-build-deps.sh"
    assert shared in ci and shared in build
    pip = [shlex.split(line) for line in build.splitlines() if " pip " in f" {line} "]
    assert pip == [
        ["$PY", "-m", "pip", "wheel", "--no-cache-dir", "--wheel-dir", "$DEST", ".[example]"]
    ]
    assert "--require-hashes -r requirements/test.lock" in ci, "CI installs from the lock"
    assert "--no-build-isolation -e ." in ci, "CI builds the package from source"


def test_dockerfile_copies_everything_the_build_needs() -> None:
    copied: list[str] = []
    for op, args in stages()["build"]:
        if op == "COPY":
            *sources, _dest = shlex.split(args)
            copied += [s.rstrip("/") for s in sources if not s.startswith("--")]
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [pyproject["project"]["readme"], "pyproject.toml"]
    for ext in pyproject["tool"]["setuptools"]["ext-modules"]:
        needed += ext["sources"] + ext.get("include-dirs", [])
    needed.append("zeal_asgi/__init__.py")  # dynamic version
    for path in needed:
        assert any(path == c or path.startswith(c + "/") for c in copied), f"{path} not copied"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv" in ignore and ".git" in ignore and "**/*.so" in ignore


def test_runtime_serves_the_example_app_with_the_launcher() -> None:
    runtime = stages()["runtime"]
    cmd = json.loads(next(args for op, args in runtime if op == "CMD"))
    assert cmd == ["zeal-asgi", "run", "example_app.main:app"]
    env = " ".join(args for op, args in runtime if op == "ENV")
    assert "ZEAL_PORT=8000" in env and "ZEAL_HOST=0.0.0.0" in env
    # the Cache's directory must be owned by the unprivileged user (the default, ./.cache,
    # would be under /app, owned by root)
    assert "ZEAL_CACHE_DIR=/home/zeal/" in env
    assert "useradd --create-home --uid 10001 zeal" in [a for op, a in runtime if op == "RUN"]
    assert ("EXPOSE", "8000") in runtime
    health = next(args for op, args in runtime if op == "HEALTHCHECK")
    assert "http://127.0.0.1:8000/health/store" in health


def test_compose_file_matches_the_app() -> None:
    doc = compose()
    services = doc["services"]
    assert set(services) == {"app", "valkey"}
    app = services["app"]
    assert app["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert (ROOT / "docker" / app["build"]["context"] / app["build"]["dockerfile"]).is_file()

    env = {k: _interpolate(str(v)) for k, v in app["environment"].items()}
    unknown = (
        {k for k in env if k.startswith("ZEAL_")}
        - LAUNCHER_ENV
        - {f"ZEAL_{f.upper()}" for f in ZealSettings.model_fields}
    )
    assert not unknown, f"variables the app does not read: {unknown}"
    settings = ZealSettings.from_env(env)  # a bad value fails here as it would at boot
    assert settings.store_backend == "redis"
    assert settings.redis_url is not None
    assert settings.redis_url.split("//")[1].split(":")[0] == "valkey"  # the service name
    assert int(env["ZEAL_WORKERS"]) >= 2

    port = env["ZEAL_PORT"]
    assert [p.rsplit(":", 1)[-1] for p in app["ports"]] == [port]
    probe = " ".join(app["healthcheck"]["test"])
    assert f"http://127.0.0.1:{port}/health/store" in probe
    assert app["depends_on"] == {"valkey": {"condition": "service_healthy"}}
    assert services["valkey"]["healthcheck"]["test"][-1] == "ping"


def test_compose_shm_size_holds_the_apps_shared_memory() -> None:
    """shm_size is set (Docker's default /dev/shm is 64 MiB) and holds what the example app
    allocates, even on the table backend, with room to spare."""
    shm = _bytes(compose()["services"]["app"]["shm_size"])
    code = (
        "import os, example_app.main\n"
        "from zeal_asgi.shm.segments import segments_of_server\n"
        "print(sum(os.stat(p).st_size for p in segments_of_server()))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    env["ZEAL_STORE_BACKEND"] = "table"
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    used = int(out.stdout.strip().splitlines()[-1])
    print(f"example app shared memory: {used:,} bytes; compose shm_size {shm:,} bytes")
    assert used > 0 and shm >= 4 * used


@pytest.mark.slow
@pytest.mark.skipif(not LONG, reason="long mode only (ZEAL_TEST_LONG=1): builds from source")
def test_build_stage_script_builds_an_importable_wheel(tmp_path: Path) -> None:
    wheels = tmp_path / "wheels"
    subprocess.run(
        ["bash", str(DOCKER / "build-wheels.sh"), str(wheels)],
        check=True,
        timeout=900,
        env={**os.environ, "PYTHON": sys.executable},
    )
    built = sorted(p.name for p in wheels.glob("zeal_asgi-*.whl"))
    assert built and "linux" in built[0], built  # a platform wheel: the extension is inside
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    subprocess.run(
        [py, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheels,
         "zeal-asgi[example]"],
        check=True,
        timeout=600,
    )  # fmt: skip
    subprocess.run([py, "-c", "import zeal_asgi.shm._shmtable, uvloop, httptools"], check=True)
    _run_like_the_runtime_stage(env_dir, tmp_path)


def _runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in stages()["runtime"]:
        if op == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    return env


def _run_like_the_runtime_stage(env_dir: Path, tmp_path: Path) -> None:
    """The runtime stage's CMD from the freshly installed venv, probed by its HEALTHCHECK."""
    app_dir = tmp_path / "app"
    shutil.copytree(ROOT / "example_app", app_dir / "example_app")
    port = str(free_port())
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZEAL_", "PYTHON"))}
    env.update(_runtime_env())
    env.update(ZEAL_PORT=port, ZEAL_HOST="127.0.0.1", ZEAL_CACHE_DIR=str(tmp_path / "cache"))
    cmd = json.loads(next(a for op, a in stages()["runtime"] if op == "CMD"))
    probe = json.loads(
        next(a for op, a in stages()["runtime"] if op == "HEALTHCHECK").split("CMD ", 1)[1]
    )
    probe = [a.replace(":8000/", f":{port}/") for a in probe]
    server = subprocess.Popen(
        [str(env_dir / "bin" / cmd[0]), *cmd[1:]], cwd=app_dir, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            ok = subprocess.run(
                [str(env_dir / "bin" / "python"), *probe[1:]], env=env, stderr=subprocess.DEVNULL
            ).returncode
            if ok == 0:
                break
            assert server.poll() is None, "the runtime CMD exited"
            assert time.monotonic() < deadline, "HEALTHCHECK never passed"
            time.sleep(0.5)
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait()
