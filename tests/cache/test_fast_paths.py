"""The hit fast paths keep every guarantee: raw row keys, the decode memo, verified file bytes.

Each fast path must change the cost of a hit, never its outcome: a changed, damaged, swapped or
expired entry is noticed on the very next read, and what a caller gets is never shared with
another caller.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests._harness.sched import Stopwatch
from tests.cache.conftest import SECRET, entry_files
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.cache.files.tier import FileTier
from zeal_asgi.cache.memo import DecodeMemo
from zeal_asgi.cache.serializer import JsonSerializer
from zeal_asgi.cache.tiers import LOCAL_KEY_BYTES, local_key
from zeal_asgi.errors import InvalidKeyError, KeyTooLongError, KeyTypeError

BIG = {"name": "alice", "score": 100, "bio": "x" * 10_000}
"""Over ``memory_value_bytes``: lives in a file behind a pointer row."""


async def _restarted(
    cache: Cache, store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> Cache:
    """A cache over the same directory and secret with an empty memory tier (a new server)."""
    return cache_factory(await store_factory("table"), secret=SECRET, namespace=cache.namespace)


def _flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))


# -- row keys on the table backend ------------------------------------------------------------


async def test_str_and_bytes_spellings_are_one_key(table_cache: Cache) -> None:
    await table_cache.set("ké", 1)
    assert await table_cache.get("ké".encode()) == 1
    await table_cache.set(b"plain", 2)
    assert await table_cache.get("plain") == 2
    await table_cache.set(b"\xff\xfe", 3)  # not UTF-8: a valid cache key all the same
    assert await table_cache.get(b"\xff\xfe") == 3
    assert await table_cache.count() == 3


async def test_long_keys_are_hashed_without_colliding_with_direct_keys(table_cache: Cache) -> None:
    table = table_cache.store.table(f"__{table_cache.namespace}")
    direct = b"d" * (LOCAL_KEY_BYTES - 1)
    long = b"L" * 4096
    await table_cache.set(direct, "direct")
    await table_cache.set(long, "long")
    # a key spelled exactly like the long key's row key is itself hashed: its own row
    await table_cache.set(local_key(long), "lookalike")
    assert table.get(direct, "v") is not None and len(local_key(long)) == LOCAL_KEY_BYTES
    assert await table_cache.get(long) == "long"
    assert await table_cache.get(local_key(long)) == "lookalike"
    assert await table_cache.get(direct) == "direct"
    assert await table_cache.count() == 3


@pytest.mark.parametrize(
    ("key", "error"),
    [
        ("", InvalidKeyError),
        (b"", InvalidKeyError),
        (7, KeyTypeError),
        ("k" * 4097, KeyTooLongError),
    ],
)
async def test_the_fast_path_validates_keys_like_set(
    table_cache: Cache, key: Any, error: type[Exception]
) -> None:
    for call in (table_cache.get, table_cache.has, table_cache.delete):
        with pytest.raises(error):
            await call(key)


# -- decode memo --------------------------------------------------------------------------------


@pytest.mark.parametrize("value", [{"a": 1, "b": "x"}, [1, "two", None], BIG])
async def test_mutating_a_returned_value_never_changes_the_next_hit(
    table_cache: Cache, value: Any
) -> None:
    await table_cache.set("k", value)
    for _ in range(3):
        got = await table_cache.get("k")
        assert got == value
        if isinstance(got, dict):
            got["a"] = "mutated"
            got.clear()
        else:
            got.append("mutated")


async def test_nested_values_are_decoded_fresh_every_time(table_cache: Cache) -> None:
    value = {"rows": [{"id": 1}, {"id": 2}], "tags": {"t"}}
    await table_cache.set("k", value)
    first = await table_cache.get("k")
    first["rows"][0]["id"] = 99
    first["tags"].add("mutated")
    second = await table_cache.get("k")
    assert second == value and second["rows"] is not first["rows"]


async def test_another_workers_write_is_seen_at_once(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache]
) -> None:
    """Two caches on one store share the table, like two workers: no memo hides a new value."""
    store = await store_factory("table")
    a = cache_factory(store, secret=SECRET)
    b = cache_factory(store, secret=SECRET, namespace=a.namespace)
    for i, value in enumerate([{"v": 1}, {"v": 2}, "text", {"v": 2}, BIG, {**BIG, "score": 1}]):
        await a.set("k", value)
        assert await b.get("k") == value, i
        assert await b.get("k") == value, i  # the second read goes through the memo
    await a.delete("k")
    assert await b.get("k", MISSING) is MISSING


def test_decode_memo_is_bounded_and_checks_the_bytes() -> None:
    ser = JsonSerializer()
    memo = DecodeMemo(ser, max_entries=8, max_bytes=1 << 20)
    one, two = ser.dumps({"v": 1}), ser.dumps({"v": 2})
    assert memo.loads("k", one) == {"v": 1}
    assert memo.loads("k", two) == {"v": 2}  # other bytes under the same slot: decoded again
    assert memo.loads("k", bytes(bytearray(two))) == {"v": 2}  # equal bytes, another object
    for i in range(100):
        memo.loads(i, ser.dumps({"i": i}))
        assert len(memo) <= 8
    nested = ser.dumps({"a": [1]})
    memo.loads("nested", nested)
    assert "nested" not in memo._memo  # no exact shallow copy exists: never kept


# -- verified file bytes -----------------------------------------------------------------------


async def test_a_file_changed_after_a_verified_hit_is_detected(
    table_cache: Cache, monkeypatch: pytest.MonkeyPatch
) -> None:
    await table_cache.set("big", BIG)
    assert await table_cache.get("big") == BIG  # verified with the HMAC, bytes kept
    macs = 0
    real_mac = FileTier._mac

    def counting_mac(self: FileTier, *args: Any) -> bytes:
        nonlocal macs
        macs += 1
        return real_mac(self, *args)

    monkeypatch.setattr(FileTier, "_mac", counting_mac)
    assert await table_cache.get("big") == BIG
    assert macs == 0  # identical bytes: recognised, not MACed again
    (f,) = entry_files(table_cache.files.path)
    _flip_last_byte(f)  # same size, one bit
    assert await table_cache.get("big", MISSING) is MISSING
    assert macs == 1 and table_cache.stats()["file_mac"] == 1
    assert entry_files(table_cache.files.path) == []


async def test_a_swapped_or_truncated_file_after_a_verified_hit_is_a_miss(
    table_cache: Cache,
) -> None:
    await table_cache.set("a", {**BIG, "name": "a"})
    await table_cache.set("b", {**BIG, "name": "b"})
    assert (await table_cache.get("a"))["name"] == "a"
    files = Path(table_cache.files.path)
    path_a, path_b = files / table_cache.files.name(b"a"), files / table_cache.files.name(b"b")
    path_a.write_bytes(path_b.read_bytes())  # an authentic entry of another key
    assert await table_cache.get("a", MISSING) is MISSING
    assert (await table_cache.get("b"))["name"] == "b"
    path_b.write_bytes(path_b.read_bytes()[:-1])
    assert await table_cache.get("b", MISSING) is MISSING
    path_b.write_bytes(b"")
    assert await table_cache.get("b", MISSING) is MISSING


async def test_restarted_hits_notice_expiry_and_changes(
    table_cache: Cache,
    store_factory: Callable[[str], Any],
    cache_factory: Callable[..., Cache],
) -> None:
    await table_cache.set("short", {"v": 1}, ttl=0.3)
    await table_cache.set("k", {"v": 1})
    after = await _restarted(table_cache, store_factory, cache_factory)
    for _ in range(3):  # file-tier hits (the new memory tier is empty), then from kept bytes
        assert await after.get("short") == {"v": 1}
        assert await after.get("k") == {"v": 1}
    await asyncio.sleep(0.35)
    assert await after.get("short", MISSING) is MISSING
    await table_cache.set("k", {"v": 2})  # the old server writes a new file
    assert await after.get("k") == {"v": 2}
    _flip_last_byte(Path(after.files.path) / after.files.name(b"k"))
    assert await after.get("k", MISSING) is MISSING
    stats = after.stats()
    assert stats["file_expired"] == 1 and stats["file_mac"] == 1
    assert stats["hits_file"] == 7


async def test_verified_bytes_stay_bounded(table_cache: Cache) -> None:
    files = table_cache.files
    for i in range(40):
        await table_cache.set(f"k{i}", "v" * 300_000)  # above the size kept per file
        assert await table_cache.get(f"k{i}") == "v" * 300_000
    assert files._verified == {} and files._verified_bytes == 0
    for i in range(40):
        await table_cache.set(f"s{i}", {"n": i, "pad": "p" * 20_000})
        await table_cache.get(f"s{i}")
    assert 0 < files._verified_bytes <= 8 << 20
    assert files._verified_bytes == sum(2 * len(v[0]) for v in files._verified.values())


async def test_file_tier_reads_still_take_the_full_path_when_bytes_differ(
    table_cache: Cache,
) -> None:
    """A size change with equal prefix (a grown file) is not mistaken for the verified one."""
    await table_cache.set("big", BIG)
    assert await table_cache.get("big") == BIG
    (f,) = entry_files(table_cache.files.path)
    with f.open("ab") as out:
        out.write(b"appended")
    watch = Stopwatch()
    assert await table_cache.get("big", MISSING) is MISSING
    assert watch.own() < 1.0
    assert table_cache.stats()["file_size"] == 1
