"""The same-host bus (table backend): receivers, patterns, limits, overrun, dead workers."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tests._harness.apps import REPO
from tests._harness.servers import RedisServer
from tests.messaging.helpers import until
from zeal_asgi.errors import InvalidKeyError, KeyTypeError, SerializationError, ValueTooLargeError
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.shm.bus import close_host_bus, glob_to_regex, host_bus
from zeal_asgi.shm.bus_reader import BusSubscriber
from zeal_asgi.shm.segments import server_identity
from zeal_asgi.store import Store


@pytest.fixture
def store() -> Iterator[Store]:
    yield Store("table")
    close_host_bus()


async def test_receivers_are_subscribed_workers(store: Store) -> None:
    a: list[tuple[str, str]] = []
    b: list[tuple[str, str]] = []
    w1, w2 = PubSub(store), PubSub(store)  # two subscribers, as two workers would be
    w1.subscribe("news", lambda p, c: a.append((p, c)))
    w2.subscribe("n?ws", lambda p, c: b.append((p, c)))
    w2.subscribe("news", lambda p, c: b.append((p, c)))
    await w1.start()
    await w2.start()
    try:
        head = host_bus().head.get()
        assert await store.publish("other", "x") == 0
        assert host_bus().head.get() == head  # nothing written without a receiver
        assert await store.publish("news", "hi") == 2  # w2 counts once for two matches
        big = "é" * 3000  # several ring slots
        assert await store.publish("news", big) == 2
        await until(lambda: len(a) == 2 and len(b) == 4, within=5.0)
        assert a == [("hi", "news"), (big, "news")]
        assert sorted(b) == sorted([("hi", "news")] * 2 + [(big, "news")] * 2)
    finally:
        await w1.stop()
        await w2.stop()
    assert await store.publish("news", "gone") == 0


async def test_bad_channels_and_payloads(store: Store) -> None:
    ps = PubSub(store)
    ps.subscribe("c", lambda p, c: None)
    await ps.start()
    try:
        with pytest.raises(InvalidKeyError, match="256 bytes"):
            await store.publish("x" * 257, "p")
        with pytest.raises(InvalidKeyError, match="empty"):
            await store.publish("", "p")
        with pytest.raises(KeyTypeError):
            await store.publish(b"c", "p")  # type: ignore[arg-type]
        with pytest.raises(SerializationError):
            await store.publish("c", 12)  # type: ignore[arg-type]
        with pytest.raises(ValueTooLargeError, match=str(host_bus().max_payload)):
            await store.publish("c", b"x" * (host_bus().max_payload + 1))
        with pytest.raises(InvalidKeyError):
            ps.subscribe("y" * 300, lambda p, c: None)
    finally:
        await ps.stop()


def test_redis_glob_rules() -> None:
    cases = {
        "h?llo": (["hello", "hallo"], ["hllo", "heello"]),
        "h*llo": (["hllo", "heeeello"], ["hell"]),
        "h[ae]llo": (["hello", "hallo"], ["hillo"]),
        "h[^e]llo": (["hallo"], ["hello"]),
        "h[a-b]llo": (["hallo", "hbllo"], ["hcllo"]),
        "h\\*llo": (["h*llo"], ["hello"]),
        "h[z-a]llo": (["hmllo"], ["h-llo"]),  # a range either way round
        "x[a--b]": (["x-", "x0", "xa", "xb"], ["xc", "x,"]),  # the range '-'..'a', then 'b'
        "x[-a]": (["x-", "xa"], ["xb"]),
    }
    for pattern, (yes, no) in cases.items():
        rx = glob_to_regex(pattern)
        assert all(rx.fullmatch(s) for s in yes), pattern
        assert not any(rx.fullmatch(s) for s in no), pattern


@pytest.mark.redis
def test_glob_classes_match_what_redis_matches(redis_server: RedisServer) -> None:
    """Every pattern selects the same names here as Redis's own matcher (KEYS)."""
    names = ["x-", "x0", "xa", "xb", "xc", "x,", "x]", "x^", "x\\", "xm", "xz", "xA", "x[ab"]
    patterns = [
        "x[a--b]", "x[z-a]", "x[-a]", "x[a-]", "x[^a-c]", "x[\\-]", "x[0-a]", "x[m]", "x[ab",
        "x[a-", "x[\\]", "x[]a]", "x[^]", "x[]", "x[", "x[^", "x\\", "x[\\", "x?", "*]",
    ]  # fmt: skip
    db = redis_server.client()
    try:
        db.flushall()
        db.mset(dict.fromkeys(names, "1"))
        for pattern in patterns:
            redis_says = {k.decode() for k in db.keys(pattern) if isinstance(k, bytes)}
            rx = glob_to_regex(pattern)
            assert {n for n in names if rx.fullmatch(n)} == redis_says, pattern
    finally:
        db.flushall()
        db.close()


async def test_slow_reader_loses_oldest_and_counts(store: Store) -> None:
    bus = host_bus()
    counted: dict[str, int] = {}
    sub = BusSubscriber(bus, lambda name, n: counted.__setitem__(name, counted.get(name, 0) + n))
    try:
        sub.add("u:flood", False)
        for i in range(bus.slots + 10):
            bus.publish("u:flood", str(i).encode())
        got: list[bytes] = []
        await sub.drain(lambda ch, pat, data: got.append(data))
        assert counted == {"overrun": 10}
        assert len(got) == bus.slots and got[0] == b"10"
    finally:
        sub.close()


CHILD = """
import asyncio, sys
from zeal_asgi.shm.bus import host_bus
from zeal_asgi.shm.bus_reader import BusSubscriber
sub = BusSubscriber(host_bus())
sub.add("u:news", False)
print("ready", flush=True)
asyncio.run(asyncio.sleep(60))
"""


async def test_dead_worker_stops_counting(store: Store) -> None:
    host_bus()
    env = dict(os.environ, PYTHONPATH=str(REPO), ZEAL_SERVER_ID=server_identity().server_id)
    child = subprocess.Popen(  # noqa: ASYNC220 - a short-lived helper process
        [sys.executable, "-c", CHILD], env=env, stdout=subprocess.PIPE, cwd=REPO
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == b"ready"
        assert await store.publish("news", "x") == 1
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        deadline = time.monotonic() + 5
        while await store.publish("news", "x") != 0:  # pruned within the snapshot's max age
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        if child.stdout is not None:
            child.stdout.close()
