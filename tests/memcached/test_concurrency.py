"""Concurrent increments from many tasks and two processes: exact totals, nothing lost."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

import pytest

from tests._harness.servers import Memcached
from tests.memcached._hammer import declare, hammer
from zeal_asgi.shm.segments import server_identity
from zeal_asgi.store import Store

pytestmark = pytest.mark.memcached

ROOT = Path(__file__).resolve().parents[2]
TASKS, PER_TASK, PROCS = 12, 15, 2


async def test_tasks_and_processes_lose_no_update(
    store: Store, memcached_server: Memcached, prefix: str
) -> None:
    counter = declare(store)
    await store.ping()  # creates this host's stats segment before the workers attach to it
    # The workers join this process's server, so their counters add up in its host stats.
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "ZEAL_SERVER_ID": server_identity().server_id,
        "ZEAL_SERVER_OWNER_PID": str(os.getpid()),
    }
    start = time.perf_counter()
    argv = ["-m", "tests.memcached._hammer", memcached_server.url, prefix, str(TASKS)]
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable,
            *argv,
            str(PER_TASK),
            cwd=ROOT,
            env=env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        for _ in range(PROCS)
    ]
    try:
        await hammer(store, counter, TASKS, PER_TASK)
        outputs = [await asyncio.wait_for(p.communicate(), 60) for p in procs]
    finally:
        for p in procs:
            if p.returncode is None:
                p.kill()
                await p.communicate()
    elapsed = time.perf_counter() - start
    for p, (out, err) in zip(procs, outputs, strict=True):
        assert p.returncode == 0 and out.strip() == b"ok", err.decode()

    rounds = (PROCS + 1) * TASKS * PER_TASK
    multi = await store.get_strict("multi", "hot")
    single = await store.get_strict("single", "hot", "n")
    total = await counter.get()
    stats = store.stats()["memcached"]  # host totals, and this worker's under "worker"
    worker = stats["worker"]
    print(
        f"EXPERIMENT memcached concurrent incr | {PROCS + 1} processes x {TASKS} tasks x "
        f"{PER_TASK} | expected={rounds} cas_row={multi['n']} float_row={multi['f']} "
        f"native_row={single} counter={-total} cas_retries={stats.get('cas_retries_total', 0)} "
        f"elapsed={elapsed:.2f}s | "
        + ("PASS" if (multi["n"], single, -total) == (rounds,) * 3 else "FAIL")
    )
    assert multi == {"n": rounds, "f": rounds * 0.5, "s": ""}
    assert single == rounds
    assert total == -rounds  # +1 then -2 per round: below zero throughout
    # Every round is at least 5 commands; the other processes' ones show in the host total.
    assert stats["ops_total"] >= worker["ops_total"] + 5 * PROCS * TASKS * PER_TASK


async def test_concurrent_merges_keep_every_column(store: Store) -> None:
    store.make("wide", 16, {f"c{i}": (Store.TYPE_INT,) for i in range(20)})
    await asyncio.gather(*(store.set("wide", "k", {f"c{i}": i + 1}) for i in range(20)))
    assert await store.get_strict("wide", "k") == {f"c{i}": i + 1 for i in range(20)}


async def test_concurrent_compare_and_set_has_one_winner(store: Store) -> None:
    store.make("lock", 16, {"owner": (Store.TYPE_STRING, 16), "n": (Store.TYPE_INT,)})
    store.make("lock1", 16, {"n": (Store.TYPE_INT,)})
    wins = await asyncio.gather(
        *(store.compare_and_set("lock", "k", "owner", "", f"t{i}") for i in range(30))
    )
    assert sum(wins) == 1
    native_wins = await asyncio.gather(
        *(store.compare_and_set("lock1", "k", "n", 0, i + 1) for i in range(30))
    )
    assert sum(native_wins) == 1
