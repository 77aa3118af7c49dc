"""The breaker under a real server (uvicorn, 2 workers): one state and one fallback per host."""

from __future__ import annotations

import uuid

import pytest

from tests._harness.apps import AppServer
from tests._harness.sched import Stopwatch
from tests._harness.servers import RedisServer

pytestmark = pytest.mark.servers


def test_state_and_fallback_are_shared_by_the_workers(fresh_redis: RedisServer) -> None:
    env = {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": fresh_redis.url,
        "ZEAL_KEY_PREFIX": f"bw{uuid.uuid4().hex[:8]}",
        "ZEAL_ON_ERROR": "fallback_table",
    }
    with AppServer("tests.tiered.apps.kv_app:app", server="uvicorn-workers", env=env) as node:
        for i in range(20):  # written through whichever worker: mirrored in the shared fallback
            node.get(f"/set/k{i}/{i}")
        fresh_redis.kill()
        opened_by = None
        for _ in range(100):
            answer = node.get("/get/k1")
            assert answer["row"] == {"v": 1, "s": "x"}  # failures fall back too: never a 5xx
            if node.get("/stats")["breaker"]["state"] == "open":
                opened_by = answer["pid"]
                break
        assert opened_by is not None
        states = node.on_each_worker("/stats")
        assert {w["breaker"]["state"] for w in states.values()} == {"open"}
        # one breaker for the host: it opened after `failure_threshold` failures in total, not
        # that many per worker (each worker's own failures are listed separately)
        host = next(iter(states.values()))["breaker"]
        assert host["opened_total"] == 1
        assert host["failures_total"] < 2 * 5
        rows = node.on_each_worker("/get/k7")  # every worker serves the shared fallback
        assert all(r["row"] == {"v": 7, "s": "x"} for r in rows.values())
        watch = Stopwatch(*node.worker_pids)  # the workers' CPU wait is not theirs either
        refused = node.on_each_worker("/set/k1/99", expect=503)
        assert all("circuit breaker open" in r["error"] for r in refused.values())
        assert watch.own() < 2.0
        seen = [w["breaker"]["state"] for w in states.values()]
        print(
            f"\nbreaker across workers: opened by pid {opened_by}; host failures="
            f"{host['failures_total']}; states seen by the workers={seen}"
        )
