"""Room bookkeeping stays consistent under concurrent joins and leaves from several workers."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
from collections import Counter

import pytest

from tests._harness.apps import REPO
from tests.messaging.helpers import redis_link
from zeal_asgi.messaging.ws.rooms import SEP, RedisRegistry, ShmRegistry
from zeal_asgi.shm.segments import server_identity
from zeal_asgi.store import Store

MEMBERS = [f"c{i}" for i in range(20)]


def _check(members: dict[str, str], servers: dict[str, int]) -> None:
    want = Counter(members.values())
    assert {w: n for w, n in servers.items() if n} == dict(want)


@pytest.mark.redis
async def test_redis_rooms_under_concurrency(redis_url: str) -> None:
    store = Store("redis", {"url": redis_url, "pool_size": 8})
    await store.start()
    reg = RedisRegistry(redis_link(store))
    rng = random.Random(7)

    async def worker(name: str) -> None:
        for _ in range(300):
            client = rng.choice(MEMBERS)
            if rng.random() < 0.6:
                await reg.join("race", client, name)
            else:
                await reg.leave("race", client, rng.choice(["", name]))

    try:
        await asyncio.gather(*(worker(f"w{i}") for i in range(6)))
        client = await store.backend.client()  # type: ignore[attr-defined]
        members = {
            k.decode(): v.decode()
            for k, v in (await client.hgetall("zeal:ws:room:{race}:members")).items()
        }
        servers = {
            k.decode(): int(v)
            for k, v in (await client.hgetall("zeal:ws:room:{race}:servers")).items()
        }
        _check(members, servers)
        assert sorted(await reg.room_servers("race")) == sorted(set(members.values()))
    finally:
        await store.aclose()


CHILD = """
import asyncio, random, sys
from zeal_asgi.messaging.ws.rooms import ShmRegistry
reg = ShmRegistry(owner_capacity=64, room_capacity=256)
name = sys.argv[1]
rng = random.Random(name)
members = [f"c{i}" for i in range(20)]
async def main():
    for _ in range(20000):
        c = rng.choice(members)
        if rng.random() < 0.6:
            await reg.join("race", c, name)
        else:
            await reg.leave("race", c, rng.choice(["", name]))
asyncio.run(main())
"""


def test_shared_memory_rooms_under_concurrent_processes() -> None:
    reg = ShmRegistry(owner_capacity=64, room_capacity=256)
    try:
        env = dict(os.environ, PYTHONPATH=str(REPO), ZEAL_SERVER_ID=server_identity().server_id)
        procs = [
            subprocess.Popen([sys.executable, "-c", CHILD, f"w{i}"], env=env, cwd=REPO)
            for i in range(3)
        ]
        for p in procs:
            assert p.wait(60) == 0
        members = {
            str(k).split(SEP, 1)[1]: str(row["w"])
            for k, row in reg.members.items()
            if str(k).startswith("race" + SEP)
        }
        servers = {
            str(k).split(SEP, 1)[1]: int(row["n"])
            for k, row in reg.servers.items()
            if str(k).startswith("race" + SEP)
        }
        print(f"rooms race: {len(members)} members over {sorted(servers.items())}")
        _check(members, servers)
        assert reg.locks.get("0") is None or all(row["holder"] == 0 for _, row in reg.locks.items())
    finally:
        reg.close()
