"""Segment safety: a too-small /dev/shm is a typed error and never a SIGBUS (E6), permissions
and squatted names (E7), an ABI/layout mismatch, and the detection of private copies."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._harness.apps import REPO
from zeal_asgi import Atomic, Table
from zeal_asgi.errors import (
    PrivateCopyError,
    ShmAbiMismatchError,
    ShmCapacityError,
    ShmNameTakenError,
)
from zeal_asgi.shm import segments as _segments
from zeal_asgi.shm.segments import destroy

MakeTable = Callable[..., Table]


BIG_ROWS = 1_000_000  # ~129 MB with one STRING(32) column


def _python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    full["PYTHONPATH"] = str(REPO)
    full.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


@pytest.fixture
def small_shm() -> Iterator[str]:
    """A 64 MiB tmpfs, like Docker's default /dev/shm (needs root, as in CI)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("E6 needs root to mount a 64 MiB tmpfs")
        pytest.skip("E6 needs root to mount a 64 MiB tmpfs")
    d = tempfile.mkdtemp(prefix="zeal-shm-")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m,mode=1777", "tmpfs", d], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", d], check=True)
        os.rmdir(d)


CAPACITY_PROBE = """
    import signal, sys
    from zeal_asgi import Table
    from zeal_asgi.errors import ShmCapacityError
    try:
        t = Table(1_000_000, {"v": ("string", 32)}, name="too-big")
    except ShmCapacityError as exc:
        print("TYPED", exc.needed, exc.free, exc.total)
        print(exc)
        sys.exit(3)
    t.set("k", {"v": "x"})
    for i in range(0, t.capacity, 997):
        t.set(f"k{i}", {"v": "y" * 32})  # touch pages all over the segment
    print("OK", t.memory_bytes)
"""


def test_e6_small_dev_shm_is_a_typed_error_and_memfd_fits(small_shm: str) -> None:
    proc = _python(CAPACITY_PROBE, {"ZEAL_SHM_DIR": small_shm})
    assert proc.returncode == 3, proc.stdout + proc.stderr  # not -SIGBUS
    line = proc.stdout.splitlines()[0].split()
    needed, free, total = map(int, line[1:])
    assert needed > free and total == 64 * 1024 * 1024
    text = proc.stdout
    for word in ("needs", "bytes", "free of", "--shm-size", "shm_size", "emptyDir", "memfd"):
        assert word in text, word
    assert os.listdir(small_shm) == [], "a refused segment must not be left behind"
    ok = _python(CAPACITY_PROBE, {"ZEAL_SHM_DIR": small_shm, "ZEAL_SHM_BACKEND": "memfd"})
    assert ok.returncode == 0 and ok.stdout.startswith("OK"), ok.stdout + ok.stderr
    print(
        f"\nEXPERIMENT E6 | 128 MB table, 64 MiB /dev/shm | error=ShmCapacityError needed={needed} "
        f"free={free} total={total} sigbus=0 memfd=ok | PASS"
    )


