"""Shared fixtures: the harness (real servers, leak checks: ``tests/_harness``), shared-memory
tables and atomics, test modes."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from zeal_asgi import Atomic, Table
from zeal_asgi.shm.segments import destroy

pytest_plugins = ["tests._harness.plugin"]

LONG = os.environ.get("ZEAL_TEST_LONG") == "1"
"""Long mode (fault and soak tests at full length): ZEAL_TEST_LONG=1."""


def quick_or_long(quick: float, long: float) -> float:
    """A duration for the current test mode."""
    return long if LONG else quick


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
