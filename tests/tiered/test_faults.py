"""Fault experiments of the tiered backend (reliability.md §6): E13 pub/sub loss, E15 forgeries."""

from __future__ import annotations

import asyncio
import json
import random
import statistics
import time
from typing import Any

from redis.asyncio import Redis

from tests._harness.servers import RedisServer
from tests.conftest import quick_or_long
from zeal_asgi.signing import REASONS, Signer
from zeal_asgi.store.backends.tiered import TieredBackend

from .conftest import SECRET, MakeNode, settle, tiered, wait_for

KEYS = [f"hot{i}" for i in range(16)]
DELIVERY_ALLOWANCE = 0.05
"""Seconds an invalidation may take from PUBLISH to the other node (not a loss)."""


async def test_e13_pubsub_loss_never_serves_stale_after_resubscribe(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    """Flood invalidations, ``CLIENT KILL TYPE pubsub`` every ~0.5 s; count stale reads."""
    duration = quick_or_long(4.0, 40.0)
    a, b = await make_node(), await make_node()
    ta, tb = tiered(a), tiered(b)
    history: dict[str, list[tuple[float, int]]] = {k: [(0.0, 0)] for k in KEYS}
    kills: list[float] = []
    resubscribed: list[float] = []
    stale_after = stale_in_gap = reads = writes = writes_in_gap = 0
    l1_reads = 0
    stop = time.monotonic() + duration
    subs0, flushes0 = tb.subscriber.subscribes, b.stats()["tiered"]["worker"]["l1_flushes_total"]

    def committed_before(key: str, t: float) -> int:
        v = 0
        for at, value in history[key]:
            if at <= t:
                v = value
        return v

    async def writer() -> None:
        nonlocal writes, writes_in_gap
        i = 0
        while time.monotonic() < stop:
            i += 1
            key = KEYS[i % len(KEYS)]
            await a.set("kv", key, {"v": i, "s": ""})
            history[key].append((time.monotonic(), i))
            writes += 1
            writes_in_gap += not tb.synced
            await asyncio.sleep(0)

    async def reader() -> None:
        nonlocal reads, stale_after, stale_in_gap, l1_reads
        while time.monotonic() < stop:
            key = random.choice(KEYS)
            started = time.monotonic()
            synced_at_start = tb.synced
            l1_reads += synced_at_start and tb.l1.is_fresh(b.spec("kv"), key)
            row = await b.get_strict("kv", key)
            reads += 1
            if (row["v"] if row else 0) < committed_before(key, started - DELIVERY_ALLOWANCE):
                if synced_at_start and (not kills or resubscribed_after(kills[-1]) <= started):
                    stale_after += 1
                else:
                    stale_in_gap += 1
            await asyncio.sleep(0)  # an L1 hit never yields: let the others run

    def resubscribed_after(t: float) -> float:
        return next((r for r in resubscribed if r >= t), float("inf"))

    async def watcher() -> None:
        seen = tb.subscriber.subscribes
        while time.monotonic() < stop + 1:
            if tb.subscriber.subscribes != seen:
                seen = tb.subscriber.subscribes
                resubscribed.append(time.monotonic())
            await asyncio.sleep(0.0005)

    async def killer() -> None:
        await asyncio.sleep(0.3)
        while time.monotonic() < stop - 0.4:
            kills.append(time.monotonic())
            await asyncio.to_thread(redis_server.command, "CLIENT", "KILL", "TYPE", "pubsub")
            await asyncio.sleep(0.5)

    await asyncio.gather(writer(), reader(), reader(), watcher(), killer())
    await wait_for(lambda: ta.synced and tb.synced, what="resubscribed")
    await asyncio.sleep(0.2)  # the last messages in flight (some were lost: no settle())
    for key in KEYS:  # and at the end, everything agrees
        assert await b.get_strict("kv", key) == await a.get_strict("kv", key)

    reconnects = tb.subscriber.subscribes - subs0
    flushes = b.stats()["tiered"]["worker"]["l1_flushes_total"] - flushes0
    gaps = [r - k for k in kills if (r := resubscribed_after(k)) != float("inf")]
    ok = stale_after == 0 and reconnects == len(kills) and flushes >= reconnects
    print(
        f"\nEXPERIMENT E13 pubsub-loss | duration={duration:.0f}s kills={len(kills)} "
        f"writes={writes} writes_during_gaps={writes_in_gap} reads={reads} l1_reads={l1_reads} "
        f"| reconnects(node B)={reconnects} l1_flushes(node A+B)={flushes} "
        f"stale_after_resubscribe={stale_after} stale_during_gap={stale_in_gap} "
        f"reconnect_ms_mean={statistics.mean(gaps) * 1000 if gaps else 0:.1f} "
        f"reconnect_ms_max={max(gaps, default=0) * 1000:.1f} | {'PASS' if ok else 'FAIL'}"
    )
    assert len(kills) >= 3 and l1_reads > 0 and writes_in_gap >= 0
    assert stale_after == 0
    assert reconnects == len(kills)  # one reconnect per kill ...
    assert flushes == 2 * reconnects  # ... and exactly one L1 flush per reconnect, per node


def _forgeries(good: dict[str, Any], genuine: bytes, n: int) -> dict[str, list[bytes]]:
    """``n`` messages of each rejection kind, from a genuine message already accepted."""
    body = {k: good[k] for k in ("origin", "ns", "op", "keys")}
    now = time.time()
    wrong_secret = Signer("not-the-right-secret-at-all", context="zeal-tiered-invalidation")
    other_kid = Signer({"k9": SECRET}, context="zeal-tiered-invalidation")
    stale = Signer(SECRET, context="zeal-tiered-invalidation", clock=lambda: now - 120)
    right = Signer(SECRET, context="zeal-tiered-invalidation")
    malformed_static = [
        b"",
        b"not json",
        b"[]",
        b'{"v": 1}',
        b'{"v": NaN}',
        json.dumps({**good, "nonce": "short"}).encode(),
        json.dumps({**good, "ts": "yesterday"}).encode(),
    ]
    malformed_signed = [
        {**body, "op": "drop"},  # authentic, but not an invalidation we know
        {**body, "keys": ["zz"]},
        {**body, "keys": "6869"},
        {k: v for k, v in body.items() if k != "ns"},
    ]

    def malformed(i: int) -> bytes:
        if i % 2:
            return malformed_static[i % len(malformed_static)]
        return right.sign(malformed_signed[i % len(malformed_signed)])

    def oversize(i: int) -> bytes:
        if i % 50 == 0 and i < 1000:  # too many bytes (few: pub/sub buffers are bounded)
            return json.dumps({**good, "pad": "x" * 70_000}).encode()
        return right.sign({**body, "keys": ["6869"] * 300})  # too many keys (authentic)

    return {
        "bad_mac": [wrong_secret.sign(body) for _ in range(n)],
        "unknown_kid": [other_kid.sign(body) for _ in range(n)],
        "stale": [stale.sign(body) for _ in range(n)],
        "replay": [genuine] * n,
        "oversize": [oversize(i) for i in range(n)],
        "malformed": [malformed(i) for i in range(n)],
    }


async def test_e15_forged_replayed_stale_invalidations_are_dropped_and_counted(
    make_node: MakeNode, redis_server: RedisServer
) -> None:
    n = int(quick_or_long(1000, 10_000))
    a, b = await make_node(), await make_node()
    ta, tb = tiered(a), tiered(b)
    await b.set("kv", "victim", {"v": 1, "s": "cached"})
    assert await b.exists_cached("kv", "victim")

    # capture one genuine invalidation of "victim" (published by node A) to replay it
    raw = Redis.from_url(redis_server.url)
    captured: list[bytes] = []
    async with raw.pubsub() as sniffer:
        await sniffer.subscribe(ta.channel)
        await sniffer.get_message(timeout=1)  # subscribe confirmation
        await a.set("kv", "other", {"v": 2, "s": ""})
        while not captured:
            msg = await sniffer.get_message(timeout=1)
            if msg and msg["type"] == "message":
                captured.append(msg["data"])
    await settle(a, b)
    good = json.loads(captured[0])
    good["keys"] = [b"victim".hex()]
    forged = _forgeries(good, captured[0], n)  # B accepted captured[0]: every copy is a replay

    before = tb.stats()["tiered"]["invalidation"]
    t0 = time.monotonic()
    try:
        for messages in forged.values():
            pipe = raw.pipeline(transaction=False)
            for m in messages:
                pipe.publish(ta.channel, m)
            await pipe.execute()
        total = sum(len(v) for v in forged.values())
        await wait_for(
            lambda: (
                sum(tb.stats()["tiered"]["invalidation"]["rejected"].values())
                - sum(before["rejected"].values())
                >= total
            ),
            limit=30,
            what="every forged message to be processed",
        )
    finally:
        await raw.aclose()
    elapsed = time.monotonic() - t0
    after = tb.stats()["tiered"]["invalidation"]
    rejected = {r: after["rejected"][r] - before["rejected"][r] for r in REASONS}
    accepted = after["accepted"] - before["accepted"]
    victim_cached = await b.exists_cached("kv", "victim")
    ok = rejected == dict.fromkeys(REASONS, n) and accepted == 0 and victim_cached
    print(
        f"\nEXPERIMENT E15 forged-invalidations | kinds=6 per_kind={n} | "
        + " ".join(f"{r}={rejected[r]}/{n}" for r in REASONS)
        + f" accepted_forged={accepted} victim_still_cached={victim_cached} "
        f"msgs_per_s={6 * n / elapsed:.0f} | {'PASS' if ok else 'FAIL'}"
    )
    assert rejected == dict.fromkeys(REASONS, n)  # 100 % rejected, each under its own reason
    assert accepted == 0
    assert victim_cached  # none of them dropped the L1 copy
    assert await b.get("kv", "victim", "s") == "cached"


async def test_unsigned_nodes_refuse_malformed_but_accept_plain(make_node: MakeNode) -> None:
    a = await make_node(invalidation_secret=None)
    b = await make_node(invalidation_secret=None)
    assert not tiered(b).stats()["tiered"]["signed"]
    await b.get("kv", "u")
    await a.set("kv", "u", {"v": 3, "s": ""})
    await settle(a, b)
    assert await b.get("kv", "u", "v") == 3
    # a signed node ignores unsigned traffic as malformed, never as an invalidation
    c = await make_node()
    tc = tiered(c)
    await c.get("kv", "u")
    assert await c.exists_cached("kv", "u")
    await a.set("kv", "u", {"v": 4, "s": ""})
    await wait_for(
        lambda: tc.stats()["tiered"]["invalidation"]["rejected"]["malformed"] >= 1,
        what="the unsigned message to reach the signed node",
    )
    assert await c.exists_cached("kv", "u")
    assert isinstance(tc, TieredBackend)