def test_e6_without_root_the_precheck_still_refuses(make_table: MakeTable) -> None:
    free = os.statvfs(_segments.shm_dir()).f_bavail * os.statvfs(_segments.shm_dir()).f_frsize
    rows = min(2**32 - 2, free // 100 + 1_000_000)
    with pytest.raises(ShmCapacityError) as info:
        make_table(rows, {"v": ("string", 200)})
    assert isinstance(info.value, OSError) and "free of" in str(info.value)


def test_e7_mode_owner_and_other_users(make_table: MakeTable) -> None:
    t = make_table(16, {"v": ("int", 8)})
    st = os.stat(t.path)
    assert oct(st.st_mode & 0o777) == oct(0o600) and st.st_uid == os.geteuid()
    if os.geteuid() != 0:
        pytest.skip("opening as another user needs root")
    proc = subprocess.run(
        [
            "setpriv",
            "--reuid=nobody",
            "--regid=nogroup",
            "--clear-groups",
            sys.executable,
            "-c",
            f"open({t.path!r}, 'rb')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0 and "PermissionError" in proc.stderr


def test_e7_squatted_name_is_refused_never_attached() -> None:
    if os.geteuid() != 0:
        pytest.skip("pre-creating a name as another user needs root")
    name = f"squat-{uuid.uuid4().hex[:8]}"
    path = _segments.segment_path("t", name)
    fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o666)
    os.fchown(fd, 65534, 65534)  # nobody
    os.fchmod(fd, 0o666)
    os.write(fd, b"\0" * 8192)
    os.close(fd)
    try:
        with pytest.raises(ShmNameTakenError, match="squatted"):
            Table(16, {"v": ("int", 8)}, name=name)
        # a world-writable segment of our own uid is refused too
        os.chown(path, os.geteuid(), os.getegid())
        with pytest.raises(OSError, match="0600"):
            Table(16, {"v": ("int", 8)}, name=name)
    finally:
        os.unlink(path)
    print(
        "\nEXPERIMENT E7 | mode, other user, squatted name | mode=0600 eaccess=yes "
        "squat=refused | PASS"
    )


def test_abi_or_layout_mismatch_is_refused(make_table: MakeTable) -> None:
    t = make_table(16, {"v": ("int", 8)})
    with open(t.path, "r+b") as f:
        f.seek(16)  # the ABI tag in the header
        f.write(b"musl-1.2")
    with pytest.raises(ShmAbiMismatchError, match="incompatible build"):
        Table(16, {"v": ("int", 8)}, name=t.name)


def test_schema_conflict_with_a_live_user_is_refused(make_table: MakeTable) -> None:
    t = make_table(16, {"v": ("int", 8)})
    with pytest.raises(ShmAbiMismatchError, match="every worker must declare the same schema"):
        Table(16, {"v": ("int", 4)}, name=t.name)  # t (this process) still uses it
    assert t.get("x") is None


def test_unused_segment_with_another_schema_is_replaced() -> None:
    name = f"reload-{uuid.uuid4().hex[:8]}"
    code = f"""
        from zeal_asgi import Table
        t = Table(16, {{"v": ("int", 8)}}, name={name!r})
        t.set("k", {{"v": 1}})
        import os; os._exit(0)  # leaves the segment behind, like a worker before a --reload
    """
    env = {"ZEAL_SERVER_ID": _segments.server_identity().server_id}
    assert _python(code, env).returncode == 0
    t = Table(16, {"v": ("int", 4), "s": ("string", 4)}, name=name)
    try:
        assert t.get("k") is None and t.columns == ("v", "s")
    finally:
        destroy(t)


def test_private_copy_is_detected(make_table: MakeTable) -> None:
    t = make_table(16, {"v": ("int", 8)})
    assert _segments.verify_shared() == []
    os.unlink(t.path)  # e.g. something replaced the server's segment under this worker
    fd = os.open(t.path, os.O_CREAT | os.O_EXCL | os.O_RDWR, 0o600)
    os.close(fd)
    try:
        with pytest.raises(PrivateCopyError, match="replaced"):
            _segments.verify_shared()
    finally:
        os.unlink(t.path)
    with pytest.raises(PrivateCopyError, match="no longer exists"):
        _segments.verify_shared()
    t.close()


def test_worker_misdetected_as_whole_server_is_reported() -> None:
    child = """
        from zeal_asgi import Table
        from zeal_asgi.shm.segments import verify_shared, release_owned
        from zeal_asgi.errors import PrivateCopyError
        t = Table(8, {"v": ("int", 8)}, name="misdetected")
        try:
            verify_shared()
        except PrivateCopyError as exc:
            print("DETECTED", exc)
        release_owned()
    """
    # the parent looks like a multi-worker server command line, but is not one we know
    child = textwrap.dedent(child)
    parent = f"import subprocess, sys; subprocess.run([sys.executable, '-c', {child!r}])"
    full = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    full["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(parent), "--workers", "4"],
        env=full,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert "DETECTED" in proc.stdout and "ZEAL_SERVER_ID" in proc.stdout, proc.stdout + proc.stderr


def test_sigbus_never_reaches_a_reader_of_a_reserved_segment(make_table: MakeTable) -> None:
    """posix_fallocate reserved every page: touching all of a big table never faults."""
    t = make_table(200_000, {"v": ("string", 32)})
    for i in range(0, t.capacity, 101):
        t.set(f"k{i}", {"v": "z" * 32})
    assert len(t) == len(range(0, t.capacity, 101))
    assert signal.SIGBUS  # the process is still alive to say so


def test_shm_dir_is_configurable(tmp_path: Path) -> None:
    proc = _python(
        """
        from zeal_asgi import Table
        from zeal_asgi.shm.segments import release_owned
        t = Table(8, {"v": ("int", 8)}, name="elsewhere")
        print(t.path)
        release_owned()
        """,
        {"ZEAL_SHM_DIR": str(tmp_path)},
    )
    assert proc.stdout.strip().startswith(str(tmp_path)), proc.stdout + proc.stderr
    deadline = time.monotonic() + 5.0  # the janitor removes its marker once the server is gone
    while list(tmp_path.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert list(tmp_path.iterdir()) == []


def _open_at_once(name: str, out: Any, go: Any) -> None:
    go.wait()  # every sibling creates or attaches in the same instant
    t, a = Table(1000, {"v": ("int", 8)}, name=name), Atomic(0, name=name)
    out.put((t.nonce, a.nonce, t.created, a.created))


def test_siblings_opening_one_name_at_once_share_one_segment() -> None:
    """Segments are built under a private name and linked into place: of 8 processes starting
    together exactly one creates each segment, and every other attaches to that one."""
    ctx = mp.get_context("fork")
    name = f"race-{uuid.uuid4().hex[:8]}"
    out, go = ctx.Queue(), ctx.Barrier(8)
    procs = [ctx.Process(target=_open_at_once, args=(name, out, go)) for _ in range(8)]
    for p in procs:
        p.start()
    got = [out.get(timeout=60) for _ in procs]
    for p in procs:
        p.join(30)
    assert [p.exitcode for p in procs] == [0] * 8
    assert len({g[0] for g in got}) == 1 and len({g[1] for g in got}) == 1
    assert sum(g[2] for g in got) == 1 and sum(g[3] for g in got) == 1
    for kind in ("t", "a"):
        os.unlink(_segments.segment_path(kind, name))
