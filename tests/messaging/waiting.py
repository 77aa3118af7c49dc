"""Polling helper of the messaging tests: wait for a condition with a deadline, never forever."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable


async def until(cond: Callable[[], object], within: float = 10.0, step: float = 0.01) -> None:
    """Poll ``cond`` until it is truthy; fail the test when ``within`` seconds pass first."""
    deadline = time.monotonic() + within
    while not cond():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(step)
