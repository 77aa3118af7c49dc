"""Suite ``locks``: ``zeal.lock`` on one host and on Redis, beside the locks users take instead.

Host scope, one process, nobody else wanting the lock: ``async with zeal.lock(...)`` and the
shared-memory lease alone (what the block takes and gives back: ``host_locks()``), beside
``asyncio.Lock`` (one process only: the floor), ``fcntl.flock`` on a tmpfs file and
``multiprocessing.Lock`` (both host-wide; neither has a ttl or a fencing token, and a
``multiprocessing.Lock`` whose holder dies stays locked).  Contended: two forked processes
take the lock in a loop for a few seconds, holding it for ~20 us of work each time; how the
acquisitions split between them shows whether one starves.  Cluster scope: one coroutine takes
and releases a lock on one private redis-server, through ``zeal.lock(scope="cluster")``,
redis-py's ``Redis.lock`` and pottery's ``AIORedlock``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import fcntl
import itertools
import multiprocessing
import os
import statistics
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from typing import Any

from ._harness import (
    TIMES,
    Config,
    CpuWatch,
    Loop,
    NotInstalled,
    Result,
    SuiteReport,
    fmt_ops,
    log,
    machine_info,
    need,
    now_utc,
    redis_server,
    redis_server_version,
    shm_tempdir,
)
from .store import AsyncRunner, Row, Target, measure_rows, row_table, target_table

__all__ = ["NAME", "TITLE", "run"]

NAME = "locks"
TITLE = "Locks: zeal.lock on one host and on Redis vs flock, multiprocessing, redis-py, pottery"

PACKAGES = ("zeal-asgi", "redis", "hiredis", "pottery", "uvloop")
TTL = 30.0
HOLD = 20e-6
"""Seconds of work inside each contended acquisition."""
_FORK = multiprocessing.get_context("fork")


def _async_with(runner: AsyncRunner, make: Callable[[], Any]) -> Loop:
    """A loop entering and leaving ``make()`` (an async context manager) ``n`` times."""

    async def body(n: int) -> None:
        for _ in itertools.repeat(None, n):
            async with make():
                pass

    return runner.loop_of(body)


def _sync_with(lock: Any) -> Loop:
    def loop(n: int) -> None:
        for _ in itertools.repeat(None, n):
            with lock:
                pass

    return loop


class _Flock:
    """``fcntl.flock`` on a file, as a context manager (open per process: one description)."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)

    def __enter__(self) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_EX)

    def __exit__(self, *exc: object) -> None:
        fcntl.flock(self.fd, fcntl.LOCK_UN)


# -- host, uncontended ---------------------------------------------------------------------------


def _host_rows(runner: AsyncRunner, tmp: str, cleanup: contextlib.ExitStack) -> list[Row]:
    from zeal_asgi import Store, Zeal
    from zeal_asgi.locks.host import host_locks

    zeal = Zeal(store=Store("table"))
    host, name = host_locks(), f"bench-{uuid.uuid4().hex[:8]}"

    async def lease(n: int) -> None:
        columns: Any = host.immediate  # the compiled attempts a free lock is taken with
        take, give, ms = columns.take, columns.give, 30_000
        for _ in itertools.repeat(None, n):
            give(name, take(name, ms)[1])

    aio, mp_lock, flock = asyncio.Lock(), _FORK.Lock(), _Flock(f"{tmp}/flock")
    cleanup.callback(os.close, flock.fd)
    zeal_with = _async_with(runner, lambda: zeal.lock(name, TTL))
    return [
        Row("zeal", "zeal", "host", "async with zeal.lock(name, ttl=30)", zeal_with),
        Row("zeal-lease", "zeal", "host", "the shared-memory lease alone", runner.loop_of(lease)),
        Row("asyncio", "asyncio.Lock", "host", "async with lock (one process)",
            _async_with(runner, lambda: aio)),
        Row("flock", "fcntl.flock", "host", "flock(LOCK_EX) / flock(LOCK_UN), tmpfs file",
            _sync_with(flock)),
        Row("mp", "multiprocessing.Lock", "host", "with lock (a semaphore)", _sync_with(mp_lock)),
    ]  # fmt: skip


# -- host, two processes contending --------------------------------------------------------------


@dataclasses.dataclass
class Contended:
    """Acquisitions of each process over the same seconds."""

    candidate: str
    counts: list[int]
    seconds: float

    @property
    def min_share(self) -> float:
        """The smaller process's share of all acquisitions."""
        return min(self.counts) / max(1, sum(self.counts))


