"""Tables whose rows expire (``Table(..., ttl=seconds)``): expiry decided inside the core."""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from zeal_asgi import Table
from zeal_asgi.errors import InvalidTTLError, ShmAbiMismatchError, TableFullError

MakeTable = Callable[..., Table]
COLS = {"n": ("int", 8), "s": ("string", 8)}
TTL = 0.2


def test_rows_expire_after_their_last_write(make_table: MakeTable) -> None:
    t = make_table(16, COLS, ttl=TTL)
    t.set("a", {"n": 1, "s": "x"})
    t.set("b", {"n": 2})
    time.sleep(TTL / 2)
    t.incr("b", "n")  # a write renews the row's life; a read does not
    assert t.get("a") == {"n": 1, "s": "x"}
    time.sleep(TTL / 2 + 0.05)
    assert t.get("a") is None and not t.exists("a") and "a" not in t
    assert t.get("b", "n") == 3 and list(t.keys()) == ["b"]
    time.sleep(TTL)
    assert list(t.items()) == [] and t.delete("b") is False  # an expired row is already gone
    assert len(t) == 0  # reading or deleting an expired row removes it


def test_a_write_to_an_expired_row_starts_a_new_row(make_table: MakeTable) -> None:
    t = make_table(16, COLS, ttl=TTL)
    t.set("k", {"n": 5, "s": "old"})
    t.set("j", {"n": 5})
    t.set("c", {"n": 5})
    time.sleep(TTL + 0.05)
    t.set("k", {"s": "new"})
    assert t.get("k") == {"n": 0, "s": "new"}, "an expired row lends nothing to the new one"
    assert t.incr("j", "n", 2) == 2
    assert t.compare_and_set("c", "n", 5, 6) is False  # compares with the zero row
    assert t.compare_and_set("c", "n", 0, 7) is True and t.get("c", "n") == 7
    assert len(t) == 3


def test_a_full_table_reclaims_expired_rows(make_table: MakeTable) -> None:
    t = make_table(8, COLS, ttl=TTL)
    for i in range(8):
        t.set(f"old{i}", {"n": i})
    with pytest.raises(TableFullError):
        t.set("one-too-many", {"n": 1})
    time.sleep(TTL + 0.05)
    for i in range(8):
        t.set(f"new{i}", {"n": i})  # room made from the expired rows, never a TableFullError
    assert len(t) == 8 and sorted(t.keys()) == [f"new{i}" for i in range(8)]


def test_every_worker_must_declare_the_same_ttl(make_table: MakeTable) -> None:
    t = make_table(8, COLS, ttl=TTL)
    with pytest.raises(ShmAbiMismatchError, match=r"ttl: 0\.2 vs 5\b"):
        Table(8, COLS, name=t.name, ttl=5)
    with pytest.raises(ShmAbiMismatchError, match=r"ttl: 0\.2 vs None"):
        Table(8, COLS, name=t.name)


@pytest.mark.parametrize("ttl", [0, -1, float("nan"), float("inf"), 10 * 366 * 86400, "1", True])
def test_a_bad_ttl_is_a_typed_error(ttl: object) -> None:
    with pytest.raises(InvalidTTLError, match="ttl must be a number of seconds"):
        Table(8, COLS, ttl=ttl)  # type: ignore[arg-type]
