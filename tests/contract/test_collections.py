"""Whole-table calls: count, iterate, mget, mset, clear; and tables whose rows expire (ttl mode).

Memcached cannot list its keys: there count, iterate and clear must raise
UnsupportedOperationError (asserted, never skipped).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from zeal_asgi.errors import ColumnTypeError, KeyTooLongError, UnsupportedOperationError
from zeal_asgi.store import Store

from ._support import LISTING, ZERO_ROW, Servers, StoreMaker, raises_exact

TTL = 1
EXPIRY_LIMIT = TTL + 2.0
"""Seconds after a write by which a ttl row must be gone (memcached's clock ticks in seconds)."""


def rows(n: int) -> dict[str, dict[str, Any]]:
    """``n`` distinct rows keyed ``r0``, ``r1``, ..."""
    return {f"r{i}": {"i4": i, "name": f"n{i}"} for i in range(n)}


async def listing(store: Store, table: str = "t") -> dict[Any, dict[str, Any]]:
    """Every row of ``table`` through ``Store.iterate``."""
    return {key: row async for key, row in store.iterate(table)}


async def test_count_follows_sets_and_deletes(store: Store, backend: str) -> None:
    if backend not in LISTING:
        exc = await raises_exact(UnsupportedOperationError, store.count("t"))
        assert "memcached" in str(exc)
        return
    assert await store.count("t") == 0
    for i in range(10):
        await store.set("t", f"r{i}", {"i4": i})
    assert await store.count("t") == 10
    await store.set("t", "r3", {"i4": 33})  # an update is not a new row
    await store.incr("t", "r4", "i4")
    await store.compare_and_set("t", "r5", "i4", 5, 6)
    assert await store.count("t") == 10
    await store.incr("t", "fresh", "i4")  # creating through incr counts
    await store.compare_and_set("t", "fresh2", "i4", 0, 1)
    assert await store.count("t") == 12
    assert await store.delete("t", "r0") is True
    assert await store.delete("t", "r0") is False  # a second delete does not count twice
    assert await store.count("t") == 11


async def test_iterate_yields_every_row_once(store: Store, backend: str) -> None:
    want = {k: {**ZERO_ROW, **r} for k, r in rows(150).items()}
    await store.mset("t", rows(150))
    if backend not in LISTING:
        with pytest.raises(UnsupportedOperationError):
            async for _ in store.iterate("t"):
                pass
        return
    got = await listing(store)
    assert got == want
    for key, row in got.items():
        assert type(key) is str and list(row) == list(ZERO_ROW)
    await store.delete("t", "r7")
    del want["r7"]
    assert await listing(store) == want


async def test_iterate_survives_concurrent_writes(store: Store, backend: str) -> None:
    """Rows present throughout are never skipped; rows added or deleted meanwhile may show."""
    if backend not in LISTING:
        with pytest.raises(UnsupportedOperationError):
            async for _ in store.iterate("t"):
                pass
        return
    stable = rows(100)
    await store.mset("t", stable)
    seen: dict[Any, dict[str, Any]] = {}
    i = 0
    await store.mset("t", {f"gone{j}": {"i4": -2} for j in range(20)})
    async for key, row in store.iterate("t"):
        seen[key] = row
        if i < 40:  # bounded: the new rows may be iterated too
            await store.set("t", f"new{i}", {"i4": -1})
        if i < 20:
            await store.delete("t", f"gone{i}")
        i += 1
    assert set(stable) <= set(seen)
    for key in stable:
        assert seen[key]["i4"] == stable[key]["i4"]


async def test_mget_keeps_order_and_gives_none_for_misses(store: Store) -> None:
    await store.mset("t", rows(3))
    keys: list[str | bytes] = ["r2", "absent", "r0", b"r1", "r2", "also-absent"]
    got = await store.mget("t", keys)
    assert got == [
        {**ZERO_ROW, "i4": 2, "name": "n2"},
        None,
        {**ZERO_ROW, "i4": 0, "name": "n0"},
        {**ZERO_ROW, "i4": 1, "name": "n1"},
        {**ZERO_ROW, "i4": 2, "name": "n2"},
        None,
    ]
    assert await store.mget("t", []) == []
    assert await store.mget("t", ("r1",)) == [{**ZERO_ROW, "i4": 1, "name": "n1"}]


async def test_mget_of_many_keys(store: Store) -> None:
    await store.mset("t", rows(250))
    keys = [f"r{i}" for i in range(260)]
    got = await store.mget("t", keys)
    assert got[:250] == [{**ZERO_ROW, "i4": i, "name": f"n{i}"} for i in range(250)]
    assert got[250:] == [None] * 10


async def test_mset_merges_like_set(store: Store) -> None:
    await store.set("t", "a", {"name": "keep", "i8": 8})
    written = await store.mset("t", {"a": {"i4": 1}, "b": {"f": 1.5}, b"c": {}})
    assert written == 3
    assert await store.mget("t", ["a", "b", "c"]) == [
        {**ZERO_ROW, "name": "keep", "i8": 8, "i4": 1},
        {**ZERO_ROW, "f": 1.5},
        ZERO_ROW,
    ]
    assert await store.mset("t", {}) == 0


async def test_mset_validates_everything_before_writing(store: Store, backend: str) -> None:
    await store.set("t", "a", {"i4": 1})
    bad_rows: list[tuple[type[Exception], dict[Any, Any]]] = [
        (ColumnTypeError, {"a": {"i4": 2}, "b": {"i4": 2}, "c": {"i4": "3"}}),
        (KeyTooLongError, {"a": {"i4": 2}, "b": {"i4": 2}, "k" * 65: {"i4": 3}}),
    ]
    for error, batch in bad_rows:
        await raises_exact(error, store.mset("t", batch))
        assert await store.mget("t", ["a", "b"]) == [{**ZERO_ROW, "i4": 1}, None]
        if backend in LISTING:
            assert await store.count("t") == 1


async def test_clear_removes_every_row(store: Store, backend: str) -> None:
    await store.mset("t", rows(40))
    await store.set("bin", b"\x00", {"v": 1})
    if backend not in LISTING:
        await raises_exact(UnsupportedOperationError, store.clear("t"))
        assert await store.get_strict("t", "r0", "i4") == 0  # nothing was flushed
        return
    assert await store.clear("t") == 40
    assert await store.count("t") == 0
    assert await listing(store) == {}
    assert await store.mget("t", ["r0", "r39"]) == [None, None]
    assert await store.exists("t", "r1") is False
    assert await store.get_strict("bin", b"\x00", "v") == 1  # other tables untouched
    await store.set("t", "r0", {"i1": 1})  # the table is usable afterwards, rows start at zero
    assert await store.get_strict("t", "r0") == {**ZERO_ROW, "i1": 1}
    assert await store.count("t") == 1
    assert await store.clear("t") == 1
    assert await store.clear("t") == 0


async def test_tables_are_independent(store: Store, make_store: StoreMaker, backend: str) -> None:
    other = make_store()  # another app (prefix / namespace) on the same servers
    other.make("t", 16, {"i4": (Store.TYPE_INT, 4)})
    await other.start()
    await store.set("t", "k", {"i4": 1})
    assert await other.get_strict("t", "k") is None
    await other.set("t", "k", {"i4": 2})
    assert await store.get_strict("t", "k", "i4") == 1
    if backend in LISTING:
        assert await other.clear("t") == 1
        assert await store.count("t") == 1


@pytest.fixture
async def ttl_store(make_store: StoreMaker) -> Store:
    """A store with table ``ttl`` (mode="ttl", ttl=1 s) and ``t`` (tracked, never expires)."""
    s = make_store()
    s.make("ttl", 64, {"v": (Store.TYPE_INT, 8), "s": (Store.TYPE_STRING, 8)}, mode="ttl", ttl=TTL)
    s.make("t", 64, {"v": (Store.TYPE_INT, 8)})
    await s.start()
    return s


async def _gone_within(store: Store, key: str, limit: float) -> float:
    start = time.monotonic()
    while await store.get_strict("ttl", key) is not None:
        assert time.monotonic() - start < limit, f"row {key!r} still there after {limit} s"
        await asyncio.sleep(0.05)
    return time.monotonic() - start


async def test_ttl_rows_expire(ttl_store: Store, backend: str) -> None:
    s = ttl_store
    await s.set("ttl", "written", {"v": 1, "s": "x"})
    await s.incr("ttl", "incremented", "v", 5)
    await s.mset("ttl", {"batched": {"v": 2}})
    await s.set("t", "forever", {"v": 9})
    assert await s.get_strict("ttl", "written") == {"v": 1, "s": "x"}
    assert await s.get_strict("ttl", "incremented", "v") == 5
    await asyncio.gather(
        *(_gone_within(s, k, EXPIRY_LIMIT) for k in ("written", "incremented", "batched"))
    )
    assert await s.exists("ttl", "written") is False
    assert await s.get("ttl", "incremented") is False
    assert await s.mget("ttl", ["batched"]) == [None]
    if backend in LISTING:
        assert await listing(s, "ttl") == {}
    assert await s.get_strict("t", "forever", "v") == 9
    # An expired row lends nothing to the row written after it.
    await s.set("ttl", "written", {"s": "new"})
    assert await s.get_strict("ttl", "written") == {"v": 0, "s": "new"}
    assert await s.incr("ttl", "incremented", "v") == 1


async def test_ttl_row_written_by_compare_and_set_expires(ttl_store: Store) -> None:
    s = ttl_store
    assert await s.compare_and_set("ttl", "swapped", "v", 0, 3) is True
    await s.set("ttl", "updated", {"v": 1})
    assert await s.compare_and_set("ttl", "updated", "v", 1, 2) is True
    assert await s.get_strict("ttl", "swapped", "v") == 3
    await asyncio.gather(*(_gone_within(s, k, EXPIRY_LIMIT) for k in ("swapped", "updated")))


async def _memcached_time(url: str) -> int:
    """memcached's clock (``STAT time``): whole seconds, advanced by a once-a-second timer."""
    host, port = url.removeprefix("memcached://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(b"stats\r\n")
        await writer.drain()
        while line := await reader.readline():
            if line.startswith(b"STAT time "):
                return int(line.split()[2])
        raise AssertionError("memcached sent no STAT time")
    finally:
        writer.close()
        await writer.wait_closed()


async def _next_memcached_tick(url: str) -> None:
    start = await _memcached_time(url)
    for _ in range(300):  # polled: memcached has no way to announce its tick
        if await _memcached_time(url) != start:
            return
        await asyncio.sleep(0.01)
    raise AssertionError("memcached's clock did not advance in 3 s")


async def test_ttl_row_lives_its_whole_ttl(ttl_store: Store, servers: Servers) -> None:
    """A row written with ttl=1 is still there half a second later, whenever it was written.

    On memcached the worst case is forced: the write lands just before its clock ticks.
    """
    if servers.memcached_url is not None:
        await _next_memcached_tick(servers.memcached_url)
        await asyncio.sleep(0.7)  # the next tick is ~0.3 s away
    await ttl_store.set("ttl", "k", {"v": 1})
    written = time.monotonic()
    await asyncio.sleep(TTL / 2)
    row = await ttl_store.get_strict("ttl", "k")
    lived = time.monotonic() - written
    assert row == {"v": 1, "s": ""}, f"a ttl={TTL} row was gone {lived:.2f} s after its write"


def test_ttl_is_refused_on_tracked_tables_and_required_on_ttl_tables(
    make_store: StoreMaker,
) -> None:
    from zeal_asgi.errors import ConfigError

    s = make_store()
    cols = {"v": (Store.TYPE_INT, 8)}
    for kwargs in ({"ttl": 5}, {"mode": "ttl"}, {"mode": "ttl", "ttl": 0}, {"mode": "lru"}):
        with pytest.raises(ConfigError):
            s.make("bad", 8, cols, **kwargs)
    assert "bad" not in s.names()
