"""Repeated memory-tier hits on the table backend (``Tiers.hot``: a compiled ``FieldMemo`` per
key) change the cost of a hit, never its outcome or its count."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any

import pytest

from tests.cache.conftest import SECRET
from zeal_asgi import Store
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.errors import ColumnTypeError, ShmError
from zeal_asgi.shm.ext import FieldMemo, Table, Tally
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.segments import destroy


def _hits(cache: Cache) -> int:
    return int(cache.stats().get("hits_memory", 0))


@pytest.mark.parametrize("serializer", ["json", "pickle"])
async def test_kept_hits_are_counted_exactly(
    serializer: str, store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    table_cache = cache_factory(await store_factory("table"), secret=SECRET, serializer=serializer)
    await table_cache.set("k", {"v": 1})
    await table_cache.set("long", "x" * 6000)  # its part of the row is longer than the stack's
    before = _hits(table_cache)
    for _ in range(50):
        assert await table_cache.get("k") == {"v": 1}
        assert await table_cache.get("long") == "x" * 6000
    assert {"k", "long"} <= table_cache._tiers.hot.keys()
    assert await table_cache.get_or_compute("k", lambda: pytest.fail("a hit computes nothing"))
    assert await table_cache.has("k")
    assert _hits(table_cache) == before + 102
    assert await table_cache.get("other", MISSING) is MISSING
    assert table_cache.stats()["misses"] == 1 and _hits(table_cache) == before + 102
    assert table_cache._tiers.hot["long"].get(None) == "x" * 6000  # kept hits, not re-kept ones


async def test_get_or_compute_alone_keeps_its_row_and_counts_each_lookup_once(
    table_cache: Cache,
) -> None:
    assert await table_cache.get_or_compute("g", lambda: {"v": 1}) == {"v": 1}  # computed
    assert table_cache.stats()["misses"] == 1
    before = _hits(table_cache)
    for _ in range(5):
        assert await table_cache.get_or_compute("g", lambda: pytest.fail("a hit")) == {"v": 1}
    assert "g" in table_cache._tiers.hot  # kept by its first hit, as ``get`` keeps it
    assert _hits(table_cache) == before + 5 and table_cache.stats()["misses"] == 1


async def test_a_forked_worker_counts_its_kept_hits_in_its_own_row(table_cache: Cache) -> None:
    await table_cache.set("k", {"v": 1})
    for _ in range(3):
        await table_cache.get("k")
    metric = table_cache._tiers.hits_memory
    parent = host_stats().worker().get(metric, 0)
    pid = os.fork()
    if pid == 0:  # the child: its own event loop, its own counter row
        code = 1
        try:
            got = asyncio.new_event_loop().run_until_complete(table_cache.get("k"))
            code = 0 if got == {"v": 1} else 2
        finally:
            os._exit(code)
    _, status = await asyncio.to_thread(os.waitpid, pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert host_stats().workers()[pid][metric] == 1
    assert host_stats().worker().get(metric, 0) == parent


async def test_a_kept_hit_honours_expiry_and_every_change(table_cache: Cache) -> None:
    await table_cache.set("k", {"v": 1}, ttl=0.3)
    assert await table_cache.get("k") == await table_cache.get("k") == {"v": 1}
    await asyncio.sleep(0.35)
    assert await table_cache.get("k", MISSING) is MISSING
    assert table_cache.stats()["memory_expired"] == 1
    await table_cache.set("k", {"v": 2})
    assert await table_cache.get("k") == await table_cache.get("k") == {"v": 2}
    await table_cache.set("k", {"v": 3})  # same length, other bytes
    assert await table_cache.get("k") == {"v": 3}
    await table_cache.delete("k")
    assert await table_cache.get("k", MISSING) is MISSING


async def test_what_a_kept_hit_returns_is_the_callers_own(table_cache: Cache) -> None:
    await table_cache.set("d", {"a": 1})
    await table_cache.set("l", [1, 2])
    for _ in range(3):
        d: Any = await table_cache.get("d")
        d["a"] = 2
        lst: Any = await table_cache.get_or_compute("l", list)
        lst.append(3)
    assert await table_cache.get("d") == {"a": 1} and await table_cache.get("l") == [1, 2]


@pytest.fixture
def table() -> Any:
    t = Table(
        8, {"v": (Store.TYPE_BYTES, 4096), "n": (Store.TYPE_INT, 8)}, name=f"hot{os.getpid()}"
    )
    yield t
    destroy(t)


def test_field_memo_answers_only_while_the_row_holds_the_bytes(table: Any) -> None:
    table.set("k", {"v": b"abc"})
    tally = Tally(table, "count", "n")
    memo = FieldMemo(table, "k", "v", b"abc", 0.0, lambda: "made", tally)
    assert memo.get(None) == memo.get(None) == "made"
    assert FieldMemo(table, "k", "v", b"ab", 0.0, str).get(None) is None
    assert FieldMemo(table, "k", "v", b"abc", 1.0, str).get(None) is None  # until has come
    assert FieldMemo(table, "nope", "v", b"abc", 0.0, str).get(None) is None
    table.set("k", {"v": b"abd"})
    assert memo.get(None) is None
    table.set("k", {"v": b"abc", "n": 7})  # other columns do not matter
    assert memo.get(None) == "made"
    table.delete("k")
    assert memo.get(None) is None
    assert table.get("count", "n") == 3
    with pytest.raises(ColumnTypeError):
        FieldMemo(table, "k", "n", b"", 0.0, str)
    with pytest.raises(ColumnTypeError):
        Tally(table, "k", "v")
    table.close()
    with pytest.raises(ShmError):
        memo.get(None)
    with pytest.raises(ShmError):
        tally.add()
