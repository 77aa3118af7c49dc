"""Sentinel: master + replica + 3 sentinels; SIGKILL the master under load, the Store recovers."""

from __future__ import annotations

import asyncio
import time

from tests._harness.servers import RedisSentinel, require_binary
from zeal_asgi.errors import BackendError
from zeal_asgi.store import Store
from zeal_asgi.store.backends.redis import RedisBackend

from .conftest import unique_prefix

DOWN_AFTER_MS = 1000
FAILOVER_TIMEOUT_MS = 5000


async def test_sentinel_failover_under_load() -> None:
    require_binary("redis-sentinel")
    with RedisSentinel(down_after_ms=DOWN_AFTER_MS, failover_timeout_ms=FAILOVER_TIMEOUT_MS) as rs:
        sentinels = [f"{h}:{p}" for h, p in rs.sentinels]
        store = Store(
            "redis", {"sentinel": sentinels, "service": rs.service, "prefix": unique_prefix()}
        )
        store.make("t", 1000, {"n": (Store.TYPE_INT, 8), "s": (Store.TYPE_STRING, 16)})
        backend = store.backend
        assert isinstance(backend, RedisBackend)
        cfg = backend.config
        try:
            await store.start()
            assert await store.set("t", "before", {"s": "x"})
            own = await backend.dedicated_client()  # off the pool, same sentinel discovery
            try:
                assert await own.hget(backend.row_key("t", "before"), "s") == b"x"
            finally:
                await own.aclose()
            ok_times: list[float] = []
            error_times: list[float] = []
            errors: dict[str, int] = {}
            ops = 0
            killed_at = 0.0
            stop = asyncio.Event()

            async def load() -> None:
                # ~300 ops/s: set, get, incr in turn, paced by a short sleep.
                nonlocal ops
                i = 0
                while not stop.is_set():
                    i += 1
                    key = f"k{i % 50}"
                    try:
                        match i % 3:
                            case 0:
                                await store.set("t", key, {"s": str(i)})
                            case 1:
                                await store.get_strict("t", key)
                            case _:
                                await store.incr("t", "hits", "n", 1)
                        ok_times.append(time.monotonic())
                    except BackendError as exc:  # typed errors only: anything else fails
                        errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                        error_times.append(time.monotonic())
                    ops += 1
                    await asyncio.sleep(0.003)

            runner = asyncio.create_task(load())
            await asyncio.sleep(0.5)
            ops_before = ops
            killed_at = time.monotonic()
            rs.master.kill()
            # Recovered: a second of successes, and no error, since the last error.
            limit = killed_at + 20.0
            while time.monotonic() < limit:
                await asyncio.sleep(0.1)
                if error_times and ok_times[-1] - error_times[-1] > 1.0:
                    break
            stop.set()
            await runner
            new_master = await asyncio.to_thread(rs.wait_for_failover, 10.0)
            last_error = error_times[-1] if error_times else killed_at
            recovered_at = min((t for t in ok_times if t > last_error), default=float("inf"))
            recovery = recovered_at - killed_at
            rate = ops_before / 0.5
            # Sentinel needs down-after-milliseconds to call the master down, then elects a leader
            # and promotes the replica (bounded by failover-timeout); the client then needs at most
            # one call deadline to land on the new master.
            bound = (DOWN_AFTER_MS + FAILOVER_TIMEOUT_MS) / 1000 + cfg.deadline
            n_errors = sum(errors.values())
            passed = bool(errors) and recovery <= bound and new_master[1] == rs.master.port
            print(
                f"\nEXPERIMENT sentinel-failover | SIGKILL master, {rate:.0f} ops/s set/get/incr, "
                f"down_after={DOWN_AFTER_MS}ms failover_timeout={FAILOVER_TIMEOUT_MS}ms | "
                f"errors_during_failover={n_errors} {errors} time_to_recover={recovery:.2f}s "
                f"bound={bound:.2f}s ops={ops} | {'PASS' if passed else 'FAIL'}"
            )
            assert passed
            # the Store keeps working on the promoted replica
            assert await store.set("t", "after", {"s": "y"})
            assert await store.get_strict("t", "after", "s") == "y"
            assert await store.get_strict("t", "before", "s") == "x"  # replicated before the kill
            assert await store.count("t") >= 3
            assert backend.stats()["redis"]["in_use"] == 0
        finally:
            await store.aclose()
