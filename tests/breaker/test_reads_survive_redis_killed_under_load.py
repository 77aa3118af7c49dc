"""E10 (reliability.md §6): Redis SIGKILLed under load, restarted; the breaker keeps reads up."""

from __future__ import annotations

import asyncio
import statistics
import time
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer
from tests.conftest import LONG
from zeal_asgi.store import Store
from zeal_asgi.store.backends.breaker import BreakerState

from .conftest import MakeStore, breaker_of

RATE = 200
"""Requests per second."""
KEYS = 100
CATCH_UP = 0.02
"""Seconds of missed sends the load generator makes up for at once (4 requests at RATE)."""


def _app(store: Store) -> Starlette:
    async def item(request: Request) -> JSONResponse:
        row = await store.get_strict("kv", request.path_params["key"])
        if row is None:
            return JSONResponse({"error": "not found"}, status_code=404)
        return JSONResponse(row)

    return Starlette(routes=[Route("/item/{key}", item)])


def _p(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def test_e10_redis_killed_under_load(make_store: MakeStore, fresh_redis: RedisServer) -> None:
    duration, kill_at, restart_at, open_seconds = (
        (40.0, 10.0, 20.0, 5.0) if LONG else (9.0, 2.0, 4.5, 2.0)
    )
    store = make_store(
        fresh_redis.url,
        {"failure_threshold": 5, "failure_window_sec": 10, "open_seconds": open_seconds},
    )
    await store.start()
    await store.mset("kv", {f"k{i}": {"v": i, "s": "x"} for i in range(KEYS)})
    for i in range(KEYS):  # whole rows read back: every key is mirrored in the fallback
        await store.get("kv", f"k{i}")
    breaker = breaker_of(store)
    fallback0 = store.stats()["breaker"].get("fallback_reads_total", 0)
    results: list[tuple[float, float, int, bool]] = []
    transitions: list[tuple[float, BreakerState]] = [(0.0, breaker.state)]
    marks: dict[str, float] = {}

    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=_app(store)), base_url="http://e10"
    ) as client:
        t0, done = time.monotonic(), asyncio.Event()

        async def one(i: int) -> None:
            watch = Stopwatch()
            open_at_start = breaker.state is BreakerState.OPEN
            r = await client.get(f"/item/k{i % KEYS}")
            # the app's latency: less the time other processes had the CPU this thread wanted
            lat = watch.own()
            both_open = open_at_start and breaker.state is BreakerState.OPEN
            results.append((watch.start - t0, lat, r.status_code, both_open))

        async def load() -> None:
            # Paced from the previous send, catching up at most CATCH_UP: the generator shares
            # the loop with the app, so after the loop stalled (a loaded machine) a schedule
            # kept from t0 would fire every missed request at once, a burst past the pool
            # that sheds it with PoolTimeoutError (the app's own saturation, not Redis's).
            # It sends them all, and goes on until the recovery bound has passed, however
            # late a loaded machine makes that.
            tasks: list[asyncio.Task[None]] = []
            due = t0
            while len(tasks) < duration * RATE or not recovery_over():
                delay = due - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
                tasks.append(asyncio.create_task(one(len(tasks))))
                due = max(due, time.monotonic() - CATCH_UP) + 1 / RATE
            await asyncio.gather(*tasks)
            done.set()

        def recovery_over() -> bool:
            back = marks.get("back")
            return back is not None and time.monotonic() - t0 > back + open_seconds + 1.5

        async def watch() -> None:
            while not done.is_set():
                s = breaker.state
                if s is not transitions[-1][1]:
                    transitions.append((time.monotonic() - t0, s))
                await asyncio.sleep(0.001)

        async def faults() -> None:
            await asyncio.sleep(kill_at)
            marks["kill"] = time.monotonic() - t0
            await asyncio.to_thread(fresh_redis.kill)
            await asyncio.sleep(restart_at - kill_at)
            await asyncio.to_thread(fresh_redis.start)
            marks["back"] = time.monotonic() - t0

        await asyncio.gather(load(), watch(), faults())

    opened = next(
        (t for t, s in transitions if s is BreakerState.OPEN and t >= marks["kill"]), None
    )
    closed = next(
        (t for t, s in transitions if s is BreakerState.CLOSED and t >= marks["back"]), None
    )
    open_lat = [lat for _, lat, _, both in results if both]
    all_lat = [lat for _, lat, _, _ in results]
    errors_5xx = sum(1 for *_, code, _ in results if code >= 500)
    fallback = store.stats()["breaker"].get("fallback_reads_total", 0) - fallback0
    clients = int(fresh_redis.info("clients")["connected_clients"]) - 1  # minus INFO's own
    open_after = (opened - marks["kill"]) if opened is not None else float("inf")
    recovery = (closed - marks["back"]) if closed is not None else float("inf")
    p99_open = _p(open_lat, 0.99)
    ok = (
        open_after <= 1.0
        and p99_open <= 0.005
        and errors_5xx == 0
        and recovery <= open_seconds + 1.0
        and clients <= 8
    )
    summary: dict[str, Any] = {
        "requests": len(results),
        "rate": RATE,
        "open_after_kill_s": round(open_after, 3),
        "p50_open_ms": round(_p(open_lat, 0.5) * 1000, 2),
        "p99_open_ms": round(p99_open * 1000, 2),
        "p99_all_ms": round(_p(all_lat, 0.99) * 1000, 2),
        "mean_ms": round(statistics.mean(all_lat) * 1000, 2),
        "5xx": errors_5xx,
        "degraded_pct": round(100 * fallback / max(1, len(results)), 1),
        "recovery_after_redis_back_s": round(recovery, 3),
        "connections_after": clients,
    }
    print(
        f"\nEXPERIMENT E10 redis-kill-under-load | duration={duration:.0f}s kill_at={kill_at}s "
        f"restart_at={restart_at}s open_seconds={open_seconds} | "
        + " ".join(f"{k}={v}" for k, v in summary.items())
        + f" | {'PASS' if ok else 'FAIL'}"
    )
    assert len(open_lat) > RATE * 0.5  # the breaker really was open under load
    assert open_after <= 1.0
    assert p99_open <= 0.005
    assert errors_5xx == 0
    assert recovery <= open_seconds + 1.0
    assert clients <= 8
    # Redis again (it lost its data: no persistence in the test server), writes accepted
    assert await store.get("kv", "k1") is False
    assert await store.set("kv", "k1", {"v": 1})
    assert breaker.state is BreakerState.CLOSED
