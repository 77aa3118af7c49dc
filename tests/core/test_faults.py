"""Fault experiments on the shared-memory core (reliability.md §6): E1, E2, E3.

Processes are SIGKILLed at random points and at deterministic crash points compiled into the C
code (``ZEAL_CRASH_AT``), or SIGSTOPped while holding a row lock.  Each experiment prints its
``EXPERIMENT ... | PASS`` line and asserts the pass criterion.  Quick mode by default; the long
mode (ZEAL_TEST_LONG=1) runs each for the full duration of the plan.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import random
import signal
import statistics
import time
import zlib
from collections.abc import Callable
from multiprocessing.process import BaseProcess

import pytest

from tests._harness.sched import Stopwatch
from tests.conftest import quick_or_long
from tests.core import crashpoints
from zeal_asgi import Atomic, Table
from zeal_asgi.errors import LockTimeoutError
from zeal_asgi.shm import _shmtable

CTX = mp.get_context("fork")
CP_UPDATE_AFTER_ODD = crashpoints.UPDATE_AFTER_ODD
CP_UPDATE_MID = crashpoints.UPDATE_MID
CP_INSERT_BUSY = crashpoints.INSERT_BUSY
CP_INSERT_UNPUBLISHED = crashpoints.INSERT_UNPUBLISHED
CP_DELETE_FREED = crashpoints.DELETE_FREED
CP_DELETE_MID_SHIFT = crashpoints.DELETE_MID_SHIFT


def _report(name: str, params: str, metrics: dict[str, object], ok: bool) -> None:
    body = " ".join(f"{k}={v}" for k, v in metrics.items())
    print(f"\nEXPERIMENT {name} | {params} | {body} | {'PASS' if ok else 'FAIL'}")


# -- E1: counters under SIGKILL ---------------------------------------------------------------


def _e1_worker(kind: str, name: str, acks_name: str, slot: int) -> None:
    acks = Table(64, {"n": ("int", 8)}, name=acks_name)
    if kind == "atomic":
        a = Atomic(0, name=name)
        while True:
            a.increment()
            acks.incr(f"s{slot}", "n")  # acknowledged only once the increment returned
    t = Table(16, {"hits": ("int", 8), "tag": ("string", 16)}, name=name)
    while True:
        t.incr("hot", "hits")
        acks.incr(f"s{slot}", "n")


@pytest.mark.parametrize("kind", ["atomic", "row"])
def test_e1_counter_under_sigkill(
    kind: str, make_table: Callable[..., Table], make_atomic: Callable[..., Atomic]
) -> None:
    duration = quick_or_long(6.0, 20.0)
    n_procs = 6
    acks = make_table(64, {"n": ("int", 8)})
    if kind == "atomic":
        counter_name = make_atomic(0).name
    else:
        counter_name = make_table(16, {"hits": ("int", 8), "tag": ("string", 16)}).name
    rnd = random.Random(1)

    def spawn(slot: int) -> BaseProcess:
        p = CTX.Process(target=_e1_worker, args=(kind, counter_name, acks.name, slot), daemon=True)
        p.start()
        return p

    procs = [spawn(i) for i in range(n_procs)]
    kills = 0
    # The heartbeat gap is how long the total was *seen* unchanged (from the first sample that
    # read a value to the latest one that still reads it): the parent samples once per
    # kill-and-respawn, which a loaded machine slows to a few per second, and the time between
    # two samples that both saw progress is the parent's own delay, not a stall of the workers.
    max_gap = 0.0
    last_total, first_seen = 0, time.monotonic()
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            time.sleep(rnd.uniform(0.001, 0.020))
            slot = rnd.randrange(n_procs)
            os.kill(procs[slot].pid or 0, signal.SIGKILL)
            procs[slot].join()
            kills += 1
            procs[slot] = spawn(slot)
            total = sum(r["n"] for _, r in acks.items())
            now = time.monotonic()
            if total != last_total:
                last_total, first_seen = total, now
            max_gap = max(max_gap, now - first_seen)
    finally:
        for p in procs:
            if p.is_alive():
                os.kill(p.pid or 0, signal.SIGKILL)
                kills += 1  # these may land between an increment and its ack as well
            p.join()
    acked = sum(r["n"] for _, r in acks.items())
    if kind == "atomic":
        a = Atomic(0, name=counter_name)
        final = a.get()
        a.close()
    else:
        t = Table(16, {"hits": ("int", 8), "tag": ("string", 16)}, name=counter_name)
        final = t.get("hot", "hits")
        stats = t.stats()
        t.close()
    ok = acked <= final <= acked + kills and max_gap < 1.0
    _report(
        f"E1-{kind}",
        f"{n_procs} procs, {duration:.0f} s, kill every U(1,20) ms",
        {
            "final": final,
            "acked": acked,
            "kills": kills,
            "final-acked": final - acked,
            "ops/s": int(final / duration),
            "max_gap_s": round(max_gap, 3),
        },
        ok,
    )
    assert acked > 1000, "the workers made no progress"
    assert acked <= final <= acked + kills
    assert max_gap < 1.0
    if kind == "row":
        assert stats["rows_lost"] == 0, "an increment is one word: a kill never loses the row"


# -- E2: rows under SIGKILL mid-write ---------------------------------------------------------

ROWS = 200
E2_COLS = {"writer": ("int", 4), "seq": ("int", 8), "payload": ("string", 48), "crc": ("int", 8)}


def _payload(writer: int, seq: int) -> tuple[str, int]:
    body = f"{writer}:{seq}:" + "x" * ((writer * 7 + seq) % 30)
    return body, zlib.crc32(f"{writer}|{seq}|{body}".encode())


def _e2_writer(name: str, writer: int, crash: str | None) -> None:
    if crash:
        point, nth = crash.split(":")
        _shmtable._set_crashpoint(int(point), int(nth), int(signal.SIGKILL))
    t = Table(ROWS, E2_COLS, name=name, lock_timeout=5.0)
    rnd = random.Random(os.getpid())
    seq = 0
    while True:
        seq += 1
        k = f"r{rnd.randrange(ROWS)}"
        op = rnd.random()
        if op < 0.08:
            t.delete(k)
        else:
            body, crc = _payload(writer, seq)
            t.set(k, {"writer": writer, "seq": seq, "payload": body, "crc": crc})


def _e2_reader(name: str, out_name: str, slot: int) -> None:
    t = Table(ROWS, E2_COLS, name=name, lock_timeout=5.0)
    out = Table(8, {"reads": ("int", 8), "torn": ("int", 8), "max_us": ("int", 8)}, name=out_name)
    rnd = random.Random(slot)
    reads = torn = 0
    worst = 0
    while True:
        t0 = time.perf_counter()
        if rnd.random() < 0.01:
            rows = [r for _, r in t.items()]
        else:
            r = t.get(f"r{rnd.randrange(ROWS)}")
            rows = [] if r is None else [r]
        worst = max(worst, int((time.perf_counter() - t0) * 1e6))
        for r in rows:
            reads += 1
            body, crc = _payload(r["writer"], r["seq"])
            if r["payload"] != body or r["crc"] != crc:
                torn += 1
        if reads % 200 == 0:
            out.set(f"s{slot}", {"reads": reads, "torn": torn, "max_us": worst})


def test_e2_rows_under_sigkill_mid_write(make_table: Callable[..., Table]) -> None:
    crashpoints.require()
    duration = quick_or_long(8.0, 20.0)
    t = make_table(ROWS, E2_COLS, lock_timeout=5.0)
    out = make_table(8, {"reads": ("int", 8), "torn": ("int", 8), "max_us": ("int", 8)})
    rnd = random.Random(2)
    points = [
        CP_UPDATE_AFTER_ODD,
        CP_UPDATE_MID,
        CP_INSERT_BUSY,
        CP_INSERT_UNPUBLISHED,
        CP_DELETE_FREED,
        CP_DELETE_MID_SHIFT,
    ]
    writer_seq = iter(range(1, 1_000_000))

    def spawn_writer(crash: str | None) -> BaseProcess:
        p = CTX.Process(target=_e2_writer, args=(t.name, next(writer_seq), crash), daemon=True)
        p.start()
        return p

    readers = [
        CTX.Process(target=_e2_reader, args=(t.name, out.name, i), daemon=True) for i in range(2)
    ]
    for r in readers:
        r.start()
    writers = [spawn_writer(None) for _ in range(3)]
    kills = crash_kills = 0
    recover_times: list[float] = []
    end = time.monotonic() + duration
    try:
        while time.monotonic() < end:
            time.sleep(rnd.uniform(0.001, 0.020))
            victim = writers[rnd.randrange(len(writers))]
            if victim.is_alive():
                os.kill(victim.pid or 0, signal.SIGKILL)
                kills += 1
                victim.join()
            t0 = time.monotonic()
            before = t.stats()["inserts"] + t.stats()["deletes"]
            for i, w in enumerate(writers):
                if w.is_alive():
                    continue
                w.join()
                if w is not victim:
                    crash_kills += 1  # died at its deterministic crash point
                # every other respawn dies at a crash point inside a write, after a few writes
                crash = None
                if (kills + crash_kills) % 2 == 0:
                    crash = f"{rnd.choice(points)}:{rnd.randrange(1, 50)}"
                writers[i] = spawn_writer(crash)
            # time from a death to the next successful structural write by anyone
            while t.stats()["inserts"] + t.stats()["deletes"] == before:
                if time.monotonic() - t0 > 2.0:
                    break
                time.sleep(0.0005)
            recover_times.append(time.monotonic() - t0)
    finally:
        for p in writers + readers:
            if p.is_alive():
                os.kill(p.pid or 0, signal.SIGKILL)
            p.join()
    rows = {k: r for k, r in out.items()}
    reads = sum(r["reads"] for r in rows.values())
    torn = sum(r["torn"] for r in rows.values())
    max_read_us = max((r["max_us"] for r in rows.values()), default=0)
    st = t.stats()
    # the table is still a consistent table: count, iteration and lookups agree
    live = dict(t.items())
    assert len(live) == len(t)
    for k, r in live.items():
        assert t.get(k) == r
        body, crc = _payload(r["writer"], r["seq"])
        assert r["payload"] == body and r["crc"] == crc
    deaths = kills + crash_kills
    p99 = statistics.quantiles(recover_times, n=100)[98] if len(recover_times) > 2 else 0.0
    ok = torn == 0 and st["rows_lost"] <= deaths and max(recover_times) < 1.0
    _report(
        "E2",
        f"3 writers + 2 readers, {ROWS} rows, {duration:.0f} s",
        {
            "kills": kills,
            "crashpoint_deaths": crash_kills,
            "recoveries": st["lock_recoveries"],
            "rows_lost": st["rows_lost"],
            "torn_reads": torn,
            "reads": reads,
            "max_read_ms": round(max_read_us / 1000, 1),
            "recover_p50_ms": round(statistics.median(recover_times) * 1000, 2),
            "recover_p99_ms": round(p99 * 1000, 2),
            "recover_max_ms": round(max(recover_times) * 1000, 2),
        },
        ok,
    )
    assert reads > 1000
    assert torn == 0
    assert st["rows_lost"] <= deaths
    assert st["lock_recoveries"] > 0, "no kill landed inside a lock: the experiment proved nothing"
    assert max(recover_times) < 1.0


# -- E3: a stopped holder gives LockTimeoutError, never a second writer -------------------------


def _e3_holder(name: str) -> None:
    _shmtable._set_crashpoint(CP_UPDATE_AFTER_ODD, 1, int(signal.SIGSTOP))
    t = Table(16, {"v": ("int", 8), "s": ("string", 8)}, name=name)
    t.set("hot", {"v": 1, "s": "held"})  # stops itself inside the write, holding the lock
    t.close()


def test_e3_stopped_holder(make_table: Callable[..., Table]) -> None:
    crashpoints.require()
    timeout = 0.5
    t = make_table(16, {"v": ("int", 8), "s": ("string", 8)}, lock_timeout=timeout)
    t.set("hot", {"v": 0, "s": "init"})
    t.set("other", {"v": 5})
    holder = CTX.Process(target=_e3_holder, args=(t.name,), daemon=True)
    holder.start()
    try:
        deadline = time.monotonic() + 5
        while True:  # wait until the holder is stopped inside its write
            with open(f"/proc/{holder.pid}/stat") as f:
                if f.read().split(") ")[1][0] == "T":
                    break
            assert time.monotonic() < deadline, "holder never reached its crash point"
            time.sleep(0.01)
        # early: on the wall clock (a timeout never ends early); late: less the time this
        # thread waited for a CPU once the timeout had passed (a loaded machine's, not ours)
        errors: list[float] = []
        for _ in range(4):
            watch = Stopwatch()
            with pytest.raises(LockTimeoutError, match="not force-unlocked"):
                t.set("hot", {"v": 99, "s": "second"})
            wall, own = watch.wall() - timeout, watch.own() - timeout
            errors.append(wall if wall < 0 else max(0.0, own))
        with pytest.raises(LockTimeoutError):
            t.incr("hot", "v")
        # A reader cannot see the half-written row either: it waits for that row's writer only,
        # then gets the same typed error; every other row is served meanwhile.
        watch = Stopwatch()
        with pytest.raises(LockTimeoutError):
            t.get("hot")
        assert watch.own() < timeout + 0.1
        assert t.get("other", "v") == 5
        os.kill(holder.pid or 0, signal.SIGCONT)
        holder.join(5)
        assert holder.exitcode == 0
        assert t.get("hot") == {"v": 1, "s": "held"}  # the holder finished its own write
        assert t.incr("hot", "v") == 2  # progress resumes
        st = t.stats()
        ok = all(-0.005 <= e <= 0.05 for e in errors) and st["lock_recoveries"] == 0
        _report(
            "E3",
            f"holder SIGSTOPped in a write, lock_timeout={timeout}s",
            {
                "lock_timeouts": st["lock_timeouts"],
                "accuracy_ms": [round(e * 1000, 1) for e in errors],
                "force_unlocks": 0,
                "writes_after_sigcont": 1,
            },
            ok,
        )
        assert all(-0.005 <= e <= 0.05 for e in errors), errors
        assert st["lock_recoveries"] == 0
    finally:
        if holder.is_alive():
            os.kill(holder.pid or 0, signal.SIGCONT)
            os.kill(holder.pid or 0, signal.SIGKILL)
        holder.join()
