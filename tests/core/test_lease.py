"""The shared-memory lease (``zeal_asgi.shm.lease``) and the process-liveness check it uses."""

from __future__ import annotations

import multiprocessing as mp
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from zeal_asgi import Table
from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    InvalidTTLError,
    UnknownColumnError,
)
from zeal_asgi.shm import _shmtable
from zeal_asgi.shm.lease import BUSY_OWNER, BUSY_TURN, Lease, pack, unpack
from zeal_asgi.shm.process import current_pid, process_alive, process_start_time

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


FENCED = {"owner": ("int", 8), "fence": ("int", 8), "turn": ("int", 8), "name": ("str", 8)}


def _fenced(make_table: MakeTable, seconds: float = 5.0) -> Lease:
    table = make_table(16, FENCED)
    return Lease(table, seconds, fence="fence", turn="turn", turn_seconds=5.0)


def test_take_hands_out_a_fencing_token_with_the_lease_in_one_step(make_table: MakeTable) -> None:
    lease = _fenced(make_table)
    fences = []
    before = time.time_ns() // 1000
    for _ in range(3):
        fence, token = lease.take("job")
        assert lease.table.get("job", "owner") == token
        fences.append(fence)
        assert lease.take("job") == (BUSY_OWNER, token), "held: the holder's word comes back"
        assert lease.release("job", token) and lease.table.get("job", "owner") == 0
    after = time.time_ns() // 1000
    # A new row's fence is the wall clock in µs (a table made again by the next server run
    # still hands out higher tokens), then one more per take.
    assert before <= fences[0] <= after
    assert fences == [fences[0], fences[0] + 1, fences[0] + 2]
    assert lease.table.get("job", "fence") == fences[-1]


def test_a_waiting_turn_keeps_the_lease_for_its_process(make_table: MakeTable) -> None:
    lease = _fenced(make_table)
    table, far = lease.table, int(time.monotonic() * 1000) + 3_600_000
    fence, token = lease.take("job")
    other = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        # Held by us: we queue for it (our turn is written), and a live holder is never broken.
        assert lease.take("job") == (BUSY_OWNER, token)
        assert unpack(table.get("job", "turn"))[1] == os.getpid()
        assert lease.release("job", token)
        # Another live process waits for its turn: the free lease stays free for it.
        turn = pack(far, other.pid)
        table.set("job", {"turn": turn})
        assert lease.take("job") == (BUSY_TURN, turn) and table.get("job", "owner") == 0
        # Its turn ran out, or the process died: taken, and the turn cleared.
        table.set("job", {"turn": pack(1, other.pid)})
        assert lease.take("job")[0] == fence + 1 and table.get("job", "turn") == 0
        assert lease.release("job", table.get("job", "owner"))
        table.set("job", {"turn": turn})
        other.kill()
        other.wait()
        assert lease.take("job")[0] == fence + 2 and table.get("job", "turn") == 0
    finally:
        other.kill()
        other.wait()


def test_the_compiled_calls_refuse_bad_columns_and_arguments(make_table: MakeTable) -> None:
    table = make_table(16, {**FENCED, "small": ("int", 4)})
    for column in ("small", "name"):
        with pytest.raises(ColumnTypeError, match=column):
            Lease(table, 1.0, column).acquire("job")
        with pytest.raises(ColumnTypeError, match=column):
            Lease(table, 1.0, fence=column).acquire("job")
    with pytest.raises(UnknownColumnError, match="nope"):
        Lease(table, 1.0, "nope").acquire("job")
    with pytest.raises(InvalidTTLError):
        _shmtable.lease_acquire(table, "job", "owner", 0, os.getpid())
    for tag in (0, -1, 1 << 22):
        with pytest.raises(IntegerOverflowError):
            _shmtable.lease_acquire(table, "job", "owner", 1000, tag)
    table.set("job", {"fence": 2**63 - 1})
    with pytest.raises(IntegerOverflowError, match="fence"):
        Lease(table, 1.0, fence="fence").acquire("job")
    assert table.get("job") == {"owner": 0, "fence": 2**63 - 1, "turn": 0, "name": "", "small": 0}
    assert table.get("free") is None and not Lease(table, 1.0).release("free", pack(9, os.getpid()))


def _child_after_fork(lease: Lease, token: int) -> None:
    ok = current_pid() == os.getpid() != unpack(token)[1]
    ok = ok and lease.take("job") == (BUSY_OWNER, token) and not lease.release("job", token)
    os._exit(0 if ok else 1)


def test_a_child_forked_while_its_parent_holds_sees_its_own_pid(make_table: MakeTable) -> None:
    lease = _fenced(make_table)
    fence, token = lease.take("job")
    child = mp.get_context("fork").Process(target=_child_after_fork, args=(lease, token))
    child.start()
    child.join(10)
    assert child.exitcode == 0
    assert lease.table.get("job", "owner") == token and lease.table.get("job", "fence") == fence
    assert current_pid() == os.getpid() and lease.release("job", token)
