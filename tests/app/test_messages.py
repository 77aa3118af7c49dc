"""What users read: table names without internal prefixes, schema mismatches column by column."""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from zeal_asgi import Counter, Store, Table
from zeal_asgi.errors import ConfigError, ShmAbiMismatchError, ZealError
from zeal_asgi.shm.segments import destroy


async def test_messages_name_the_table_as_the_user_declared_it(table_store: Store) -> None:
    name = f"users_{uuid.uuid4().hex[:6]}"
    table_store.make(name, 1, {"n": (Store.TYPE_INT, 1), "s": (Store.TYPE_STRING, 4)})
    await table_store.set(name, "a", {"n": 1})
    calls: list[Callable[[], Awaitable[Any]]] = [
        lambda: table_store.set(name, "b", {"n": 1}),  # full
        lambda: table_store.set(name, "a", {"s": "too long"}),
        lambda: table_store.set(name, "k" * 100, {"n": 1}),
        lambda: table_store.set(name, "a", {"nope": 1}),
        lambda: table_store.set(name, "a", {"n": "x"}),
        lambda: table_store.incr(name, "a", "n", 1000),
    ]
    for call in calls:
        with pytest.raises(ZealError) as err:
            await call()
        message = str(err.value)
        print(f"{type(err.value).__name__}: {message}")
        assert f"table {name!r}" in message and ":" + name not in message, message
    counter = Counter(2**63 - 1, name=f"c_{uuid.uuid4().hex[:6]}", store=table_store)
    with pytest.raises(ZealError) as err:
        counter.atomic.increment(1)
    assert f"atomic {counter.name!r}" in str(err.value), err.value


def test_a_schema_mismatch_shows_the_difference_column_by_column(table_store: Store) -> None:
    name = f"users_{uuid.uuid4().hex[:6]}"
    table_store.make(name, 16, {"name": (Store.TYPE_STRING, 32), "age": (Store.TYPE_INT, 8)})
    with pytest.raises(ConfigError) as err:
        table_store.make(
            name, 16, {"name": (Store.TYPE_STRING, 64), "email": (Store.TYPE_STRING, 8)}
        )
    message = str(err.value)
    assert "column 'name': STRING(32) vs STRING(64)" in message, message
    assert "column 'age': INT(8) vs missing" in message
    assert "column 'email': missing vs STRING(8)" in message


def test_two_processes_declaring_other_schemas_see_the_difference() -> None:
    name = f"shared_{uuid.uuid4().hex[:6]}"
    table = Table(16, {"v": ("int", 8)}, name=name)
    try:
        with pytest.raises(ShmAbiMismatchError) as err:
            Table(16, {"v": ("int", 4), "w": ("float",)}, name=name, key_size=32)
    finally:
        destroy(table)
    message = str(err.value)
    print(message)
    for part in ("column 'v': INT(8) vs INT(4)", "column 'w': missing vs FLOAT(8)", "64 vs 32"):
        assert part in message, message
