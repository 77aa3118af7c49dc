"""Helpers of the locks tests."""

from __future__ import annotations

from typing import Any

LOCKS_APP = "tests.locks.apps.locks_app:app"
"""The app of the tests that run real servers."""


def run_periods(runs: dict[str, dict[str, Any]]) -> tuple[dict[int, int], dict[int, int]]:
    """``{period start (ms): runs}`` and ``{period: pid}`` from the app's ``/runs``."""
    counts = {int(k): int(v["n"]) for k, v in runs.items()}
    pids = {int(k): int(v["pid"]) for k, v in runs.items()}
    return counts, pids


def missing_periods(counts: dict[int, int], period_ms: int) -> list[int]:
    """Periods between the first and the last run that nobody ran."""
    first, last = min(counts), max(counts)
    return [p for p in range(first, last + 1, period_ms) if p not in counts]


def overrun_periods(runs: dict[str, dict[str, Any]], period_ms: int) -> set[int]:
    """Periods that ended while a run of an earlier period was still on (from the app's
    ``/runs``): ``zeal.every`` documents that such a run "may take the period after with it"
    (the lock was held through every other worker's tries), so nobody runs them."""
    taken: set[int] = set()
    for key, row in runs.items():
        start, ended = int(key), int(row.get("ended", 0))
        period = start + period_ms
        while start + ended >= period + period_ms:
            taken.add(period)
            period += period_ms
    return taken