def _contend(take: Callable[[], Any], seconds: float, barrier: Any, out: Connection) -> None:
    lock = take()  # in the child: its own file description, ...
    barrier.wait(60)
    end, n = time.monotonic() + seconds, 0
    if asyncio.iscoroutinefunction(lock):  # one acquisition, awaited

        async def main() -> int:
            count = 0
            while time.monotonic() < end:
                await lock()
                count += 1
            return count

        n = asyncio.run(main())
    else:
        while time.monotonic() < end:
            with lock:
                _work()
            n += 1
    out.send(n)
    out.close()


def _work() -> None:
    stop = time.perf_counter() + HOLD
    while time.perf_counter() < stop:
        pass


def _contended(name: str, take: Callable[[], Any], seconds: float) -> Contended:
    barrier = _FORK.Barrier(3)
    pipes = [_FORK.Pipe(duplex=False) for _ in range(2)]
    procs = [_FORK.Process(target=_contend, args=(take, seconds, barrier, w)) for _, w in pipes]
    for p in procs:
        p.start()
    barrier.wait(60)
    counts = [r.recv() for r, _ in pipes]
    for p in procs:
        p.join(30)
    return Contended(name, counts, seconds)


def _contended_all(tmp: str, seconds: float) -> list[Contended]:
    from zeal_asgi import Store, Zeal

    zeal = Zeal(store=Store("table"))  # made before the fork: the children share its memory
    name = f"bench-{uuid.uuid4().hex[:8]}"

    def zeal_take() -> Callable[[], Any]:
        async def once() -> None:
            async with zeal.lock(name, TTL):
                _work()

        return once

    mp_lock = _FORK.Lock()
    return [
        _contended("zeal.lock (host)", zeal_take, seconds),
        _contended("fcntl.flock", lambda: _Flock(f"{tmp}/contended"), seconds),
        _contended("multiprocessing.Lock", lambda: mp_lock, seconds),
    ]


def _contended_table(rows: Sequence[Contended]) -> str:
    lines = [
        "| Candidate | acquisitions/s (both) | process A | process B | smaller share |",
        "|---|---:|---:|---:|---:|",
    ]
    for c in rows:
        a, b = c.counts
        total = fmt_ops((a + b) / c.seconds)
        lines.append(f"| {c.candidate} | {total} | {a:,} | {b:,} | {c.min_share:.0%} |")
    return "\n".join(lines)


# -- cluster -------------------------------------------------------------------------------------


def _cluster_rows(runner: AsyncRunner, url: str, cleanup: contextlib.ExitStack) -> list[Row]:
    from zeal_asgi import Store, Zeal

    name = f"bench-{uuid.uuid4().hex[:8]}"
    zeal = Zeal(store=Store("redis", {"url": url}))
    runner.run(zeal.startup())
    cleanup.callback(lambda: runner.run(zeal.shutdown()))
    aioredis = need("redis.asyncio", "redis").Redis.from_url(url)
    cleanup.callback(lambda: runner.run(aioredis.aclose()))
    rows = [
        Row(
            "zeal",
            "zeal",
            "cluster",
            'async with zeal.lock(name, ttl=30, scope="cluster")',
            _async_with(runner, lambda: zeal.lock(name, TTL, scope="cluster")),
        ),
        Row(
            "redis-py",
            "redis-py",
            "cluster",
            "async with r.lock(name, timeout=30)",
            _async_with(runner, lambda: aioredis.lock(name + ":py", timeout=TTL)),
        ),
    ]
    try:
        pottery = need("pottery")
        redlock = pottery.AIORedlock(
            key=name + ":pottery", masters={aioredis}, auto_release_time=TTL
        )
        loop = _async_with(runner, lambda: redlock)
    except NotInstalled as exc:

        def loop(n: int, exc: NotInstalled = exc) -> None:
            raise exc

    rows.append(Row("pottery", "pottery", "cluster", "async with AIORedlock(...)", loop))
    return rows


# -- the suite -----------------------------------------------------------------------------------


def _find(results: Sequence[Result], cid: str, op: str) -> Result | None:
    return next((r for r in results if (r.candidate_id, r.op, r.status) == (cid, op, "ok")), None)


