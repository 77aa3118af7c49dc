"""A Hypothesis state machine drives each backend against a dict model (reliability.md E17).

Every step runs one Store call and compares its answer (value, type, or error type) with what the
model, which follows the shared-memory table's rules, says. Each machine run gets a fresh store
(own name space) and its own event loop (``asyncio.Runner``), closed in ``teardown``.

Quick mode runs E17's 200 examples x 50 steps on every backend (~7-14 s each on 2 cores);
``ZEAL_TEST_LONG=1`` runs 1000 examples.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar

from hypothesis import HealthCheck, settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, rule, run_state_machine_as_test

from tests.conftest import LONG
from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    InvalidKeyError,
    KeyTooLongError,
    KeyTypeError,
    NonFiniteFloatError,
    UnknownColumnError,
    UnsupportedOperationError,
    ValueTooLargeError,
    ZealError,
)
from zeal_asgi.store import Store

from ._support import (
    BACKENDS,
    COLUMNS,
    INT_WIDTHS,
    LISTING,
    ZERO_ROW,
    Servers,
    StoreMaker,
    int_range,
    raises_exact,
    release_shared,
)

# (examples, steps) per backend in quick mode: E17's 200 x 50 everywhere; Hypothesis itself
# (~0.5 ms a step) dominates the shared table, the network backends add ~0.1-0.3 ms a call.
QUICK = {name: (200, 50) for name in BACKENDS}
LONG_RUN = (1000, 50)

KEYS = ["a", "b", "ключ", "a\x00b", "🎉"]
Row = dict[str, Any]


def _text16() -> st.SearchStrategy[str]:
    return st.text(max_size=16).filter(lambda s: len(s.encode("utf-8")) <= 16)


VALUES: dict[str, st.SearchStrategy[Any]] = {
    "name": _text16(),
    **{c: st.integers(*int_range(w)) for c, w in INT_WIDTHS.items()},
    "f": st.floats(allow_nan=False, allow_infinity=False),
    "b": st.binary(max_size=8),
}
NUMERIC = [*INT_WIDTHS, "f"]
key_args = st.tuples(st.sampled_from(KEYS), st.booleans()).map(
    lambda t: t[0].encode() if t[1] else t[0]
)
fields = st.sampled_from([None, *COLUMNS])
partial_rows = st.fixed_dictionaries({}, optional=VALUES)
steps = st.one_of(st.integers(-2, 2), st.integers(-(2**64), 2**64), st.floats(allow_nan=False))

Call = Callable[[Store, Any], Awaitable[Any]]


def writes(row: Row) -> Call:
    """``Store.set`` of ``row`` at the rule's key."""
    return lambda s, k: s.set("t", k, row)


# (name, call on (store, key), error type): each must leave every row as it was.
BAD: list[tuple[str, Call, type[ZealError]]] = [
    ("string too long", writes({"i1": 1, "name": "x" * 17}), ValueTooLargeError),
    ("bytes too long", writes({"b": b"x" * 9}), ValueTooLargeError),
    ("unknown column", writes({"i1": 1, "nope": 1}), UnknownColumnError),
    ("str into int", writes({"i4": "1"}), ColumnTypeError),
    ("float into int", writes({"i4": 1.9}), ColumnTypeError),
    ("bool into int", writes({"i8": True}), ColumnTypeError),
    ("none into string", writes({"name": None}), ColumnTypeError),
    ("int1 out of range", writes({"i1": 128}), IntegerOverflowError),
    ("int8 out of range", writes({"i8": 2**63}), IntegerOverflowError),
    ("nan", writes({"f": math.nan}), NonFiniteFloatError),
    ("incr string column", lambda s, k: s.incr("t", k, "name"), ColumnTypeError),
    ("incr unknown column", lambda s, k: s.incr("t", k, "nope"), UnknownColumnError),
    ("incr by a float on int", lambda s, k: s.incr("t", k, "i4", 0.5), ColumnTypeError),
    ("cas bad expected", lambda s, k: s.compare_and_set("t", k, "i4", "0", 1), ColumnTypeError),
    (
        "cas new out of range",
        lambda s, k: s.compare_and_set("t", k, "i2", 0, 2**15),
        IntegerOverflowError,
    ),
    ("get unknown field", lambda s, k: s.get_strict("t", k, "nope"), UnknownColumnError),
    (
        "mset with one bad row",
        lambda s, k: s.mset("t", {k: {"i1": 2}, "zz": {"i1": 1.5}}),
        ColumnTypeError,
    ),
    ("key too long", lambda s, k: s.set("t", "k" * 65, {"i1": 1}), KeyTooLongError),
    ("empty key", lambda s, k: s.set("t", "", {"i1": 1}), InvalidKeyError),
    ("lone surrogate key", lambda s, k: s.get("t", "\udc80"), InvalidKeyError),
    ("invalid utf-8 key", lambda s, k: s.exists("t", b"\xff"), InvalidKeyError),
    ("int key", lambda s, k: s.delete("t", 1), KeyTypeError),  # type: ignore[arg-type]
]


