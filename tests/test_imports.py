"""Importing the package allocates nothing: every module imports without making shared memory,
and the modules meant for plain Starlette import without fastapi (issue 13)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

PROBE = r"""
import importlib, json, os, pkgutil, sys
if sys.argv[1] == "without fastapi":
    sys.modules["fastapi"] = None  # ``import fastapi`` now raises ImportError
import zeal_asgi
names = sorted(m.name for m in pkgutil.walk_packages(zeal_asgi.__path__, "zeal_asgi."))
failed = {}
for name in names:
    if name != "zeal_asgi.__main__":  # runs the command line
        try:
            importlib.import_module(name)
        except ImportError as exc:
            failed[name] = repr(exc)
fds = []
for fd in os.listdir("/proc/self/fd"):
    try:
        fds.append(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        pass  # the directory's own descriptor, closed by now
with open("/proc/self/maps") as maps:
    mapped = [line.split()[-1] for line in maps if "/dev/shm" in line or "memfd:" in line]
mine = f".{os.getpid()}-"
print(json.dumps({
    "modules": len(names),
    "failed": failed,
    "memfds": [f for f in fds if f.startswith("/memfd:")],
    "mapped": mapped,
    "segments": [n for n in os.listdir("/dev/shm") if mine in n],
}))
"""

NEEDS_FASTAPI = {"zeal_asgi.response_cache.fastapi_render"}
"""The one module that imports fastapi at its top (the others import it when first used)."""


def _probe(mode: str) -> dict[str, object]:
    out = subprocess.run(
        [sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True
    )
    result: dict[str, object] = json.loads(out.stdout)
    return result


@pytest.mark.parametrize("mode", ["with fastapi", "without fastapi"])
def test_importing_every_module_allocates_no_shared_memory(mode: str) -> None:
    got = _probe(mode)
    assert isinstance(got["modules"], int) and got["modules"] > 80
    assert got["memfds"] == [] and got["mapped"] == [] and got["segments"] == []
    failed = got["failed"]
    assert isinstance(failed, dict)
    if mode == "with fastapi":
        assert failed == {}
    else:
        assert set(failed) <= NEEDS_FASTAPI, failed
        assert not {"zeal_asgi", "zeal_asgi.health", "zeal_asgi.ws"} & set(failed)
