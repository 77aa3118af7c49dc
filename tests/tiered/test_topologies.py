"""The tiered backend over a real Redis Cluster and a real Sentinel-managed master.

L2 and the invalidation channel both go through the topology: a write on one node must reach
the other's L1 (dropped, then refilled with the new row), exactly as on a standalone server.
"""

from __future__ import annotations

from typing import Any

import pytest

from tests._harness.servers import RedisCluster, RedisSentinel

from .conftest import MakeNode, settle


def _topology(request: pytest.FixtureRequest, kind: str) -> dict[str, Any]:
    if kind == "cluster":
        cluster: RedisCluster = request.getfixturevalue("redis_cluster")
        return cluster.routing_conn()  # where invalidations go, not how fast
    sentinel: RedisSentinel = request.getfixturevalue("redis_sentinel")
    return {"sentinel": [f"{h}:{p}" for h, p in sentinel.sentinels], "service": sentinel.service}


@pytest.mark.parametrize("kind", ["cluster", "sentinel"])
async def test_invalidation_crosses_nodes(
    kind: str, make_node: MakeNode, request: pytest.FixtureRequest
) -> None:
    topology = _topology(request, kind)
    a, b = await make_node(**topology), await make_node(**topology)

    async def cached_on_b(key: str) -> None:
        await settle(a, b)
        await b.get("kv", key)
        assert await b.exists_cached("kv", key)

    await a.mset("kv", {"k1": {"v": 1}, "k2": {"v": 2}})
    await cached_on_b("k1")
    await cached_on_b("k2")
    await a.set("kv", "k1", {"v": 10, "s": "x"})
    await a.incr("kv", "k2", "v", 5)
    await settle(a, b)
    assert not await b.exists_cached("kv", "k1")
    assert await b.get("kv", "k1") == {"v": 10, "s": "x"}
    assert await b.get("kv", "k2", "v") == 7

    await cached_on_b("k1")
    assert await a.delete("kv", "k1")
    await settle(a, b)
    assert await b.get("kv", "k1") is False

    await cached_on_b("k2")
    assert await a.clear("kv") == 1
    await settle(a, b)
    assert await b.get_strict("kv", "k2") is None
    st = b.stats()["tiered"]
    assert st["invalidation"]["rejected"] == dict.fromkeys(st["invalidation"]["rejected"], 0)
    assert st["invalidations_applied_total"] >= 4 and st["signed"]
