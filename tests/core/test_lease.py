"""The shared-memory lease (``zeal_asgi.shm.lease``) and the process-liveness check it uses."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

from zeal_asgi import Table
from zeal_asgi.shm.lease import Lease, pack, unpack
from zeal_asgi.shm.process import process_alive, process_start_time

MakeTable = Callable[..., Table]
COLS = {"owner": ("int", 8)}


def _exited_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_liveness_knows_the_dead_the_zombies_and_reused_pids() -> None:
    me = os.getpid()
    assert process_alive(me) and process_alive(me, process_start_time(me))
    assert not process_alive(me, (process_start_time(me) or 0) + 1), "a reused pid is not it"
    assert not process_alive(_exited_pid()) and not process_alive(0) and not process_alive(-1)
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    deadline = time.monotonic() + 10
    while Path(f"/proc/{zombie.pid}/stat").read_text().split(") ")[1][0] != "Z":
        assert time.monotonic() < deadline
        time.sleep(0.01)
    assert not process_alive(zombie.pid), "a zombie runs no code: it counts as dead"
    zombie.wait()


def test_one_holder_at_a_time_renew_and_release(make_table: MakeTable) -> None:
    lease = Lease(make_table(16, COLS), 5.0)
    token = lease.acquire("job")
    assert token is not None and lease.holder("job") == os.getpid()
    assert lease.acquire("job") is None, "not re-entrant: a second caller waits"
    time.sleep(0.002)  # a renewed token has a later deadline
    renewed = lease.renew("job", token)
    assert renewed is not None and unpack(renewed)[0] > unpack(token)[0]
    assert lease.renew("job", token) is None, "a stale token renews nothing"
    assert lease.release("job", renewed) and lease.holder("job") is None
    again = lease.acquire("job")
    assert again is not None and lease.release("job", again, delete=True)
    assert lease.table.get("job") is None


def test_a_dead_or_expired_holder_is_taken_over_at_once(make_table: MakeTable) -> None:
    table = make_table(16, COLS)
    lease = Lease(table, 5.0)
    far = int(time.monotonic() * 1000) + 3_600_000
    table.set("dead", {"owner": pack(far, _exited_pid())})
    table.set("late", {"owner": pack(1, os.getppid())})  # alive, but its deadline passed
    assert lease.holder("dead") is None and lease.acquire("dead") is not None
    assert lease.acquire("late") is not None
    assert Lease.stale(0) and not Lease.stale(pack(far, os.getpid()))


def _child_tries(lease: Lease, token: int) -> None:
    ok = lease.renew("job", token) is None and not lease.release("job", token)
    os._exit(0 if ok and lease.acquire("job") is None else 1)


def test_a_forked_child_neither_renews_nor_releases_its_parents_lease(
    make_table: MakeTable,
) -> None:
    lease = Lease(make_table(16, COLS), 5.0)
    token = lease.acquire("job")
    assert token is not None
    child = mp.get_context("fork").Process(target=_child_tries, args=(lease, token))
    child.start()
    child.join(10)
    assert child.exitcode == 0 and lease.holder("job") == os.getpid()
