"""The sdist and the wheel: built, repaired to a manylinux tag, accepted by twine, and working
when installed into a fresh virtualenv with no source tree on the path.

Select these with ``pytest -m packaging``.
"""

from __future__ import annotations

import json
import os
import tarfile
import textwrap
import time
import zipfile
from pathlib import Path

import pytest

from tests.packaging.conftest import BIN, Dist, Venv, clean_env, run

pytestmark = pytest.mark.packaging

PUBLIC_MODULES = (
    "zeal_asgi",
    "zeal_asgi.cache",
    "zeal_asgi.errors",
    "zeal_asgi.fastapi",
    "zeal_asgi.health",
    "zeal_asgi.launcher",
    "zeal_asgi.middleware",
    "zeal_asgi.ratelimit",
    "zeal_asgi.settings",
    "zeal_asgi.store",
    "zeal_asgi.streams",
    "zeal_asgi.ws",
)

# A parent process makes the table; a child started the way `uvicorn --workers` starts its
# workers (multiprocessing, spawn) attaches to it by name and writes a row; the parent reads it.
SMOKE = """
import json, multiprocessing, os

import zeal_asgi
from zeal_asgi import Store

COLUMNS = {"pid": (Store.TYPE_INT, 8), "note": (Store.TYPE_STRING, 32)}


def write() -> None:
    table = Store.make("smoke", 16, COLUMNS)
    table.set("row", {"pid": os.getpid(), "note": "written by the child"})


if __name__ == "__main__":
    table = Store.make("smoke", 16, COLUMNS)
    child = multiprocessing.get_context("spawn").Process(target=write)
    child.start()
    child.join(60)
    prefix = f"zeal.{os.geteuid()}.{os.getpid()}-"
    print(json.dumps({
        "file": zeal_asgi.__file__,
        "child": child.pid,
        "exitcode": child.exitcode,
        "row": table.get("row"),
        "prefix": prefix,
        "segments": sorted(n for n in os.listdir("/dev/shm") if n.startswith(prefix)),
    }))
"""


