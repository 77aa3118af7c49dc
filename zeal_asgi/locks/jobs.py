"""``zeal.every``: a job that runs once per period per scope, never overlapping itself.

Periods are aligned to the wall clock (a 60 s job runs at every minute; across a cluster a clock
skew only shifts when a run starts: two runs of one period are impossible either way). At each
period's start every worker tries the job's lock without waiting; the one that gets it claims the
period (the lock's mark rises to the period's start) and runs the job; the others find the period
claimed, or the lock held, and then try again at each quarter of the period. A run that outlasts its
period delays the next one (runs never overlap) and may take the period after with it. The lease
lasts half a period and is renewed while the job runs, so when the runner dies another worker runs
the next period: a dead holder's host lock is free at once, a cluster lease expires within half a
period.

Runs, failures, and the last start and duration of every job are kept per host in shared
memory (:func:`job_stats`; ``/health/store`` reports them).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

from zeal_asgi.errors import LockLostError, LockTimeoutError, ZealError
from zeal_asgi.locks.lock import LockContext, Locker, Scope
from zeal_asgi.shm.ext import Table

log = logging.getLogger("zeal_asgi.locks")

JOBS_TABLE = "__zeal_jobs__"
_CAPACITY = 256
_table: Table | None = None


def jobs_table() -> Table:
    """The host's job statistics (made by the first ``every``: before workers start)."""
    global _table
    if _table is None:
        columns = {c: ("int", 8) for c in ("runs", "failures", "started_ms", "duration_us")}
        _table = Table(_CAPACITY, columns, name=JOBS_TABLE, key_size=128)
    return _table


@dataclass(frozen=True)
class Job:
    """A job declared with ``zeal.every``."""

    fn: Callable[[], Awaitable[Any]]
    name: str
    seconds: float
    scope: str
    jitter: float
    run_at_start: bool

    @property
    def lock_name(self) -> str:
        """The lock that keeps runs apart (and holds the last period claimed)."""
        return "zeal:job:" + self.name


async def run_job(job: Job, locker: Locker, resolve: Callable[[str], Scope]) -> None:
    """The job's loop in one worker: at every period's start, run it if nobody has."""
    period_ms = max(1, round(job.seconds * 1000))
    period = int(time.time() * 1000) // period_ms * period_ms  # the current period's start
    if job.run_at_start:
        await _attempt(job, period, period_ms, locker, resolve)
    while True:
        # The next period; the current one when the last run overran into it.
        period = max(period + period_ms, int(time.time() * 1000) // period_ms * period_ms)
        delay = period / 1000 - time.time() + (random.uniform(0, job.jitter) if job.jitter else 0)
        await asyncio.sleep(max(delay, 0.0))
        await _attempt(job, period, period_ms, locker, resolve)


async def _attempt(
    job: Job, period: int, period_ms: int, locker: Locker, resolve: Callable[[str], Scope]
) -> None:
    for quarter in range(4):
        # Not before the period starts (a timer may fire a millisecond early); then, while the
        # lock is held (a run that overran, a runner that died with its lease on), again at
        # each quarter of the period.
        wait = (period + quarter * period_ms / 4) / 1000 - time.time()
        if wait > 0:
            await asyncio.sleep(wait)
        try:
            async with LockContext(locker, resolve, job.scope, job.lock_name, job.seconds / 2, 0.0):
                if await resolve(job.scope).claim(job.lock_name, period):
                    await _run(job)
            return
        except LockTimeoutError:
            continue
        except LockLostError as exc:
            return _failed(job, str(exc))
        except ZealError as exc:  # the backend is down: try again next period
            return log.warning("zeal.every job %r: period skipped: %s", job.name, exc)


async def _run(job: Job) -> None:
    t = jobs_table()
    t.incr(job.name, "runs")
    t.set(job.name, {"started_ms": int(time.time() * 1000)})
    started = time.perf_counter()
    try:
        await job.fn()
    except Exception as exc:
        _failed(job, repr(exc), exc)
    finally:
        t.set(job.name, {"duration_us": int((time.perf_counter() - started) * 1e6)})


def _failed(job: Job, why: str, exc: BaseException | None = None) -> None:
    jobs_table().incr(job.name, "failures")
    log.error("zeal.every job %r failed: %s", job.name, why, exc_info=exc)


def job_stats() -> dict[str, dict[str, Any]]:
    """Per job of this host: ``runs``, ``failures``, ``last_start`` (epoch seconds) and
    ``last_duration`` (seconds; ``None`` until a run finished)."""
    if _table is None:
        return {}
    out = {}
    for name, row in _table.items():
        started, took = row["started_ms"], row["duration_us"]
        out[str(name)] = {
            "runs": row["runs"],
            "failures": row["failures"],
            "last_start": started / 1000 if started else None,
            "last_duration": took / 1e6 if took else None,
        }
    return dict(sorted(out.items()))
