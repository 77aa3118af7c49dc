"""Processes of the E8 test (writers SIGKILLed at random, then a restarted reader).

``python -m tests.cache._killed_writers kill DIR SECONDS``: forks 4 writers that ``Cache.set``
self-checking values (10 B to 40 KB, so both tiers and the oversize spill are hit) on 200 keys,
and SIGKILLs one of them every U(5, 50) ms for SECONDS, forking a replacement each time.  Prints
JSON.

``python -m tests.cache._killed_writers read DIR``: a new process on the same directory (a
restart: empty memory tier, start-up cleanup of temp files), then reads every key once and 800
random ones, checking each value.  Prints JSON with hits, misses, wrong values and latencies.

Run with ``ZEAL_SHM_BACKEND=memfd`` (private shared memory: nothing named to leak when killed)
and ``ZEAL_CACHE_SECRET`` (entries must outlive the writers' processes).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import random
import signal
import sys
import time
from pathlib import Path
from typing import Any

from zeal_asgi import Atomic
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend

KEYS = 200
WRITERS = 4
SIZES = (10, 500, 5000, 12_000, 40_000)


def signature(key: str, version: str, size: int) -> str:
    """What a genuine value of ``key`` carries; a wrong value cannot match it."""
    return hashlib.sha256(f"{key}|{version}|{size}".encode()).hexdigest()[:24]


def check(key: str, value: Any) -> bool:
    """True when ``value`` is a genuine, whole value written for ``key``."""
    try:
        return bool(
            value["k"] == key
            and value["sig"] == signature(key, value["n"], len(value["pad"]))
            and value["pad"] == "x" * len(value["pad"])
        )
    except (TypeError, KeyError):
        return False


def make_cache(directory: str) -> Cache:
    """The cache every phase uses (table backend, secret from ZEAL_CACHE_SECRET)."""
    store = Store(backend=TableBackend(namespace="e8"))
    return Cache(256, directory, 0, store=store, namespace="e8")


async def _write_forever(cache: Cache, puts: Atomic) -> None:
    rnd = random.Random(os.getpid())
    n = 0
    while True:
        n += 1
        key = f"key{rnd.randrange(KEYS)}"
        size = rnd.choice(SIZES)
        version = f"{os.getpid()}-{n}"
        value = {"k": key, "n": version, "pad": "x" * size, "sig": signature(key, version, size)}
        await cache.set(key, value)
        puts.increment()


def _spawn(cache: Cache, puts: Atomic) -> int:
    pid = os.fork()
    if pid == 0:
        try:
            asyncio.run(_write_forever(cache, puts))
        finally:
            os._exit(1)
    return pid


def kill_phase(directory: str, seconds: float) -> dict[str, Any]:
    """Writers under random SIGKILLs for ``seconds``."""
    cache = make_cache(directory)
    host_stats()  # allocated before the forks, so the writers share one set of counters
    puts = Atomic(0)  # anonymous: shared with the forked writers only
    writers = [_spawn(cache, puts) for _ in range(WRITERS)]
    time.sleep(0.2)  # let every writer get going before the first kill
    rnd = random.Random(8)
    kills = 0
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(rnd.uniform(0.005, 0.050))
        slot = rnd.randrange(WRITERS)
        os.kill(writers[slot], signal.SIGKILL)
        os.waitpid(writers[slot], 0)
        kills += 1
        writers[slot] = _spawn(cache, puts)
    for pid in writers:
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
    return {"kills": kills, "puts": puts.get(), "temp_files_left_by_kills": _temp_count(directory)}


def _temp_count(directory: str) -> int:
    return sum(1 for p in Path(directory).iterdir() if p.name.startswith(".tmp."))


def _p99(samples: list[float]) -> float:
    samples.sort()
    return round(samples[int(len(samples) * 0.99)] * 1e6, 1)


async def read_phase(directory: str) -> dict[str, Any]:
    """A restarted server's view: every value read is genuine or a miss."""
    host_stats()  # allocate the counters before timing anything
    cache = make_cache(directory)
    temp_after_start = _temp_count(directory)
    rnd = random.Random(1)
    order = [f"key{i}" for i in range(KEYS)] + [f"key{rnd.randrange(KEYS)}" for _ in range(800)]
    hits = misses = wrong = 0
    get_times: list[float] = []
    for key in order:
        t0 = time.perf_counter()
        value = await cache.get(key, MISSING)
        get_times.append(time.perf_counter() - t0)
        if value is MISSING:
            misses += 1
        elif check(key, value):
            hits += 1
        else:
            wrong += 1
    put_times: list[float] = []
    for i in range(200):
        t0 = time.perf_counter()
        await cache.set(f"p{i}", {"pad": "x" * rnd.choice(SIZES)})
        put_times.append(time.perf_counter() - t0)
    stats = cache.stats()
    damaged = {
        k: v
        for k, v in stats.items()
        if k.startswith("file_") and k not in ("file_writes", "file_expired")
    }
    return {
        "reads": len(order),
        "hits": hits,
        "misses": misses,
        "wrong": wrong,
        "temp_removed_at_start": cache.files.temp_removed_at_start,
        "temp_files_after_start": temp_after_start,
        "damaged_detected": damaged,
        "get_p99_us": _p99(get_times),
        "put_p99_us": _p99(put_times),
    }


def main(argv: list[str]) -> int:
    """Entry point."""
    if argv[0] == "kill":
        out = kill_phase(argv[1], float(argv[2]))
    else:
        out = asyncio.run(read_phase(argv[1]))
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
