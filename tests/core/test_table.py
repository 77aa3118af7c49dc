"""Table behaviour: the API of API.md's Table section, merge semantics, iteration, stats."""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Callable
from typing import Any

import pytest

from zeal_asgi import Table
from zeal_asgi.errors import TableFullError, UnknownColumnError

MakeTable = Callable[..., Table]
COLS = {"name": ("string", 64), "score": ("int", 4), "ratio": ("float",)}


def test_set_get_merge_and_zero_defaults(make_table: MakeTable) -> None:
    t = make_table(128, COLS)
    assert t.set("user_1", {"name": "alice", "score": 100}) is True
    assert t.get("user_1") == {"name": "alice", "score": 100, "ratio": 0.0}
    assert list(t.get("user_1")) == ["name", "score", "ratio"]  # declaration order
    t.set("user_1", {"ratio": 0.5})  # merge: only the given column changes
    assert t.get("user_1") == {"name": "alice", "score": 100, "ratio": 0.5}
    assert t.get("user_1", "score") == 100
    assert t.get("missing") is None
    assert t.get("missing", "score") is None
    with pytest.raises(UnknownColumnError, match="no column 'nope'"):
        t.get("user_1", "nope")


def test_incr_decr_creates_and_returns_typed(make_table: MakeTable) -> None:
    t = make_table(16, COLS)
    assert t.incr("page_hits", "score") == 1
    assert t.incr("page_hits", "score", 41) == 42
    assert t.decr("page_hits", "score", 2) == 40
    assert t.get("page_hits") == {"name": "", "score": 40, "ratio": 0.0}
    assert t.incr("f", "ratio", 0.25) == 0.25
    assert isinstance(t.incr("f", "ratio", 1), float)
    assert t.decr("fresh", "score") == -1


def test_compare_and_set(make_table: MakeTable) -> None:
    t = make_table(16, COLS)
    assert t.compare_and_set("k", "score", 1, 2) is False
    assert not t.exists("k")  # a failed CAS on a missing row creates nothing
    assert t.compare_and_set("k", "score", 0, 5) is True  # missing row compares as zeros
    assert t.get("k", "score") == 5
    assert t.compare_and_set("k", "name", "", "bob") is True
    assert t.compare_and_set("k", "name", "x", "eve") is False
    assert t.get("k") == {"name": "bob", "score": 5, "ratio": 0.0}


def test_delete_exists_len_clear(make_table: MakeTable) -> None:
    t = make_table(64, COLS)
    for i in range(50):
        t.set(f"k{i}", {"score": i})
    assert len(t) == t.count() == 50
    assert t.exists("k7") and "k7" in t
    assert t.delete("k7") is True
    assert t.delete("k7") is False
    assert not t.exists("k7")
    assert len(t) == 49
    t.clear()
    assert len(t) == 0 and list(t.items()) == []
    t.set("again", {"score": 1})
    assert t.get("again", "score") == 1


def test_delete_if_removes_only_a_row_still_holding_the_value(make_table: MakeTable) -> None:
    t = make_table(16, COLS)
    t.set("k", {"name": "alice", "score": 7, "ratio": 0.5})
    assert t.delete_if("k", "score", 8) is False  # changed since it was read: kept
    assert t.get("k") == {"name": "alice", "score": 7, "ratio": 0.5}
    assert t.delete_if("k", "name", "bob") is False and t.delete_if("k", "ratio", 0.25) is False
    assert t.delete_if("k", "name", "alice") is True
    assert t.get("k") is None and len(t) == 0
    assert t.delete_if("k", "score", 0) is False  # a missing row is not the zero row here
    t.set("f", {"ratio": 0.5})
    assert t.delete_if("f", "ratio", 0.5) is True
    with pytest.raises(UnknownColumnError):
        t.delete_if("f", "nope", 1)


def _incr_n(name: str, n: int) -> None:
    t = Table(16, COLS, name=name)
    for _ in range(n):
        t.incr("k", "score")
    t.close()


def test_delete_if_loses_no_increment_of_another_process(make_table: MakeTable) -> None:
    """A reader deletes the row at the value it read while another process increments it:
    every increment ends either in a deleted row's value or in the row left, none lost."""
    t = make_table(16, COLS)
    n = 300_000
    writer = mp.get_context("fork").Process(target=_incr_n, args=(t.name, n))
    writer.start()
    removed = 0
    while writer.is_alive():
        seen = t.get("k", "score")
        if seen and t.delete_if("k", "score", seen):
            removed += seen
    writer.join(60)
    assert writer.exitcode == 0
    assert removed > 0 and removed + (t.get("k", "score") or 0) == n


def test_capacity_is_exactly_max_rows_never_less(make_table: MakeTable) -> None:
    for max_rows in (1, 7, 64, 1000, 1025):
        t = make_table(max_rows, {"v": ("int", 8)})
        assert t.capacity == max_rows
        for i in range(max_rows):
            t.set(f"key-{i}", {"v": i})  # never refused before max_rows rows exist
        assert len(t) == max_rows
        with pytest.raises(TableFullError, match=f"{max_rows} rows"):
            t.set("one-too-many", {"v": 1})
        assert not t.exists("one-too-many")
        assert t.get("key-0", "v") == 0  # stored data intact
        t.delete("key-0")
        t.set("one-too-many", {"v": 2})  # a freed row is reusable
        assert t.get("one-too-many", "v") == 2