def canonical(key: str | bytes) -> bytes:
    """The model's key: str and bytes spell the same row."""
    return key.encode("utf-8") if isinstance(key, str) else key


def same(got: Any, want: Any) -> bool:
    """Equal, with the same Python types (a row: the same columns in order, each exact)."""
    if isinstance(want, dict):
        return (
            isinstance(got, dict)
            and list(got) == list(want)
            and all(same(got[k], v) for k, v in want.items())
        )
    # Floats compare with ==, so the sign of a zero is not checked here: test_numbers and
    # test_rows check it deterministically.
    return type(got) is type(want) and got == want


class StoreModel(RuleBasedStateMachine):
    """One fresh store per run, checked call by call against ``self.model``."""

    maker: ClassVar[StoreMaker]

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.store = self.maker()
        self.store.make("t", 64, COLUMNS)
        try:
            self.run(self.store.start())
        except BaseException:
            self.teardown()
            raise
        self.model: dict[bytes, Row] = {}
        self.listing = self.maker.backend in LISTING

    def run(self, awaitable: Awaitable[Any]) -> Any:
        async def wrap() -> Any:
            return await awaitable

        return self.runner.run(wrap())

    def teardown(self) -> None:
        try:
            self.run(self.maker.close(self.store))
        finally:
            self.runner.close()

    def current(self, key: str | bytes) -> Row | None:
        row = self.model.get(canonical(key))
        return None if row is None else dict(row)

    def check_row(self, key: str | bytes) -> None:
        got = self.run(self.store.get_strict("t", key))
        want = self.current(key)
        assert same(got, want), f"row {key!r}: store {got!r}, model {want!r}"

    def expect_error(self, error: type[ZealError], awaitable: Awaitable[Any]) -> None:
        self.run(raises_exact(error, awaitable))

    # -- rules ----------------------------------------------------------------------------------

    @rule(key=key_args, row=partial_rows)
    def set(self, key: str | bytes, row: Row) -> None:
        assert self.run(self.store.set("t", key, row)) is True
        self.model[canonical(key)] = {**(self.current(key) or ZERO_ROW), **row}

    @rule(rows=st.dictionaries(st.sampled_from(KEYS), partial_rows, max_size=4))
    def mset(self, rows: dict[str, Row]) -> None:
        assert self.run(self.store.mset("t", rows)) == len(rows)
        for key, row in rows.items():
            self.model[canonical(key)] = {**(self.current(key) or ZERO_ROW), **row}

    @rule(key=key_args, field=fields, strict=st.booleans())
    def get(self, key: str | bytes, field: str | None, strict: bool) -> None:
        getter = self.store.get_strict if strict else self.store.get
        got = self.run(getter("t", key, field))
        row = self.current(key)
        want: Any = None if strict else False
        if row is not None:
            want = row if field is None else row[field]
        assert same(got, want), f"get({key!r}, {field!r}): store {got!r}, model {want!r}"

    @rule(keys=st.lists(key_args, max_size=6))
    def mget(self, keys: list[str | bytes]) -> None:
        got = self.run(self.store.mget("t", keys))
        want = [self.current(k) for k in keys]
        assert len(got) == len(want) and all(same(g, w) for g, w in zip(got, want, strict=True))

    @rule(key=key_args)
    def delete(self, key: str | bytes) -> None:
        existed = self.model.pop(canonical(key), None) is not None
        assert self.run(self.store.delete("t", key)) is existed

    @rule(key=key_args)
    def exists(self, key: str | bytes) -> None:
        assert self.run(self.store.exists("t", key)) is (canonical(key) in self.model)

    @rule(key=key_args, column=st.sampled_from(NUMERIC), by=steps, down=st.booleans())
    def incr(self, key: str | bytes, column: str, by: int | float, down: bool) -> None:
        row = self.current(key) or dict(ZERO_ROW)
        call = self.store.decr if down else self.store.incr
        delta = -by if down else by
        if column == "f":
            if isinstance(by, int) and abs(by) > 2**53:
                return  # an int step on a FLOAT column must be exact: covered in test_numbers
            new: Any = row["f"] + float(delta)
            if not math.isfinite(new):
                self.expect_error(NonFiniteFloatError, call("t", key, column, by))
                self.check_row(key)
                return
        else:
            if isinstance(by, float):
                self.expect_error(ColumnTypeError, call("t", key, column, by))
                self.check_row(key)
                return
            lo, hi = int_range(INT_WIDTHS[column])
            new = row[column] + delta
            if not -(2**63) <= by <= 2**63 - 1 or not lo <= new <= hi:
                self.expect_error(IntegerOverflowError, call("t", key, column, by))
                self.check_row(key)
                return
        got = self.run(call("t", key, column, by))
        assert same(got, new), f"incr({key!r}, {column}, {by!r}, down={down}): {got!r} != {new!r}"
        self.model[canonical(key)] = {**row, column: new}

    @rule(key=key_args, data=st.data())
    def compare_and_set(self, key: str | bytes, data: st.DataObject) -> None:
        column = data.draw(st.sampled_from(list(COLUMNS)), "column")
        row = self.current(key) or dict(ZERO_ROW)
        expected = data.draw(st.one_of(st.just(row[column]), VALUES[column]), "expected")
        new = data.draw(VALUES[column], "new")
        swapped = self.run(self.store.compare_and_set("t", key, column, expected, new))
        assert swapped is (expected == row[column]), f"cas saw {row[column]!r} vs {expected!r}"
        if swapped:
            self.model[canonical(key)] = {**row, column: new}
        self.check_row(key)

    @rule()
    def count(self) -> None:
        if not self.listing:
            self.expect_error(UnsupportedOperationError, self.store.count("t"))
            return
        assert self.run(self.store.count("t")) == len(self.model)

    @rule()
    def iterate(self) -> None:
        async def collect() -> dict[bytes, Row]:
            return {canonical(k): r async for k, r in self.store.iterate("t")}

        if not self.listing:
            self.expect_error(UnsupportedOperationError, collect())
            return
        got = self.run(collect())
        assert got.keys() == self.model.keys()
        assert all(same(got[k], v) for k, v in self.model.items())

    @rule()
    def clear(self) -> None:
        if not self.listing:
            self.expect_error(UnsupportedOperationError, self.store.clear("t"))
            return
        assert self.run(self.store.clear("t")) == len(self.model)
        self.model.clear()

    @rule(key=key_args, bad=st.sampled_from(BAD))
    def bad_input(self, key: str | bytes, bad: tuple[str, Call, type[ZealError]]) -> None:
        name, call, error = bad
        try:
            self.expect_error(error, call(self.store, key))
        except AssertionError as failure:
            raise AssertionError(f"{name}: {failure}") from None
        self.check_row(key)
        assert self.run(self.store.get_strict("t", "zz")) is None


def test_store_matches_a_dict_model(backend: str, servers: Servers) -> None:
    maker = StoreMaker(backend, servers)
    machine = type(f"StoreModel_{backend}", (StoreModel,), {"maker": maker})
    examples, step_count = LONG_RUN if LONG else QUICK[backend]
    try:
        run_state_machine_as_test(
            machine,
            settings=settings(
                max_examples=examples,
                stateful_step_count=step_count,
                deadline=None,
                suppress_health_check=[HealthCheck.too_slow],
            ),
        )
    finally:
        for store in maker.unclosed():
            release_shared(store.backend)