def _pids() -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit()]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_sdist_holds_what_the_wheel_is_built_from(dist: Dist) -> None:
    with tarfile.open(dist.sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    for needed in ("pyproject.toml", "README.md", "LICENSE", "CHANGELOG.md", "ext/_shmtable.pyx",
                   "ext/zt_core.h", "zeal_asgi/__init__.py", "zeal_asgi/py.typed",
                   "zeal_asgi/locks/_fast.pyx", "zeal_asgi/ratelimit/_fast.pyx"):  # fmt: skip
        assert needed in names, f"{needed} missing from {dist.sdist.name}"
    built = [n for n in names if n.endswith((".so", ".o"))]
    assert not built, f"build products in the sdist: {built}"
    assert not any(n.startswith("tests/") for n in names)


def test_wheel_holds_the_extension_the_stub_and_the_license(dist: Dist) -> None:
    with zipfile.ZipFile(dist.repaired) as whl:
        names = whl.namelist()
    assert any(n.startswith("zeal_asgi/shm/_shmtable.") and n.endswith(".so") for n in names)
    assert "zeal_asgi/shm/_shmtable.pyi" in names and "zeal_asgi/py.typed" in names
    for compiled in ("locks", "ratelimit"):
        assert any(
            n.startswith(f"zeal_asgi/{compiled}/_fast.") and n.endswith(".so") for n in names
        )
        assert f"zeal_asgi/{compiled}/_fast.pyi" in names
    assert any(n.endswith(".dist-info/licenses/LICENSE") for n in names)
    assert not any(n.startswith(("tests/", "example_app/", "bench/")) for n in names)


def test_wheel_is_repaired_to_a_manylinux_tag(dist: Dist) -> None:
    assert "-linux_" in dist.wheel.name
    tag = dist.repaired.name.removesuffix(".whl").rsplit("-", 1)[1]
    assert tag.startswith("manylinux_") or tag.startswith("manylinux20"), dist.repaired.name
    # auditwheel agrees with its own repair: nothing outside the manylinux policy is linked
    shown = run([BIN / "auditwheel", "show", dist.repaired], env=clean_env()).stdout
    assert f'"{tag.split(".")[0]}"' in " ".join(shown.split()), shown


def test_twine_check_passes(dist: Dist) -> None:
    out = run([BIN / "twine", "check", "--strict", dist.sdist, dist.repaired]).stdout
    assert out.count("PASSED") == 2, out


def test_installed_wheel_shares_a_table_between_two_processes(base_venv: Venv) -> None:
    script = base_venv.workdir / "smoke.py"
    script.write_text(textwrap.dedent(SMOKE))
    result = json.loads(base_venv.run(script, timeout=120).stdout)

    assert Path(result["file"]).is_relative_to(base_venv.path), (
        f"zeal_asgi imported from {result['file']}, not from the virtualenv"
    )
    assert result["exitcode"] == 0
    assert result["row"] == {"pid": result["child"], "note": "written by the child"}
    assert result["segments"], "the table's segment was not found under /dev/shm"

    # The parent has exited: its segments are unlinked and its janitor is gone.
    prefix = result["prefix"]
    deadline = time.monotonic() + 15
    while True:
        left = [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]
        janitors = [pid for pid in _pids() if prefix.encode() in _cmdline(pid)]
        if not left and not janitors:
            break
        assert time.monotonic() < deadline, f"left behind: segments {left}, processes {janitors}"
        time.sleep(0.1)


def test_base_install_has_no_extra(base_venv: Venv) -> None:
    """The premise of the next test: none of the extras' packages came with the wheel."""
    code = "import importlib.util as u; print([m for m in %r if u.find_spec(m)])"
    extras = ("fastapi", "redis", "hiredis", "aiomcache", "uvloop", "httptools")
    assert base_venv.run("-c", code % (extras,)).stdout.strip() == "[]"


BASE_INSTALL_CASES = {
    "every public module imports": (
        f"import importlib\nfor m in {PUBLIC_MODULES!r}:\n    importlib.import_module(m)",
        None,
    ),
    "Starlette health routes": (
        "from starlette.applications import Starlette\nimport zeal_asgi.health as h\n"
        "Starlette(routes=h.starlette_routes())",
        None,
    ),
    "redis backend": (
        "from zeal_asgi import Store\nStore.default_backend('redis', 'redis://127.0.0.1:6379/0')",
        'pip install "zeal-asgi[redis]"',
    ),
    "memcached backend": (
        "from zeal_asgi import Store\nStore.default_backend('memcached', '127.0.0.1:11211')",
        'pip install "zeal-asgi[memcached]"',
    ),
    "FastAPI health router": (
        "import zeal_asgi.health as h\nh.make_router()",
        'pip install "zeal-asgi[fastapi]"',
    ),
    "FastAPI dependency": (
        "from zeal_asgi.fastapi import StoreDep",
        'pip install "zeal-asgi[fastapi]"',
    ),
    "rate-limit dependency": (
        "from zeal_asgi.ratelimit import RateLimiter, client_ip\n"
        "RateLimiter('5/minute', name='probe').depends(key=client_ip)",
        'pip install "zeal-asgi[fastapi]"',
    ),
    "limits storage": (
        "from zeal_asgi.ratelimit import LimitsStorage",
        'pip install "zeal-asgi[limits]"',
    ),
}


@pytest.mark.parametrize("case", list(BASE_INSTALL_CASES))
def test_base_install_imports_everything_and_names_missing_extras(
    base_venv: Venv, case: str
) -> None:
    code, extra = BASE_INSTALL_CASES[case]
    result = base_venv.probe(code)
    if extra is None:
        assert result["raised"] is None, result
    else:
        assert result["raised"] is not None, f"{case}: no error without the extra"
        assert "zeal_asgi.errors.ConfigError" in result["raised"], result
        assert extra in result["message"], result


def test_the_wheel_has_no_crash_points(base_venv: Venv) -> None:
    """A wheel is a release build whatever CFLAGS the run has: ZEAL_CRASH_AT, which kills a
    test build at the first update of a row, changes nothing."""
    code = (
        "from zeal_asgi import Table\n"
        "from zeal_asgi.shm import _shmtable\n"
        "t = Table(16, {'v': ('int', 8)})\n"
        "for i in range(5):\n"
        "    t.set('k', {'v': i})\n"
        "print(_shmtable.FAULT_INJECTION, t.get('k'))\n"
    )
    out = base_venv.run("-c", code, env={"ZEAL_CRASH_AT": "2:1"}).stdout.split()
    assert out == ["False", "{'v':", "4}"]
