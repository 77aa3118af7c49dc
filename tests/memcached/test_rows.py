"""Rows: the table backend's semantics (types, merge, misses, errors) on memcached."""

from __future__ import annotations

import asyncio
import math
import time
from typing import Any

import pytest

from tests._harness.servers import Memcached
from tests.memcached.conftest import raw_get, raw_set
from zeal_asgi.errors import (
    BackendResponseError,
    CapacityError,
    ColumnTypeError,
    IntegerOverflowError,
    NonFiniteFloatError,
    SchemaError,
    UnknownColumnError,
    UnsupportedOperationError,
    ValueTooLargeError,
)
from zeal_asgi.shm.schema import Schema
from zeal_asgi.store import Store, TableSpec
from zeal_asgi.store.backends.memcached import MemcachedBackend
from zeal_asgi.store.backends.table import TableBackend

pytestmark = pytest.mark.memcached

COLUMNS = {
    "name": (Store.TYPE_STRING, 8),
    "score": (Store.TYPE_INT, 4),
    "tiny": (Store.TYPE_INT, 1),
    "ratio": (Store.TYPE_FLOAT,),
    "blob": (Store.TYPE_BYTES, 4),
}


async def test_get_returns_typed_full_rows_and_merges(store: Store) -> None:
    store.make("users", 64, COLUMNS)
    assert await store.get_strict("users", "alice") is None
    assert await store.get("users", "alice") is False
    assert await store.set("users", "alice", {"name": "alice"}) is True
    row = await store.get_strict("users", "alice")
    assert row == {"name": "alice", "score": 0, "tiny": 0, "ratio": 0.0, "blob": b""}
    assert list(row) == list(COLUMNS)
    assert [type(v) for v in row.values()] == [str, int, int, float, bytes]

    await store.set("users", "alice", {"score": -7, "ratio": 2, "blob": b"\x00\xff"})
    assert await store.get_strict("users", "alice") == {
        "name": "alice",
        "score": -7,
        "tiny": 0,
        "ratio": 2.0,
        "blob": b"\x00\xff",
    }
    assert await store.get_strict("users", "alice", "ratio") == 2.0
    assert await store.get_strict("users", "bob", "ratio") is None
    full = {"name": "zoé", "score": 2**31 - 1, "tiny": -128, "ratio": -0.5, "blob": b"abcd"}
    await store.set("users", "alice", full)
    assert await store.get_strict("users", "alice") == full

    await store.set("users", "empty", {})
    assert await store.get_strict("users", "empty") == {
        "name": "",
        "score": 0,
        "tiny": 0,
        "ratio": 0.0,
        "blob": b"",
    }
    assert await store.exists("users", "empty") and not await store.exists("users", "nobody")
    assert await store.delete("users", "empty") is True
    assert await store.delete("users", "empty") is False
    assert not await store.exists("users", "empty")


async def test_bad_rows_raise_before_any_write(store: Store) -> None:
    store.make("users", 64, COLUMNS)
    await store.set("users", "k", {"name": "ok", "score": 1})
    bad: list[tuple[dict[str, Any], type[Exception], str]] = [
        ({"name": "123456789"}, ValueTooLargeError, "holds 8 bytes"),
        ({"nope": 1}, UnknownColumnError, "no column 'nope'"),
        ({"score": "1"}, ColumnTypeError, "INT(4)"),
        ({"score": 1.9}, ColumnTypeError, "no implicit conversion"),
        ({"score": True}, ColumnTypeError, "INT(4)"),
        ({"score": None}, ColumnTypeError, "INT(4)"),
        ({"tiny": 128}, IntegerOverflowError, "[-128, 127]"),
        ({"ratio": math.nan}, NonFiniteFloatError, "not finite"),
        ({"ratio": 2**60 + 1}, ColumnTypeError, "not exactly representable"),
        ({"blob": "text"}, ColumnTypeError, "BYTES(4)"),
        ({"name": "fine", "score": 2**40}, IntegerOverflowError, "INT(4)"),
    ]
    for row, exc, fragment in bad:
        with pytest.raises(exc) as info:
            await store.set("users", "k", row)
        assert fragment in str(info.value) and "'users'" in str(info.value)
    with pytest.raises(ColumnTypeError, match="mapping"):
        await store.set("users", "k", 5)  # type: ignore[arg-type]
    with pytest.raises(UnknownColumnError):
        await store.get("users", "k", "nope")
    assert await store.get_strict("users", "k", "name") == "ok"
    assert await store.get_strict("users", "k", "score") == 1


