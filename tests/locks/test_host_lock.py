"""Host-scope ``zeal.lock``: fencing tokens, mutual exclusion across processes and coroutines,
a SIGKILLed holder frees the lock at once, a stopped one only after its ttl, renewal, loss,
fairness between two processes, waiting and typed errors."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import json
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
import weakref
from collections.abc import Callable
from multiprocessing.connection import Connection
from typing import Any

import pytest

from tests.conftest import quick_or_long
from zeal_asgi import Store, Table, Zeal
from zeal_asgi.errors import (
    ConfigError,
    InvalidKeyError,
    InvalidTTLError,
    KeyTooLongError,
    KeyTypeError,
    LockLostError,
    LockTimeoutError,
    UnsupportedOperationError,
    ZealError,
)
from zeal_asgi.locks.host import host_locks
from zeal_asgi.shm.lease import Lease

FORK: Any = mp.get_context("fork")


@pytest.fixture
def zeal() -> Zeal:
    return Zeal(store=Store("table"))


def unique() -> str:
    return f"lock-{uuid.uuid4().hex[:12]}"


async def test_tokens_strictly_increase_with_every_acquisition(zeal: Zeal) -> None:
    name = unique()
    tokens = []
    for _ in range(5):
        async with zeal.lock(name, ttl=5) as lease:
            tokens.append(lease.token)
            assert lease.name == name and lease.scope == "host" and not lease.lost
    assert tokens == sorted(set(tokens)) and tokens[0] >= 1


_SERVER_RUN = """
import asyncio, json, sys
from zeal_asgi import Store, Zeal
from zeal_asgi.locks.host import host_locks
from zeal_asgi.shm.segments import server_identity

async def main() -> None:
    zeal = Zeal(store=Store("table"))
    fresh = host_locks().table.get(sys.argv[1]) is None
    tokens = []
    for _ in range(3):
        async with zeal.lock(sys.argv[1], ttl=5) as lease:
            tokens.append(lease.token)
    print(json.dumps([server_identity().server_id, fresh, tokens]))

