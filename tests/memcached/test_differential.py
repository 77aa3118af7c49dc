"""Random operation sequences give the same results and the same errors as the shared table."""

from __future__ import annotations

import math
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from zeal_asgi.store import Store
from zeal_asgi.store.backends.memcached import MemcachedBackend
from zeal_asgi.store.backends.table import TableBackend

pytestmark = pytest.mark.memcached

SCHEMAS: dict[str, dict[str, Any]] = {
    "mixed": {
        "i1": ("int", 1),
        "i8": ("int", 8),
        "f": ("float",),
        "s": ("string", 6),
        "b": ("bytes", 4),
    },
    "native": {"n": ("int", 8)},
}
KEYS = ["a", "b", "é", "k\r\nflush_all", b"raw", b"\xff", "", "x" * 65, 7]
COLUMNS = ["i1", "i8", "f", "s", "b", "n", "nope"]

values = st.one_of(
    st.integers(min_value=-(2**64), max_value=2**64),
    st.sampled_from([0, 1, -1, 127, 128, -129, 2**63 - 1, -(2**63), 2**53 + 1]),
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.text(max_size=8),
    st.binary(max_size=6),
    st.booleans(),
    st.none(),
)
keys = st.sampled_from(KEYS)
columns = st.sampled_from(COLUMNS)
ops = st.one_of(
    st.tuples(st.just("set"), keys, st.dictionaries(columns, values, max_size=3)),
    st.tuples(st.just("get"), keys, st.sampled_from([None, *COLUMNS])),
    st.tuples(st.just("delete"), keys),
    st.tuples(st.just("exists"), keys),
    st.tuples(st.just("incr"), keys, columns, values),
    st.tuples(st.just("compare_and_set"), keys, columns, values, values),
    st.tuples(st.just("mget"), st.lists(keys, max_size=4)),
    st.tuples(st.just("mset"), st.dictionaries(keys, st.dictionaries(columns, values, max_size=2))),
)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


async def _outcome(store: Store, table: str, op: tuple[Any, ...]) -> Any:
    try:
        return ("ok", await getattr(store, op[0])(table, *op[1:]))
    except Exception as exc:  # the type is what must match
        return ("raised", type(exc))


@pytest.mark.parametrize("kind", sorted(SCHEMAS))
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(steps=st.lists(ops, max_size=12))
async def test_same_outcomes_as_the_table_backend(
    kind: str,
    steps: list[tuple[Any, ...]],
    backend: MemcachedBackend,
    table_backend: TableBackend,
) -> None:
    name = f"d{kind}"
    # through the Store facade, which checks incr steps once for every backend
    ours, theirs = Store(backend=backend), Store(backend=table_backend)
    ours.make(name, 64, SCHEMAS[kind])
    table = theirs.make(name, 64, SCHEMAS[kind])
    assert table is not None
    table.clear()
    for key in KEYS:  # every example starts from empty tables
        if isinstance(key, (str, bytes)) and key and key != b"\xff" and len(key) <= 64:
            await ours.delete(name, key)
    for op in steps:
        got = await _outcome(ours, name, op)
        want = await _outcome(theirs, name, op)
        assert got[0] == want[0] and _same(got[1], want[1]), (op, got, want)