async def test_incr_decr_and_compare_and_set(store: Store) -> None:
    store.make("users", 64, COLUMNS)
    assert await store.incr("users", "new", "score", 5) == 5
    assert await store.get_strict("users", "new") == {
        "name": "",
        "score": 5,
        "tiny": 0,
        "ratio": 0.0,
        "blob": b"",
    }
    assert await store.decr("users", "new", "score", 8) == -3
    assert await store.decr("users", "other", "ratio", 1) == -1.0
    assert await store.incr("users", "other", "ratio", 0.25) == -0.75
    assert isinstance(await store.incr("users", "other", "ratio", 1), float)

    await store.set("users", "t", {"tiny": 120})
    with pytest.raises(IntegerOverflowError, match="the value stays 120"):
        await store.incr("users", "t", "tiny", 8)
    with pytest.raises(IntegerOverflowError, match=r"\[-128, 127\]"):
        await store.decr("users", "t", "tiny", 249)
    assert await store.get_strict("users", "t", "tiny") == 120
    with pytest.raises(ColumnTypeError, match="takes an int"):
        await store.incr("users", "t", "tiny", 1.5)
    with pytest.raises(ColumnTypeError, match="takes an int"):
        await store.incr("users", "t", "tiny", True)
    with pytest.raises(IntegerOverflowError, match="outside the signed 64-bit range"):
        await store.incr("users", "t", "score", 2**63)
    with pytest.raises(ColumnTypeError, match="INT or FLOAT"):
        await store.incr("users", "t", "name", 1)
    with pytest.raises(UnknownColumnError):
        await store.incr("users", "t", "nope", 1)
    await store.set("users", "f", {"ratio": 1.5e308})
    with pytest.raises(NonFiniteFloatError, match="the value stays"):
        await store.incr("users", "f", "ratio", 1.5e308)
    with pytest.raises(NonFiniteFloatError):
        await store.incr("users", "f", "ratio", math.inf)
    assert await store.get_strict("users", "f", "ratio") == 1.5e308

    assert not await store.exists("users", "c")
    assert await store.compare_and_set("users", "c", "name", "x", "y") is False
    assert not await store.exists("users", "c")  # created only when the comparison succeeds
    assert await store.compare_and_set("users", "c", "name", "", "first") is True
    assert await store.get_strict("users", "c", "name") == "first"
    assert await store.compare_and_set("users", "c", "name", "nope", "second") is False
    assert await store.compare_and_set("users", "c", "score", 0, 9) is True
    assert await store.get_strict("users", "c") == {
        "name": "first",
        "score": 9,
        "tiny": 0,
        "ratio": 0.0,
        "blob": b"",
    }
    with pytest.raises(ValueTooLargeError):
        await store.compare_and_set("users", "c", "name", "first", "x" * 9)
    with pytest.raises(ColumnTypeError):
        await store.compare_and_set("users", "c", "score", "9", 1)


async def test_single_int8_table_is_a_native_counter(
    store: Store, backend: MemcachedBackend, memcached_server: Memcached, prefix: str
) -> None:
    store.make("hits", 64, {"n": (Store.TYPE_INT,)})
    store.make("small", 64, {"n": (Store.TYPE_INT, 4)})
    assert await store.incr("hits", "a", "n") == 1
    assert await store.decr("hits", "a", "n", 5) == -4
    assert await store.get_strict("hits", "a") == {"n": -4}
    assert raw_get(memcached_server.port, f"{prefix}:hits:a".encode()) == str(2**63 - 4).encode()
    # INT(4) has a reachable range edge: rows of that table go through gets/cas instead.
    await store.incr("small", "a", "n")
    assert (raw_get(memcached_server.port, f"{prefix}:small:a".encode()) or b"")[:3] == b"ZR1"

    await store.set("hits", "b", {})
    assert await store.get_strict("hits", "b") == {"n": 0}
    await store.set("hits", "b", {"n": 41})
    await store.set("hits", "b", {})  # an empty merge changes nothing
    assert await store.incr("hits", "b", "n") == 42

    await store.set("hits", "top", {"n": 2**63 - 2})
    assert await store.incr("hits", "top", "n") == 2**63 - 1
    with pytest.raises(IntegerOverflowError, match=f"the value stays {2**63 - 1}"):
        await store.incr("hits", "top", "n", 1)
    assert await store.get_strict("hits", "top", "n") == 2**63 - 1
    await store.set("hits", "bottom", {"n": -(2**63)})
    with pytest.raises(IntegerOverflowError, match=f"the value stays {-(2**63)}"):
        await store.decr("hits", "bottom", "n", 1)
    assert await store.get_strict("hits", "bottom", "n") == -(2**63)
    assert await store.incr("hits", "bottom", "n", 2**63 - 1) == -1

    assert await store.compare_and_set("hits", "c", "n", 1, 2) is False
    assert await store.compare_and_set("hits", "c", "n", 0, -2) is True
    assert await store.compare_and_set("hits", "c", "n", -2, 5) is True
    assert await store.get_strict("hits", "c", "n") == 5
    with pytest.raises(ColumnTypeError):
        await store.incr("hits", "c", "n", 0.5)
    stats = backend.stats()["memcached"]
    assert stats["worker"]["overflow_reverts_total"] >= 2
    assert stats["overflow_reverts_total"] >= stats["worker"]["overflow_reverts_total"]


