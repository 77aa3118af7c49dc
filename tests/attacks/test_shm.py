"""Issue 12, shared memory: memfd under every server model, a row naming a column twice, TTL
increments right after expiry, the count after a kill mid-delete, squatted bus wake-up names
(a second Unix user), host stats over hundreds of worker restarts."""

from __future__ import annotations

import asyncio
import http.client
import multiprocessing as mp
import os
import pwd
import random
import secrets
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._harness.apps import REPO, AppServer, AppServers
from tests._harness.sched import Stopwatch
from tests.core import crashpoints
from zeal_asgi import Store, Table
from zeal_asgi.shm.bus import close_host_bus
from zeal_asgi.shm.hoststats import HostStats
from zeal_asgi.shm.segments import server_identity

MakeTable = Callable[..., Table]
FORK = mp.get_context("fork")


def _python(code: str, **env: str) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    full.update(PYTHONPATH=str(REPO), **env)
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=full,
        capture_output=True,
        text=True,
        timeout=120,
    )


# -- item 1: memfd under the five server models ----------------------------------------------------


APP = "tests.core.apps.shared_app:app"
MEMFD = {"ZEAL_SHM_BACKEND": "memfd"}


@pytest.mark.servers
@pytest.mark.parametrize(
    ("kind", "workers"), [("uvicorn", 1), ("launcher", 2), ("gunicorn-preload", 2)]
)
def test_memfd_is_shared_by_workers_of_a_master_that_allocates_it(
    app_servers: AppServers, kind: str, workers: int
) -> None:
    """Item 1: where the master allocates the memory, every worker shares it."""
    s = app_servers.start(APP, server=kind, workers=workers, env=MEMFD)
    assert s.get("/segments")["paths"] == [], "memfd segments have no name"
    value = uuid.uuid4().hex
    writer = s.get("/put", k="key", v=value)["pid"]
    reader = s.get_from("/get", avoid=writer if workers > 1 else None, k="key")
    assert reader["v"] == value, "a write in one worker is read in another"
    seen = [s.get("/incr") for _ in range(60)]
    assert sorted(r["n"] for r in seen) == list(range(1, 61)), "one counter, exact"
    assert len({r["pid"] for r in seen}) == workers
    assert s.stop() in (0, -signal.SIGTERM), s.log_text()


def _answers(s: AppServer) -> bool:
    try:
        status, _ = s.fetch("/incr", timeout=2.0)
    except (OSError, http.client.HTTPException):
        return False
    return status == 200


@pytest.mark.servers
@pytest.mark.parametrize("kind", ["uvicorn-workers", "gunicorn"])
def test_memfd_is_refused_where_workers_cannot_share_it(kind: str) -> None:
    """Item 1: uvicorn --workers and gunicorn without --preload start workers whose master never
    imported the app: each would hold a private copy, so every worker refuses to start."""
    s = AppServer(APP, server=kind, workers=2, env=MEMFD).launch()
    try:
        deadline = time.monotonic() + 60
        while "PrivateCopyError" not in s.log_text():
            assert time.monotonic() < deadline, s.log_text()
            assert not _answers(s), "a worker served a request with a private copy"
            time.sleep(0.1)
        assert "ZEAL_SHM_BACKEND=memfd" in s.log_text()
        assert not _answers(s), "a worker served a request with a private copy"
    finally:
        s.stop()


# -- item 2: a row that names a column twice -------------------------------------------------------

TWICE = """
import sys
from zeal_asgi import Table
from zeal_asgi.errors import ColumnTypeError

class Alias(str):
    # equal to "i8" (so the table's column lookup finds it) but not to another Alias
    def __eq__(self, other):
        return other is self or str.__eq__(self, other) and type(other) is str
    __hash__ = str.__hash__

t = Table(8, {"i8": ("int", 8), "s": ("string", 8)})
t.set("k", {"i8": 7, "s": "kept"})
row = {Alias("i8"): i for i in range(65)}
assert len(row) == 65
try:
    t.set("k", row)
except ColumnTypeError as exc:
    print("refused:", exc)
print(t.get("k"))
wide = Table(4, {"s": ("string", 4000), "n": ("int", 8)})  # rows larger than a stack copy
wide.set("w", {"s": "x" * 4000})
print(wide.exists("w"), wide.exists("nope"), len(wide.get("w")["s"]))
"""


def test_a_row_naming_a_column_twice_is_refused_and_the_row_kept() -> None:
    """Item 2: 65 str-subclass keys equal to one column overflowed the 64 deltas (SIGSEGV);
    ``exists`` on rows over 2 KiB overflowed a stack copy."""
    proc = _python(TWICE)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("refused: a row of table None names column 'i8' twice")
    assert lines[1:] == ["{'i8': 7, 's': 'kept'}", "True False 4000"]