def test_many_deletes_and_reinserts_keep_every_key_reachable(make_table: MakeTable) -> None:
    t = make_table(500, {"v": ("int", 8)})
    live: dict[str, int] = {}
    for rnd in range(20):
        for i in range(500):
            k = f"r{(i * 7919 + rnd) % 997}"
            if k in live and (i + rnd) % 3 == 0:
                assert t.delete(k)
                del live[k]
            elif k not in live and len(live) < 500:
                t.set(k, {"v": i})
                live[k] = i
    assert len(t) == len(live)
    for k, v in live.items():
        assert t.get(k, "v") == v
    assert dict((k, r["v"]) for k, r in t.items()) == live


def test_memory_per_row_at_one_million_rows(make_table: MakeTable) -> None:
    t = make_table(1_000_000, {"v": ("string", 32)})
    per_row = t.memory_bytes / 1_000_000
    assert per_row <= 140, per_row  # half the 280 B/row of the original engine
    assert t.capacity == 1_000_000


def test_iteration_binary_keys_with_nul(make_table: MakeTable) -> None:
    t = make_table(16, {"v": ("int", 4)}, binary_keys=True)
    keys = [b"a\x00b", b"\x00", b"\xff\xfe", "caf\u00e9".encode()]
    for i, k in enumerate(keys):
        t.set(k, {"v": i})
    assert sorted(t.keys()) == sorted(keys)
    assert {k: r["v"] for k, r in t.items()} == {k: i for i, k in enumerate(keys)}
    assert t.get(b"a\x00b", "v") == 0 and t.get(b"a", "v") is None


def test_str_keys_with_nul_round_trip(make_table: MakeTable) -> None:
    t = make_table(16, {"v": ("int", 4)})
    t.set("a\x00b", {"v": 1})
    t.set("a", {"v": 2})
    assert sorted(t.keys()) == ["a", "a\x00b"]
    t.set(b"utf8-bytes", {"v": 3})  # valid UTF-8 bytes are accepted and come back as str
    assert "utf8-bytes" in set(t.keys())


def test_iteration_tolerates_concurrent_inserts_and_deletes(make_table: MakeTable) -> None:
    t = make_table(2000, {"v": ("int", 8)})
    for i in range(1000):
        t.set(f"stay{i}", {"v": i})
    for i in range(500):
        t.set(f"churn{i}", {"v": i})
    seen: set[str] = set()
    for n, (key, _row) in enumerate(t.items(), start=1):
        seen.add(key)
        # mutate while iterating: delete churn rows, add new ones
        if n % 2 == 0:
            t.delete(f"churn{n % 500}")
        elif n < 800:  # rows added meanwhile may be seen too: bound the growth
            t.set(f"new{n}", {"v": n})
    assert {f"stay{i}" for i in range(1000)} <= seen  # rows present throughout are never skipped


def test_float_and_int_widths(make_table: MakeTable) -> None:
    t = make_table(
        8, {"i1": ("int", 1), "i2": ("int", 2), "i4": ("int", 4), "i8": ("int", 8), "f": ("float",)}
    )
    row: dict[str, Any] = {"i1": -128, "i2": 32767, "i4": -(2**31), "i8": 2**63 - 1, "f": 1e308}
    t.set("k", row)
    assert t.get("k") == row
    t.set("k", {"f": 3})  # an int that a double holds exactly is accepted in a FLOAT column
    assert t.get("k", "f") == 3.0 and isinstance(t.get("k", "f"), float)


def test_unicode_string_limit_is_in_bytes(make_table: MakeTable) -> None:
    t = make_table(8, {"s": ("string", 4)})
    t.set("k", {"s": "\u00e9\u00e9"})  # 4 bytes in UTF-8
    assert t.get("k", "s") == "\u00e9\u00e9"
    t.set("k", {"s": ""})
    assert t.get("k", "s") == ""


def test_stats_and_repr(make_table: MakeTable) -> None:
    t = make_table(100, COLS)
    t.set("a", {"score": 1})
    t.delete("a")
    t.set("b", {"score": 1})
    st = t.stats()
    assert st["rows"] == 1 and st["capacity"] == 100
    assert st["inserts"] == 2 and st["deletes"] == 1
    assert st["lock_recoveries"] == 0 and st["rows_lost"] == 0
    assert st["memory_bytes"] == t.memory_bytes
    assert "rows=1" in repr(t)


def test_table_cannot_be_pickled(make_table: MakeTable) -> None:
    import pickle

    t = make_table(8, COLS)
    with pytest.raises(TypeError, match="cannot be pickled"):
        pickle.dumps(t)


def test_closed_table_raises(make_table: MakeTable) -> None:
    from zeal_asgi.errors import ShmError

    t = make_table(8, COLS)
    t.close()
    assert t.closed
    with pytest.raises(ShmError, match="closed"):
        t.get("k")
    t.close()  # idempotent