async def test_mget_and_mset(store: Store) -> None:
    store.make("users", 64, COLUMNS)
    assert await store.mset("users", {"a": {"score": 1}, "b": {"name": "bee"}}) == 2
    rows = await store.mget("users", ["a", "missing", "b", "a"])
    assert rows[1] is None
    assert rows[0] == rows[3] and rows[0] is not None and rows[0]["score"] == 1
    assert rows[2] is not None and rows[2]["name"] == "bee"
    # Validation of the whole batch comes first: nothing is written if one row is bad.
    with pytest.raises(ValueTooLargeError):
        await store.mset("users", {"c": {"score": 3}, "d": {"name": "x" * 20}})
    assert await store.get_strict("users", "c") is None
    many: dict[str | bytes, dict[str, Any]] = {f"k{i}": {"score": i} for i in range(450)}
    assert await store.mset("users", many) == 450
    got = await store.mget("users", list(many))
    assert [r["score"] if r else None for r in got] == list(range(450))
    assert await store.mget("users", []) == []


async def test_same_values_as_the_table_backend(
    backend: MemcachedBackend, table_backend: TableBackend
) -> None:
    spec = TableSpec("same", 64, Schema.declare(COLUMNS))
    backend.declare(spec)
    table_backend.declare(spec)
    steps: list[tuple[str, tuple[Any, ...]]] = [
        ("set", ("k", {"name": "a", "ratio": 0.1})),
        ("incr", ("k", "ratio", 0.2)),
        ("incr", ("k", "score", -5)),
        ("set", ("k", {"blob": b"xy"})),
        ("compare_and_set", ("k", "blob", b"xy", b"z")),
        ("get", ("k",)),
        ("get", ("k", "ratio")),
        ("mget", (["k", "none"],)),
        ("delete", ("k",)),
        ("exists", ("k",)),
    ]
    for name, args in steps:
        ours = await getattr(backend, name)(spec, *args)
        theirs = await getattr(table_backend, name)(spec, *args)
        assert ours == theirs, (name, args)
        assert type(ours) is type(theirs)


async def test_unsupported_operations_name_memcached_and_an_alternative(store: Store) -> None:
    store.make("users", 64, COLUMNS)
    checks: list[tuple[str, Any]] = [
        ("count", store.count("users")),
        ("clear", store.clear("users")),
        ("publish", store.publish("ch", "x")),
        ("publish_reliable", store.publish_reliable("st", "x")),
        ("eval", store.eval("return 1")),
    ]
    for what, coro in checks:
        with pytest.raises(UnsupportedOperationError) as info:
            await coro
        text = str(info.value)
        assert "memcached" in text and ("redis" in text or "table" in text), (what, text)
    with pytest.raises(UnsupportedOperationError, match=r"list its keys.*memcached"):
        store.iterate("users")
    with pytest.raises(NotImplementedError):  # also catchable as the builtin
        await store.count("users")


async def test_ttl_tables_expire_rows(store: Store, backend: MemcachedBackend) -> None:
    store.make("sess", 64, {"n": (Store.TYPE_INT,)}, mode="ttl", ttl=1)
    store.make("sess2", 64, COLUMNS, mode="ttl", ttl=1)
    store.make("long", 64, COLUMNS, mode="ttl", ttl=40 * 24 * 3600)
    await store.incr("sess", "a", "n")
    await store.set("sess2", "a", {"score": 1})
    await store.set("long", "a", {"score": 1})  # > 30 days: sent as an absolute time
    assert await store.get_strict("sess", "a") == {"n": 1}
    await asyncio.sleep(2.2)
    assert await store.get_strict("sess", "a") is None
    assert await store.get_strict("sess2", "a") is None
    assert await store.get_strict("long", "a", "score") == 1


