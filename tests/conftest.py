"""Shared fixtures: real servers (tests/servers.py), shared-memory hygiene, test modes."""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zeal_asgi import Atomic, Table
from zeal_asgi._segments import destroy, server_identity, shm_dir

pytest_plugins = ["tests.servers"]

LONG = os.environ.get("ZEAL_TEST_LONG") == "1"
"""Long mode (fault and soak tests at full length): ZEAL_TEST_LONG=1."""


def quick_or_long(quick: float, long: float) -> float:
    """A duration for the current test mode."""
    return long if LONG else quick


def _foreign_segments() -> set[str]:
    mine = f"zeal.{os.geteuid()}."
    own = f"{mine}{server_identity().server_id}."
    try:
        names = os.listdir(shm_dir())
    except OSError:
        return set()
    return {n for n in names if n.startswith(mine) and not n.startswith(own)}


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    """Servers started by tests must leave no shared memory behind (checked at session end)."""
    before = _foreign_segments()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _foreign_segments() - before
    while leaked and time.monotonic() < deadline:  # janitors unlink right after their server
        time.sleep(0.1)
        leaked = _foreign_segments() - before
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
