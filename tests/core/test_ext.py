"""The compiled extension: present, typed, robust locks really robust, the stub accurate."""

from __future__ import annotations

import subprocess
import sys

from zeal_asgi.shm import _shmtable, ext as _ext


def test_extension_is_compiled() -> None:
    assert _ext.HAS_EXT is True
    assert _shmtable.__file__ is not None and _shmtable.__file__.endswith(".so")


def test_robust_process_shared_mutexes_read_back() -> None:
    # PTHREAD_MUTEX_ROBUST is an enum in glibc: a build that compiled robustness out would
    # still run; this reads the attribute back from a real mutex attribute object.
    assert _shmtable.robust_mutexes_supported() is True


def test_abi_tag_names_libc_and_layout() -> None:
    tag = _shmtable.abi_tag()
    assert tag.startswith("glibc-") and "mutex40" in tag and "layout1" in tag


def test_stub_matches_the_extension() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "mypy.stubtest", "zeal_asgi.shm._shmtable"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
