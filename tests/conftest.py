"""Shared fixtures: real servers (tests/servers.py), shared-memory hygiene, test modes."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zeal_asgi import Atomic, Table
from zeal_asgi.shm.process import process_alive
from zeal_asgi.shm.segments import destroy, server_identity, shm_dir

pytest_plugins = ["tests.servers"]

LONG = os.environ.get("ZEAL_TEST_LONG") == "1"
"""Long mode (fault and soak tests at full length): ZEAL_TEST_LONG=1."""


def quick_or_long(quick: float, long: float) -> float:
    """A duration for the current test mode."""
    return long if LONG else quick


def _stale_segments() -> set[str]:
    """Segments of this user whose server process is gone (what a leaky server leaves behind).

    Live servers (of this run or of another run on the same machine) are not counted."""
    mine = f"zeal.{os.geteuid()}."
    own = f"{mine}{server_identity().server_id}."
    try:
        names = os.listdir(shm_dir())
    except OSError:
        return set()
    stale = set()
    for n in names:
        if not n.startswith(mine) or n.startswith(own):
            continue
        sid = n[len(mine) :].split(".")[0]
        pid, _, start = sid.partition("-")
        if pid.isdigit() and start.isdigit() and process_alive(int(pid), int(start)):
            continue
        stale.add(n)
    return stale


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    """Servers started by tests must leave no shared memory behind (checked at session end)."""
    before = _stale_segments()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _stale_segments() - before
    while leaked and time.monotonic() < deadline:  # janitors unlink right after their server
        time.sleep(0.1)
        leaked = _stale_segments() - before
    assert not leaked, f"shared-memory segments leaked by test servers: {sorted(leaked)}"


@pytest.fixture
def make_table() -> Iterator[Callable[..., Table]]:
    """Factory of uniquely named shared tables, unlinked after the test."""
    made: list[Table] = []

    def factory(max_rows: int, columns: dict[str, Any], **kw: Any) -> Table:
        kw.setdefault("name", f"t-{uuid.uuid4().hex[:12]}")
        t = Table(max_rows, columns, **kw)
        made.append(t)
        return t

    yield factory
    for t in made:
        destroy(t)


@pytest.fixture
def make_atomic() -> Iterator[Callable[..., Atomic]]:
    """Factory of uniquely named shared atomics, unlinked after the test."""
    made: list[Atomic] = []

    def factory(initial: int = 0, **kw: Any) -> Atomic:
        kw.setdefault("name", f"a-{uuid.uuid4().hex[:12]}")
        a = Atomic(initial, **kw)
        made.append(a)
        return a

    yield factory
    for a in made:
        destroy(a)