async def test_row_over_the_item_size_is_a_capacity_error(store: Store) -> None:
    store.make("big", 4, {"data": (Store.TYPE_BYTES, 2 * 1024 * 1024)})
    with pytest.raises(CapacityError, match="item size"):
        await store.set("big", "k", {"data": b"x" * (1024 * 1024 + 10)})
    await store.set("big", "k", {"data": b"x" * 1000})
    assert await store.get_strict("big", "k", "data") == b"x" * 1000


async def test_foreign_or_damaged_values_raise_until_replaced(
    store: Store, memcached_server: Memcached, prefix: str
) -> None:
    store.make("users", 64, COLUMNS)
    store.make("hits", 64, {"n": (Store.TYPE_INT,)})
    for key, junk in [
        (f"{prefix}:users:a", b"not a row"),
        (f"{prefix}:users:b", b"ZR1" + b"\x00" * 3),  # truncated
        (f"{prefix}:hits:a", b"ZR1junk"),
        (f"{prefix}:hits:b", b"99999999999999999999999"),  # beyond 64 bits
    ]:
        raw_set(memcached_server.port, key.encode(), junk)
    for op in (
        store.get("users", "a"),
        store.get("users", "b", "name"),
        store.mget("users", ["x", "a"]),
        store.incr("users", "a", "score", 1),
        store.set("users", "a", {"score": 1}),  # a merge needs the stored row
        store.get("hits", "a"),
        store.incr("hits", "a", "n", 1),
        store.compare_and_set("hits", "b", "n", 0, 1),
    ):
        with pytest.raises(BackendResponseError, match=r"'users'|'hits'"):
            await op
    assert await store.exists("hits", "b")  # it is there, just not ours
    # A whole-row set or a delete replaces them.
    await store.set("users", "a", {"name": "n", "score": 1, "tiny": 2, "ratio": 3.0, "blob": b""})
    assert await store.incr("users", "a", "score", 2) == 3
    await store.set("hits", "a", {"n": 5})
    assert await store.incr("hits", "a", "n", 1) == 6
    assert await store.delete("hits", "b")
    assert await store.compare_and_set("hits", "b", "n", 0, 4) is True


async def test_a_changed_schema_is_reported_not_zeroed(
    memcached_server: Memcached, prefix: str
) -> None:
    old = Store(backend=MemcachedBackend(memcached_server.url, prefix=prefix))
    new = Store(backend=MemcachedBackend(memcached_server.url, prefix=prefix))
    try:
        old.make("t", 8, {"a": (Store.TYPE_STRING, 10), "b": (Store.TYPE_INT,)})
        new.make("t", 8, {"a": (Store.TYPE_STRING, 10), "b": ("int", 1)})
        await old.set("t", "k", {"a": "kept", "b": 300})
        with pytest.raises(SchemaError, match="another app"):  # the stored declaration
            await new.get("t", "k")
        # the rows carry a fingerprint too: with the declaration gone (evicted), still refused
        backend = new.backend
        assert isinstance(backend, MemcachedBackend)
        schema_key = f"{prefix}:schema:t".encode()
        await backend.pool.run(backend.pool.index(schema_key), "rm", lambda c: c.delete(schema_key))
        with pytest.raises(BackendResponseError, match="another schema"):
            await new.get("t", "k")
        assert await old.get_strict("t", "k") == {"a": "kept", "b": 300}
    finally:
        await old.aclose()
        await new.aclose()


async def test_ping_start_and_stats(store: Store, backend: MemcachedBackend) -> None:
    await store.start()
    assert await store.ping() is True
    stats = store.stats()
    assert stats["backend"] == "memcached"
    assert stats["memcached"]["worker"]["ops_total"] >= 2
    dead = MemcachedBackend("127.0.0.1:1", timeout=0.5)
    try:
        assert await dead.ping() is False
    finally:
        await dead.aclose()


async def test_throughput_is_sane(store: Store) -> None:
    store.make("hits", 64, {"n": (Store.TYPE_INT,)})
    start = time.perf_counter()
    for _ in range(200):
        await store.incr("hits", "k", "n")
    elapsed = time.perf_counter() - start
    print(f"EXPERIMENT memcached native incr | sequential 200 | {200 / elapsed:.0f} ops/s")
    assert await store.get_strict("hits", "k", "n") == 200