# -- item 3: TTL rows right after expiry -----------------------------------------------------------

BURST = 40
KEYS = [f"k{i}" for i in range(10)]


class Descheduled:
    """A table as a busy host runs it: its process may lose the CPU between any two calls."""

    def __init__(self, table: Table) -> None:
        self.table = table

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.table, name)
        if not callable(attr):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            time.sleep(random.uniform(0, 0.002))
            return attr(*args, **kwargs)

        return call


def _ttl_bursts(bursts: int, out: Any, go: Any) -> None:
    async def run() -> None:
        store = Store("table")
        store.make("hits", 64, {"n": (Store.TYPE_INT, 8)}, mode="ttl", ttl=1)
        backend: Any = store.backend
        slow = Descheduled(backend.table("hits"))
        backend.table = lambda name: slow
        for _ in range(bursts):
            go.wait()  # both processes start each burst together, right after the expiry
            got: dict[str, list[int]] = {k: [] for k in KEYS}
            for _ in range(4):
                for k in KEYS:
                    got[k].append(int(await store.incr("hits", k, "n")))
            out.put(got)

    asyncio.run(run())


def test_ttl_increments_right_after_expiry_are_exact() -> None:
    """Item 3: two processes incrementing the keys of a mode="ttl" table in bursts right after
    they expired, each losing the CPU at random between its calls into shared memory: every
    burst counts each key 1..8 exactly once (no duplicate, none lost)."""
    bursts = 3
    store = Store("table")
    store.make("hits", 64, {"n": (Store.TYPE_INT, 8)}, mode="ttl", ttl=1)
    out, go = FORK.Queue(), FORK.Barrier(3)
    procs = [FORK.Process(target=_ttl_bursts, args=(bursts, out, go)) for _ in range(2)]
    for p in procs:
        p.start()
    wrong = []
    try:
        for b in range(bursts):
            go.wait(30)
            one, two = out.get(timeout=60), out.get(timeout=60)
            for k in KEYS:
                if sorted(one[k] + two[k]) != list(range(1, 9)):
                    wrong.append((b, k, one[k], two[k]))
            time.sleep(1.05)  # the rows expire 1 s after the burst's last write
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert wrong == []
    assert [p.exitcode for p in procs] == [0, 0]
    store.backend.close_all()  # type: ignore[attr-defined]


def _fast_bursts(name: str, bursts: int, out: Any, go: Any) -> None:
    t = Table(64, {"n": ("int", 8)}, name=name, ttl=0.03)
    for _ in range(bursts):
        go.wait()
        out.put([t.incr("k", "n") for _ in range(BURST)])


def test_table_ttl_rows_expire_and_restart_atomically(make_table: MakeTable) -> None:
    """Item 3, on the primitive the Store stands on: 150 bursts, 30 ms apart."""
    bursts = 150
    t = make_table(64, {"n": ("int", 8)}, ttl=0.03)
    out, go = FORK.Queue(), FORK.Barrier(3)
    procs = [FORK.Process(target=_fast_bursts, args=(t.name, bursts, out, go)) for _ in range(2)]
    for p in procs:
        p.start()
    bad = []
    try:
        for b in range(bursts):
            go.wait(30)
            got = sorted(out.get(timeout=30) + out.get(timeout=30))
            if got != list(range(1, 2 * BURST + 1)):
                bad.append((b, got))
            time.sleep(0.04)  # the row expires 30 ms after the burst's last write
    finally:
        for p in procs:
            p.join(30)
            if p.is_alive():
                p.kill()
    assert bad == []
    assert len(t) <= 1


# -- item 9: the count after a kill mid-delete -----------------------------------------------------


def _delete_and_die(table: Table) -> None:
    from zeal_asgi.shm import _shmtable

    _shmtable._set_crashpoint(crashpoints.DELETE_FREED, 1, int(signal.SIGKILL))
    table.delete("k2")


def test_count_is_right_after_a_kill_mid_delete(make_table: MakeTable) -> None:
    """Item 9: a writer SIGKILLed inside a delete left ``len`` one too high until the next
    insert or delete; the count is repaired where the dead writer's lock is recovered."""
    crashpoints.require()
    t = make_table(16, {"v": ("int", 8)})
    for i in range(5):
        t.set(f"k{i}", {"v": i})
    child = FORK.Process(target=_delete_and_die, args=(t,))
    child.start()
    child.join(10)
    assert child.exitcode == -signal.SIGKILL
    assert (len(t), t.count(), len(list(t.keys()))) == (4, 4, 4)
    # the dead writer held two locks: the global one and its key's stripe
    assert t.stats()["lock_recoveries"] == 2 and t.get("k2") is None