def _targets(results: Sequence[Result], contended: Sequence[Contended]) -> list[Target]:
    out = []
    for cid, what in (("zeal", "async with zeal.lock"), ("zeal-lease", "the lease alone")):
        r = _find(results, cid, "host")
        figure = f"{fmt_ops(r.ops_per_s)}/s ({what})" if r and r.ops_per_s else "not measured"
        met = None if r is None or r.ops_per_s is None else r.ops_per_s >= 1e6
        out.append(Target("host lock acquire/release uncontended \u2265 1,000,000/s", figure, met))
    z = next((c for c in contended if c.candidate.startswith("zeal")), None)
    figure = f"{z.min_share:.0%} ({z.counts[0]:,} / {z.counts[1]:,})" if z else "not measured"
    out.append(Target("contended, 2 processes: each \u2265 30% of acquisitions", figure,
                      None if z is None else z.min_share >= 0.3))  # fmt: skip
    return out


@contextlib.contextmanager
def _redis_url() -> Iterator[str | None]:
    try:
        with redis_server() as server:
            yield server.url
    except NotInstalled as exc:
        log(f"[{NAME}] {exc}: cluster rows are skipped")
        yield None


def run(cfg: Config) -> SuiteReport:
    """Run the suite."""
    date, tools = now_utc(), {}
    if (version := redis_server_version()) is not None:
        tools["redis-server"] = version
    machine = machine_info(PACKAGES, tools)
    watch = CpuWatch.start()
    runner = AsyncRunner()
    seconds = 0.3 if cfg.quick else 3.0
    try:
        with shm_tempdir() as tmp, _redis_url() as url, contextlib.ExitStack() as cleanup:
            host = [r for r, _ in measure_rows(NAME, _host_rows(runner, tmp, cleanup), cfg)]
            contended = _contended_all(tmp, seconds)
            cluster = [] if url is None else _cluster_rows(runner, url, cleanup)
            remote = [r for r, _ in measure_rows(NAME, cluster, cfg)]
    finally:
        runner.close()
    machine["background"] = watch.stop()
    machine["event_loop"] = runner.kind
    results = host + remote
    targets = _targets(results, contended)

    def ref(op: str) -> Callable[[Result], float | None]:
        zeal = _find(results, "zeal", op)
        return lambda r: zeal.ops_per_s if zeal else None

    body = "\n\n".join(
        [
            f"Reproduce: `python -m bench locks` (~1 min; `--quick`: seconds). Async rows run "
            f"one coroutine in one event loop ({runner.kind}); median of {cfg.reps} reps. The "
            f"ratio column is zeal's ops/s over the row's.",
            "### Host lock, uncontended (one process)\n\n"
            + row_table(host, ref("host"), f"zeal {TIMES}"),
            f"### Host lock, two processes contending (~{HOLD * 1e6:.0f} us held, "
            f"{seconds:g} s)\n\n" + _contended_table(contended),
            "### Cluster lock round trips (one private redis-server)\n\n"
            + (row_table(remote, ref("cluster"), f"zeal {TIMES}") if remote else "not measured"),
            "### Targets\n\n" + target_table(targets),
            "Where the uncontended time goes: a free lock is taken in one compiled call (the "
            "waiting-turn check, the lease's compare-and-set and the fencing counter, under the "
            "row's lock, with the columns looked up once and the pid kept in C) and given back in "
            "one more, without an await. The rest of the block is compiled as well "
            "(`zeal_asgi/locks/_fast.pyx`): `zeal.lock()` checking its arguments and making the "
            "context (for a host lock on a name checked before, with no timeout; other calls go "
            "through Python), the lease object (with a read of the event loop's clock for its "
            "renewal), the per-process owner entry, the renewal check (the event loop's one "
            "timer moves only when this lease is due before it) and the running task, kept in "
            "the task's context because asyncio's `current_task()` makes a `getpid` system call "
            "on CPython 3.11. The context's enter and exit hand the interpreter awaitables that "
            "are already done, so a block makes no coroutine; what is left in Python is `async "
            "with` itself and `Zeal.lock`'s call. Waiting, queueing and renewal stay in Python "
            "(`zeal_asgi/locks/lock.py`). Contended, a waiting process polls (at most every "
            "2 ms, so a dead holder is "
            "noticed as fast), which is why fewer acquisitions change hands per second than with "
            "the kernel's own queues.",
        ]
    )
    extra = {
        "targets": [dataclasses.asdict(t) for t in targets],
        "contended": [dataclasses.asdict(c) for c in contended],
        "median_background": statistics.median([r.background or 0.0 for r in results] or [0]),
    }
    return SuiteReport(NAME, TITLE, date, machine, cfg, results, body, extra)
