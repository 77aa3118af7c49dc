"""The compiled extensions: present, typed, robust locks really robust, the stubs accurate."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests._harness.apps import REPO
from tests.core import crashpoints
from zeal_asgi import Table
from zeal_asgi.shm import _shmtable


def test_extension_is_compiled() -> None:
    assert issubclass(Table, _shmtable.Table)
    assert _shmtable.__file__ is not None and _shmtable.__file__.endswith(".so")


def test_robust_process_shared_mutexes_read_back() -> None:
    # PTHREAD_MUTEX_ROBUST is an enum in glibc: a build that compiled robustness out would
    # still run; this reads the attribute back from a real mutex attribute object.
    assert _shmtable.robust_mutexes_supported() is True


def test_abi_tag_names_libc_and_layout() -> None:
    tag = _shmtable.abi_tag()
    assert tag.startswith("glibc-") and "mutex40" in tag and "layout2" in tag


@pytest.mark.parametrize(
    "module", ["zeal_asgi.shm._shmtable", "zeal_asgi.locks._fast", "zeal_asgi.ratelimit._fast"]
)
def test_stub_matches_the_compiled_module(module: str) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", module],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


BUILD = """
import sys, tomllib
from setuptools import Extension, setup
exts = tomllib.load(open("pyproject.toml", "rb"))["tool"]["setuptools"]["ext-modules"]
setup(
    script_args=["build_ext", "--build-lib", ".", "--build-temp", "build"],
    ext_modules=[Extension(ext["name"], ext["sources"], include_dirs=ext.get("include-dirs", []),
                           extra_compile_args=ext["extra-compile-args"],
                           libraries=ext.get("libraries", [])) for ext in exts],
)
"""

SURVIVE = """
from zeal_asgi import Table
from zeal_asgi.shm import _shmtable
assert _shmtable.__file__.startswith({root!r}), _shmtable.__file__
t = Table(16, {{"v": ("int", 8), "s": ("string", 8)}})
for i in range(5):
    t.set("k", {{"v": i, "s": "x"}})  # an update: passes crash points 1 and 2 each time
    t.incr("k", "v")
print("alive", _shmtable.FAULT_INJECTION, t.get("k"))
"""


def test_default_build_has_no_crash_points(tmp_path: Path) -> None:
    """The fault-injection hooks exist only in the test build: a default build of the extension
    (pyproject's flags, no CFLAGS) ignores ZEAL_CRASH_AT, which would kill a test build here."""
    for part in ("zeal_asgi", "ext"):
        shutil.copytree(
            REPO / part,
            tmp_path / part,
            ignore=shutil.ignore_patterns("*.so", "*.c", "__pycache__"),
        )
    shutil.copy(REPO / "pyproject.toml", tmp_path)
    env = {k: v for k, v in os.environ.items() if k not in ("CFLAGS", "CPPFLAGS")}
    build = subprocess.run(
        [sys.executable, "-c", BUILD], cwd=tmp_path, env=env, capture_output=True, text=True
    )
    assert build.returncode == 0, build.stdout + build.stderr
    env.update(PYTHONPATH=str(tmp_path), ZEAL_CRASH_AT="2:1")
    proc = subprocess.run(
        [sys.executable, "-c", SURVIVE.format(root=str(tmp_path))],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.split() == ["alive", "False", "{'v':", "5,", "'s':", "'x'}"]


def test_test_build_arms_crash_points_from_the_environment() -> None:
    crashpoints.require()
    env = {**os.environ, "ZEAL_CRASH_AT": "2:1"}
    code = "from zeal_asgi import Table\nt = Table(8, {'a': ('int', 8), 'b': ('int', 8)})\n"
    code += "t.set('k', {'a': 1, 'b': 1})\nt.set('k', {'a': 2, 'b': 2})\nprint('survived')"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    env["ZEAL_CRASH_AT"] = "two"
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=60)
    assert b"ConfigError: ZEAL_CRASH_AT must be <point>[:<nth>][:stop]" in proc.stderr