# -- item 6: bus wake-up names a second Unix user could squat --------------------------------------

SQUAT = """
import os, resource, socket, sys
uid, sid, first, count = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
for pid in range(first, first + count):
    for serial in (1, 2):  # the names a restarted worker's subscriber used to take
        s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            s.bind(f"\\0zeal.{uid}.{sid}.bus.{pid}.{serial}".encode())
        except OSError:
            s.close()
            continue
        held.append(s)
print(len(held), flush=True)
sys.stdin.read()
"""

SUBSCRIBER = """
import asyncio
from zeal_asgi import Zeal

zeal = Zeal()
got = asyncio.Event()
zeal.subscribe("news", lambda payload, channel: got.set())

async def main():
    async with zeal:
        print("ready", flush=True)
        await asyncio.wait_for(got.wait(), 30)
        print("got", flush=True)

asyncio.run(main())
"""


@pytest.fixture
def other_user() -> Iterator[pwd.struct_passwd]:
    """A second Unix user, made for the test and removed after it (needs root, as in CI)."""
    if os.geteuid() != 0:
        if os.environ.get("CI") == "true":
            pytest.fail("a second Unix user needs root")
        pytest.skip("a second Unix user needs root")
    name = f"zsq{secrets.token_hex(4)}"
    subprocess.run(["useradd", "-M", "-N", "-s", "/usr/sbin/nologin", name], check=True)
    try:
        yield pwd.getpwnam(name)
    finally:
        subprocess.run(["userdel", name], check=True)


def test_a_second_user_cannot_squat_bus_wakeup_names(
    other_user: pwd.struct_passwd,
) -> None:
    """Item 6: another user bound the abstract socket names a restarted worker's subscriber
    would take (uid, server id and pids are all visible); the worker must still bind, and a
    publish reach it at once."""
    sid = server_identity().server_id
    first = int(Path("/proc/sys/kernel/ns_last_pid").read_text()) + 1  # the next pids
    squatter = subprocess.Popen(
        [
            "setpriv",
            f"--reuid={other_user.pw_uid}",
            f"--regid={other_user.pw_gid}",
            "--clear-groups",
            "/usr/bin/python3",
            "-c",
            SQUAT,
            str(os.geteuid()),
            sid,
            str(first),
            "3000",
        ],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        cwd="/",
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "ZEAL_SERVER_ID": sid}
    worker = None
    try:
        assert squatter.stdout is not None
        assert int(squatter.stdout.readline()) > 1000, "the squatter holds the names"
        worker = subprocess.Popen(
            [sys.executable, "-c", SUBSCRIBER],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=REPO,
        )
        assert worker.stdout is not None
        assert worker.stdout.readline().strip() == b"ready", worker.stderr
        watch = Stopwatch(worker.pid)  # its wait for a CPU is not the bus's either
        assert asyncio.run(Store("table").publish("news", "x")) == 1
        assert worker.stdout.readline().strip() == b"got"
        assert watch.own() < 2.0
        _, err = worker.communicate(timeout=10)
        assert worker.returncode == 0 and b"Address already in use" not in err, err
    finally:
        for p in (worker, squatter):
            if p is not None:
                if p.poll() is None:
                    p.kill()
                p.communicate()  # closes its pipes
        close_host_bus()


# -- item 16: host stats over hundreds of worker restarts ------------------------------------------

METRICS = [f"m{i}" for i in range(8)]


def _worker_records(stats: HostStats, n: int) -> None:
    for m in METRICS:
        stats.incr(m, n)


def test_host_stats_stay_bounded_over_hundreds_of_worker_restarts(make_table: MakeTable) -> None:
    """Item 16: rows of dead workers were never removed, so after enough worker restarts new
    workers' counters silently stopped.  300 workers (real processes) of 8 counters each pass
    through a table of 256 rows: every count survives, in the host totals."""
    table = make_table(256, {"v": ("int", 8)})
    stats = HostStats(table)
    for n in range(1, 301):
        worker = FORK.Process(target=_worker_records, args=(stats, n))
        worker.start()
        worker.join(30)
        assert worker.exitcode == 0
    assert stats.host() == {m: sum(range(1, 301)) for m in METRICS}
    HostStats(table)  # a worker starting prunes what the last ones left
    assert stats.workers() == {0: {m: sum(range(1, 301)) for m in METRICS}}
    assert len(table) == len(METRICS)
