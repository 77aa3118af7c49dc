"""E14 (reliability.md section 6): a Streams consumer SIGKILLed mid-batch loses nothing."""

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
from zeal_asgi.store import Store

pytestmark = pytest.mark.redis

MESSAGES = 10_000
MIN_IDLE = 2.0
RECLAIM_EVERY = 0.5
MAX_DELIVERIES = 3


def _spawn(url: str, name: str, delay: float) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    env.update(
        PYTHONPATH=str(REPO),
        ZEAL_STORE_BACKEND="redis",
        ZEAL_REDIS_URL=url,
        E14_CONSUMER=name,
        E14_DELAY=str(delay),
        E14_MAX_DELIVERIES=str(MAX_DELIVERIES),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "tests.messaging.apps.stream_worker"],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )


@pytest.fixture
def consumers(fresh_redis: RedisServer) -> Iterator[list[subprocess.Popen[bytes]]]:
    procs = [_spawn(fresh_redis.url, f"c{i}", 0.002 if i == 0 else 0.0) for i in range(3)]
    try:
        for p in procs:
            assert p.stdout is not None
            line = p.stdout.readline()
            assert line.strip() == b"ready", line + p.stdout.read()
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
            if p.stdout is not None:
                p.stdout.close()


def _pending_of(redis: RedisServer, consumer: str) -> int:
    reply = redis.command("XPENDING", "zeal:stream:e14", "e14")
    for row in reply["consumers"]:
        if row["name"] == consumer.encode():
            return int(row["pending"])
    return 0


async def test_e14_consumer_killed_mid_batch(
    fresh_redis: RedisServer, consumers: list[subprocess.Popen[bytes]]
) -> None:
    store = Store("redis", {"url": fresh_redis.url})
    await store.start()
    try:
        await store.publish_reliable("e14", "poison")
        for start in range(0, MESSAGES, 8):  # as many at once as the pool has connections
            await asyncio.gather(
                *(store.publish_reliable("e14", f"m{i}") for i in range(start, start + 8))
            )
        # kill the slow consumer while it holds entries it has read but not acknowledged
        victim = consumers[0]
        in_flight = 0
        deadline = time.monotonic() + 30
        while in_flight == 0:
            assert time.monotonic() < deadline, "the victim never held pending entries"
            done = int(fresh_redis.command("HLEN", "zeal:e14:effects") or 0)
            if done >= 1000:
                in_flight = _pending_of(fresh_redis, "c0")
            await asyncio.sleep(0.01)
        os.kill(victim.pid, signal.SIGKILL)
        killed_at = time.monotonic()
        victim.wait()
        reclaim_s = None
        deadline = killed_at + 60
        while True:
            now = time.monotonic()
            if reclaim_s is None and _pending_of(fresh_redis, "c0") == 0:
                reclaim_s = now - killed_at
            done = int(fresh_redis.command("HLEN", "zeal:e14:effects") or 0)
            dead = int(fresh_redis.command("XLEN", "zeal:stream:e14:dead") or 0)
            if done == MESSAGES and dead >= 1 and reclaim_s is not None:
                break
            assert now < deadline, f"stuck at {done}/{MESSAGES} processed, dlq={dead}"
            await asyncio.sleep(0.05)
        effects = fresh_redis.command("HGETALL", "zeal:e14:effects")
        assert isinstance(effects, dict)
        counts = [int(v) for v in effects.values()]
        duplicates = sum(c - 1 for c in counts if c > 1)
        runs = int(fresh_redis.command("GET", "zeal:e14:runs") or 0)
        poison_runs = int(fresh_redis.command("GET", "zeal:e14:poison_runs") or 0)
        dlq = fresh_redis.command("XRANGE", "zeal:stream:e14:dead", "-", "+")
        assert isinstance(dlq, list) and len(dlq) == 1
        dlq_fields = dlq[0][1]
        bound = MIN_IDLE + RECLAIM_EVERY * 1.2 + 1.0
        ok = (
            len(counts) == MESSAGES
            and duplicates == 0
            and reclaim_s <= bound
            and poison_runs == MAX_DELIVERIES
        )
        line = (
            f"EXPERIMENT E14 streams-consumer-death | consumers=3 messages={MESSAGES} "
            f"min_idle={MIN_IDLE}s janitor={RECLAIM_EVERY}s | killed_with_in_flight={in_flight} "
            f"processed={len(counts)}/{MESSAGES} handler_runs={runs} "
            f"duplicate_effects={duplicates} "
            f"reclaim={reclaim_s:.2f}s (bound {bound:.1f}s) poison_deliveries={poison_runs} "
            f"dlq={len(dlq)} | {'PASS' if ok else 'FAIL'}"
        )
        print(line)
        assert len(counts) == MESSAGES
        assert duplicates == 0
        assert runs >= MESSAGES + MAX_DELIVERIES
        assert reclaim_s <= bound
        assert poison_runs == MAX_DELIVERIES
        assert dlq_fields[b"payload"] == b"poison"
        assert dlq_fields[b"zeal_deliveries"] == str(MAX_DELIVERIES).encode()
        assert line.endswith("| PASS")
    finally:
        await store.aclose()
