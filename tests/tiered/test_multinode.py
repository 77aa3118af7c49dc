"""Two real servers (uvicorn, 2 workers each) sharing one Redis through the tiered backend."""

from __future__ import annotations

import time
import uuid

import pytest

from tests._harness.apps import AppServer
from tests._harness.servers import RedisServer, running

from .conftest import SECRET

pytestmark = pytest.mark.servers

APP = "tests.tiered.apps.kv_app:app"


def _wait_value(node: AppServer, key: str, want: int, limit: float) -> float:
    """Seconds until ``node`` serves ``want`` for ``key`` (AssertionError after ``limit``)."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < limit:
        row = node.get(f"/get/{key}")["row"]
        if row is not None and row["v"] == want:
            return time.monotonic() - t0
        time.sleep(0.005)
    raise AssertionError(f"{node.url} still serves {key}={row} after {limit} s, want {want}")


def test_two_nodes_share_one_redis(redis_server: RedisServer) -> None:
    env = {
        "ZEAL_STORE_BACKEND": "tiered",
        "ZEAL_REDIS_URL": redis_server.url,
        "ZEAL_KEY_PREFIX": f"mn{uuid.uuid4().hex[:8]}",
        "ZEAL_L1_TTL": "60",  # far longer than the test: only invalidation can refresh L1
        "ZEAL_TIERED_INVALIDATION_SECRET": SECRET,
    }
    nodes = [AppServer(APP, server="uvicorn-workers", env=env) for _ in range(2)]
    with running(*nodes) as (a, b):
        for w in (*a.on_each_worker("/stats").values(), *b.on_each_worker("/stats").values()):
            assert w["tiered"]["signed"]
        delays = []
        for i, (writer, reader) in enumerate([(a, b), (b, a), (a, b), (b, a)]):
            key = f"k{i % 2}"
            writer.get(f"/set/{key}/{i}")
            delays.append(_wait_value(reader, key, i, limit=5.0))
            # every worker of the reader now serves it from its node's shared L1
            for answer in reader.on_each_worker(f"/get/{key}").values():
                assert answer["row"] == {"v": i, "s": "x"}
            assert any(r["cached"] for r in reader.on_each_worker(f"/get/{key}").values())
        # one shared L1 per node: a row cached by one worker is cached for its siblings
        b.get("/set/shared/7")
        _wait_value(a, "shared", 7, 5.0)
        assert all(r["cached"] for r in a.on_each_worker("/get/shared").values())

        for _ in range(25):
            a.get("/hit")
            b.get("/hit")
        totals = {r["total"] for n in (a, b) for r in n.on_each_worker("/hits").values()}
        print(
            f"\nmulti-node: invalidation delays ms={[round(d * 1000, 1) for d in delays]} "
            f"hit totals seen={sorted(totals)}"
        )
        assert totals == {50}  # counters add up across nodes and workers
        assert max(delays) < 5.0