asyncio.run(main())
"""


def test_tokens_keep_rising_across_server_runs() -> None:
    """Each run of a server has its own lock table, which starts empty (its segments are removed
    when it exits): the next run's first token is still above the last run's last one."""
    name = unique()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_SERVER_")}
    runs = []
    for _ in range(2):
        out = subprocess.run(
            [sys.executable, "-c", _SERVER_RUN, name],
            env=env, capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        runs.append(json.loads(out.stdout))
    (first_server, first_fresh, first), (second_server, second_fresh, second) = runs
    assert first_server != second_server and first_fresh and second_fresh, runs
    assert first == sorted(set(first)) and second == sorted(set(second)), runs
    assert second[0] > first[-1], runs


async def test_a_held_lock_times_out_others(zeal: Zeal) -> None:
    name = unique()
    async with zeal.lock(name, ttl=5):
        for timeout in (0, 0.05):
            with pytest.raises(LockTimeoutError, match=name) as err:
                async with zeal.lock(name, ttl=5, timeout=timeout):
                    pass
            assert isinstance(err.value, TimeoutError)
    async with zeal.lock(name, ttl=5, timeout=0):
        pass  # free again


def _hammer(name: str, table: str, rounds: int, out: Connection) -> None:
    zeal = Zeal(store=Store("table"))
    shared = Table(4, {"inside": ("int", 4), "total": ("int", 8)}, name=table)

    async def one() -> tuple[int, list[int]]:
        overlaps, tokens = 0, []
        for _ in range(rounds):
            async with zeal.lock(name, ttl=10) as lease:
                overlaps += shared.incr("x", "inside") != 1
                total = shared.get("x", "total") or 0
                await asyncio.sleep(0)  # let the others run while we hold it
                shared.set("x", {"total": total + 1})
                tokens.append(lease.token)
                shared.decr("x", "inside")
        return overlaps, tokens

    async def main() -> None:
        results = await asyncio.gather(*(one() for _ in range(8)))
        tokens = sorted(t for _, ts in results for t in ts)
        out.send((sum(o for o, _ in results), tokens))

    asyncio.run(main())


def test_two_processes_of_8_coroutines_exclude_each_other(
    make_table: Callable[..., Table],
) -> None:
    rounds = int(quick_or_long(100, 2000))
    shared = make_table(4, {"inside": ("int", 4), "total": ("int", 8)})
    name = unique()
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    procs = [FORK.Process(target=_hammer, args=(name, shared.name, rounds, w)) for _, w in pipes]
    for p in procs:
        p.start()
    results = [r.recv() for r, _ in pipes]
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    assert [overlaps for overlaps, _ in results] == [0, 0]
    assert shared.get("x", "total") == 2 * 8 * rounds  # no update lost to a second holder
    tokens = results[0][1] + results[1][1]
    assert len(set(tokens)) == len(tokens) == 2 * 8 * rounds  # every acquisition its own token


def _hold(name: str, ttl: float, out: Connection) -> None:
    """Take ``name``, report the token, then stay inside the block; report how it ended."""
    zeal = Zeal(store=Store("table"))

    async def main() -> None:
        try:
            async with zeal.lock(name, ttl=ttl) as lease:
                out.send(("held", lease.token))
                await asyncio.sleep(60)
        except LockLostError:
            out.send(("lost", lease.token))

    asyncio.run(main())


def _start_holder(name: str, ttl: float) -> tuple[Any, Connection, int]:
    r, w = FORK.Pipe(duplex=False)
    proc = FORK.Process(target=_hold, args=(name, ttl, w))
    proc.start()
    assert r.poll(30), "the holder did not take the lock"
    state, token = r.recv()
    assert state == "held"
    return proc, r, token


async def test_a_holder_sigkilled_inside_the_block_frees_the_lock_at_once(zeal: Zeal) -> None:
    name = unique()
    proc, _, token = _start_holder(name, ttl=300)
    os.kill(proc.pid, signal.SIGKILL)
    proc.join(10)
    # Free at once: long before the holder's 300 s lease would have run out.
    async with zeal.lock(name, ttl=5, timeout=10) as lease:
        assert lease.token > token


async def test_a_stopped_holder_keeps_the_lock_until_its_ttl_then_loses_it(zeal: Zeal) -> None:
    name = unique()
    proc, r, token = _start_holder(name, ttl=3)
    os.kill(proc.pid, signal.SIGSTOP)
    try:
        # Stopped, so it no longer renews, but its lease runs at least 2 s more.
        with pytest.raises(LockTimeoutError):
            async with zeal.lock(name, ttl=5, timeout=0.5):
                pass
        async with zeal.lock(name, ttl=5, timeout=30) as lease:
            assert lease.token > token
            os.kill(proc.pid, signal.SIGCONT)
            # Resumed, the old holder finds its lease gone: its block is cancelled.
            assert await asyncio.to_thread(r.poll, 30)
            assert r.recv() == ("lost", token)
    finally:
        os.kill(proc.pid, signal.SIGCONT)
        proc.join(10)
        if proc.is_alive():
            proc.kill()


async def test_a_body_longer_than_the_ttl_keeps_the_lock(zeal: Zeal) -> None:
    name = unique()

    async def other() -> None:
        with pytest.raises(LockTimeoutError):
            async with zeal.lock(name, ttl=5, timeout=0.9):
                pass

    async with zeal.lock(name, ttl=0.3) as lease:
        await asyncio.gather(other(), asyncio.sleep(1.2))
        assert not lease.lost


async def test_a_blocked_event_loop_keeps_a_lock_nobody_took(zeal: Zeal) -> None:
    """Renewed late (the loop was blocked past the ttl) but still ours: nothing is lost."""
    async with zeal.lock(unique(), ttl=0.2) as lease:
        time.sleep(0.5)  # noqa: ASYNC251 - blocks the event loop: no renewal can run
        await asyncio.sleep(0.3)
        assert not lease.lost


async def test_a_lease_taken_over_cancels_the_block_with_lock_lost(zeal: Zeal) -> None:
    name = unique()
    reached_end = False
    with pytest.raises(LockLostError, match=name) as err:
        async with zeal.lock(name, ttl=0.3) as lease:
            host_locks().table.set(name, {"owner": 0})  # as if its lease had run out
            other = Zeal(store=zeal.store)  # its own queue: takes the shared lease directly
            async with other.lock(name, ttl=5, timeout=0) as thief:
                assert thief.token > lease.token
                await asyncio.sleep(5)  # cancelled at the first failed renewal
                reached_end = True
    assert not reached_end and lease.lost
    assert isinstance(err.value, RuntimeError) and isinstance(err.value, ZealError)


async def test_a_shorter_lease_taken_after_a_longer_one_is_renewed_in_time(zeal: Zeal) -> None:
    """The renewal timer, set for the first lease's renewal in 10 s, wakes for the second's."""
    long_name, short_name = unique(), unique()
    owner = Lease(host_locks().table, 1.0)
    async with zeal.lock(long_name, ttl=30), zeal.lock(short_name, ttl=0.3) as short:
        await asyncio.sleep(1.0)  # more than three ttls: renewed, or another process could take it
        assert not short.lost and owner.holder(short_name) == os.getpid()


async def test_a_task_started_inside_the_block_holds_and_loses_its_own_locks(zeal: Zeal) -> None:
    """A task started by a holder copies its context: its locks are its own, and a loss cancels
    it, not the task that started it."""
    outer_name, inner_name = unique(), unique()
    async with zeal.lock(outer_name, ttl=5) as outer:

        async def inner() -> None:
            async with zeal.lock(inner_name, ttl=0.3):
                host_locks().table.set(inner_name, {"owner": 0})  # as if it had run out
                other = Zeal(store=zeal.store)
                async with other.lock(inner_name, ttl=5, timeout=0):
                    await asyncio.sleep(5)  # cancelled at the first failed renewal

        task = asyncio.create_task(inner())
        await asyncio.wait([task], timeout=10)  # a cancellation of this task would end it here
        with pytest.raises(LockLostError, match=inner_name):
            task.result()
        assert not outer.lost
    async with zeal.lock(outer_name, ttl=5, timeout=0):
        pass  # the outer block gave its lock back


async def test_a_task_started_by_a_holder_does_not_keep_it_alive(zeal: Zeal) -> None:
    """What a lock keeps of the task that took it, in the task's context, is copied into the
    tasks it starts: it must not keep the finished task."""
    go_on = asyncio.Event()

    async def parent() -> asyncio.Task[bool]:
        async with zeal.lock(unique(), ttl=5):
            pass
        return asyncio.create_task(go_on.wait())

    task = asyncio.create_task(parent())
    child = await task
    ref = weakref.ref(task)
    del task
    for _ in range(2):
        await asyncio.sleep(0)  # the loop's callbacks that name it have run
    gc.collect()
    assert ref() is None
    go_on.set()
    await child


async def test_a_thread_running_a_loop_in_a_running_tasks_context_holds_its_own_locks(
    zeal: Zeal,
) -> None:
    """A thread that runs an event loop in a copy of a task's context takes locks in its own
    loop, as its own task, even while that task is running."""
    async with zeal.lock(unique(), ttl=5):
        pass  # what this task's context keeps of it now names it
    holders: list[bool] = []
    done = threading.Event()

    def in_thread() -> None:
        async def take() -> None:
            async with zeal.lock(unique(), ttl=5) as lease:
                holders.append(lease._task is asyncio.current_task())

        try:
            asyncio.run(take())
        finally:
            done.set()

    thread = threading.Thread(target=contextvars.copy_context().run, args=(in_thread,))
    thread.start()
    while not done.wait(0.001):  # this task's coroutine keeps running meanwhile
        pass
    thread.join()
    assert holders == [True]


def _forked_contender(zeal: Zeal, name: str, w: Connection) -> None:
    async def main() -> str:
        try:
            async with zeal.lock(name, ttl=5, timeout=0.2):
                return "taken"
        except LockTimeoutError:
            return "timed out"

    w.send(asyncio.run(main()))
    os._exit(0)


async def test_a_child_forked_inside_the_block_does_not_hold_the_lock(zeal: Zeal) -> None:
    """The forked child has its own pid: the parent's lease is a live holder's, not its own."""
    name = unique()
    async with zeal.lock(name, ttl=5) as lease:
        r, w = FORK.Pipe(duplex=False)
        child = FORK.Process(target=_forked_contender, args=(zeal, name, w))
        child.start()
        assert await asyncio.to_thread(r.poll, 30)
        assert r.recv() == "timed out"
        await asyncio.to_thread(child.join, 10)
        assert child.exitcode == 0 and not lease.lost
    async with zeal.lock(name, ttl=5, timeout=0) as after:
        assert after.token > lease.token  # the parent's release worked; the child's try did not


async def test_an_outside_cancellation_is_not_a_lost_lock(zeal: Zeal) -> None:
    name = unique()

    async def hold() -> None:
        async with zeal.lock(name, ttl=5):
            await asyncio.sleep(10)

    task = asyncio.create_task(hold())
    await asyncio.sleep(0.05)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    async with zeal.lock(name, ttl=5, timeout=0):
        pass  # released on the way out


async def test_coroutines_wait_in_order_and_a_cancelled_waiter_passes_its_turn(
    zeal: Zeal,
) -> None:
    name = unique()
    order: list[str] = []

    async def take(tag: str) -> None:
        async with zeal.lock(name, ttl=5):
            order.append(tag)
            await asyncio.sleep(0.01)

    async with zeal.lock(name, ttl=5):
        tasks = {tag: asyncio.create_task(take(tag)) for tag in "abcd"}
        await asyncio.sleep(0.05)
        tasks["b"].cancel()
    await asyncio.gather(*tasks.values(), return_exceptions=True)
    assert order == ["a", "c", "d"]


def _contend(name: str, seconds: float, out: Connection) -> None:
    zeal = Zeal(store=Store("table"))

    async def main() -> None:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            async with zeal.lock(name, ttl=5):
                n += 1
                busy = time.perf_counter() + 0.0002  # held most of the time
                while time.perf_counter() < busy:
                    pass
        out.send(n)

    asyncio.run(main())


def test_two_contending_processes_share_the_lock_fairly() -> None:
    name = unique()
    seconds = quick_or_long(2.0, 20.0)
    pipes = [FORK.Pipe(duplex=False) for _ in range(2)]
    procs = [FORK.Process(target=_contend, args=(name, seconds, w)) for _, w in pipes]
    for p in procs:
        p.start()
    counts = [r.recv() for r, _ in pipes]
    for p in procs:
        p.join(30)
    assert min(counts) >= 0.3 * sum(counts), counts


async def test_cluster_scope_on_the_table_backend_is_the_host(zeal: Zeal) -> None:
    async with zeal.lock(unique(), ttl=5, scope="cluster") as lease:
        assert lease.scope == "host"


async def test_memcached_has_host_locks_but_no_cluster_scope(memcached_server: Any) -> None:
    servers = f"{memcached_server.host}:{memcached_server.port}"
    zeal = Zeal(store=Store("memcached", {"servers": servers}))
    async with zeal.lock(unique(), ttl=5) as lease:
        assert lease.scope == "host"
    with pytest.raises(UnsupportedOperationError, match="memcached"):
        async with zeal.lock(unique(), ttl=5, scope="cluster"):
            pass
    with pytest.raises(UnsupportedOperationError):
        await zeal.is_leader("cluster")
    zeal.every(60, name=unique(), scope="cluster")(_noop)
    with pytest.raises(UnsupportedOperationError):  # at startup, not at the first period
        async with zeal:
            pass


async def _noop() -> None:
    return None


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"name": ""}, InvalidKeyError),
        ({"name": "x" * 101}, KeyTooLongError),
        ({"name": 42}, KeyTypeError),
        ({"name": "\ud800"}, InvalidKeyError),
        ({"name": "zeal:job:x"}, InvalidKeyError),
        ({"ttl": 0}, InvalidTTLError),
        ({"ttl": -1}, InvalidTTLError),
        ({"ttl": float("nan")}, InvalidTTLError),
        ({"ttl": float("inf")}, InvalidTTLError),
        ({"ttl": True}, InvalidTTLError),
        ({"ttl": "5"}, InvalidTTLError),
        ({"timeout": -0.1}, InvalidTTLError),
        ({"scope": "world"}, ConfigError),
    ],
)
def test_bad_arguments_are_typed_errors(zeal: Zeal, kwargs: dict[str, Any], error: type) -> None:
    args: dict[str, Any] = {"name": "ok", "ttl": 5, **kwargs}
    with pytest.raises(error):
        zeal.lock(**args)
