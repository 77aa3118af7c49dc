"""The table against a dict model: hypothesis drives random sequences of every operation,
including bad input, and the table must agree with the model after every step."""

from __future__ import annotations

import math
import uuid
from typing import Any

import hypothesis.strategies as st
from hypothesis import HealthCheck, settings
from hypothesis.stateful import Bundle, RuleBasedStateMachine, initialize, invariant, rule

from zeal_asgi import Table
from zeal_asgi.errors import (
    ColumnTypeError,
    IntegerOverflowError,
    InvalidKeyError,
    KeyTooLongError,
    NonFiniteFloatError,
    TableFullError,
    ValueTooLargeError,
)
from zeal_asgi.shm.segments import destroy

CAPACITY = 24
COLS = {"s": ("string", 6), "i": ("int", 2), "f": ("float",), "b": ("bytes", 4)}
ZERO: dict[str, Any] = {"s": "", "i": 0, "f": 0.0, "b": b""}
I_MIN, I_MAX = -(2**15), 2**15 - 1

keys = st.one_of(
    st.text(min_size=0, max_size=10),
    st.sampled_from(["a", "b", "c", "a\x00", "\udc80", "k" * 8, "k" * 9]),
)
strings = st.one_of(
    st.text(max_size=8), st.sampled_from(["", "\u00e9\u00e9\u00e9", "123456", "1234567"])
)
ints = st.one_of(
    st.integers(I_MIN - 3, I_MAX + 3), st.sampled_from([2**63, -(2**63) - 1, True]), st.floats()
)
floats = st.one_of(st.floats(), st.integers(-(2**60), 2**60))
blobs = st.binary(max_size=6)


def model_key(key: str) -> str:
    raw = key.encode("utf-8", "surrogatepass")
    try:
        key.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidKeyError(key) from None
    if not raw:
        raise InvalidKeyError(key)
    if len(raw) > 8:
        raise KeyTooLongError(key)
    return key


def model_value(col: str, v: Any) -> Any:
    if col == "s":
        if not isinstance(v, str):
            raise ColumnTypeError(col)
        try:
            n = len(v.encode("utf-8"))
        except UnicodeEncodeError:
            raise ColumnTypeError(col) from None
        if n > 6:
            raise ValueTooLargeError(col)
        return v
    if col == "i":
        if not isinstance(v, int) or isinstance(v, bool):
            raise ColumnTypeError(col)
        if not I_MIN <= v <= I_MAX:
            raise IntegerOverflowError(col)
        return v
    if col == "f":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ColumnTypeError(col)
        if isinstance(v, int) and float(v) != v:
            raise ColumnTypeError(col)
        if not math.isfinite(v):
            raise NonFiniteFloatError(col)
        return float(v)
    if not isinstance(v, bytes):
        raise ColumnTypeError(col)
    if len(v) > 4:
        raise ValueTooLargeError(col)
    return v


class TableMachine(RuleBasedStateMachine):
    """Every rule runs the same operation on the table and on the model; both must agree on
    the result or on the type of the error."""

    stored = Bundle("stored")

    def __init__(self) -> None:
        super().__init__()
        self.table = Table(CAPACITY, COLS, name=f"model-{uuid.uuid4().hex[:10]}", key_size=8)
        self.model: dict[str, dict[str, Any]] = {}

    def teardown(self) -> None:
        destroy(self.table)

    def both(self, real: Any, model: Any) -> Any:
        """Run both; compare results or error types."""
        try:
            expected = model()
            m_err: type[Exception] | None = None
        except Exception as exc:
            expected, m_err = None, type(exc)
        try:
            got = real()
            r_err: type[Exception] | None = None
        except Exception as exc:
            got, r_err = None, type(exc)
        assert r_err == m_err, (r_err, m_err)
        assert got == expected or (got != got and expected != expected), (got, expected)
        return got

    @initialize()
    def start(self) -> None:
        assert len(self.table) == 0

    @rule(
        target=stored,
        key=keys,
        s=strings,
        i=ints,
        f=floats,
        b=blobs,
        which=st.sets(st.sampled_from("sifb")),
    )
    def put(self, key: str, s: str, i: Any, f: Any, b: bytes, which: frozenset[str]) -> str:
        row = {c: v for c, v in (("s", s), ("i", i), ("f", f), ("b", b)) if c in which}

        def model() -> bool:
            k = model_key(key)
            clean = {c: model_value(c, v) for c, v in row.items()}
            if k not in self.model and len(self.model) >= CAPACITY:
                raise TableFullError(k)
            self.model.setdefault(k, dict(ZERO)).update(clean)
            return True

        self.both(lambda: self.table.set(key, row), model)
        return key

    @rule(key=st.one_of(stored, keys), field=st.sampled_from([None, "s", "i", "f", "b"]))
    def get(self, key: str, field: str | None) -> None:
        def model() -> Any:
            k = model_key(key)
            row = self.model.get(k)
            if row is None:
                return None
            return dict(row) if field is None else row[field]

        self.both(lambda: self.table.get(key, field), model)

    @rule(key=st.one_of(stored, keys))
    def delete(self, key: str) -> None:
        def model() -> bool:
            return self.model.pop(model_key(key), None) is not None

        self.both(lambda: self.table.delete(key), model)

    @rule(
        key=st.one_of(stored, keys),
        col=st.sampled_from(["i", "f", "s"]),
        by=st.one_of(ints, floats),
    )
    def incr(self, key: str, col: str, by: Any) -> None:
        def model() -> Any:
            k = model_key(key)
            if col == "s":
                raise ColumnTypeError(col)
            if col == "i":
                if not isinstance(by, int) or isinstance(by, bool):
                    raise ColumnTypeError(col)
                if not -(2**63) <= by < 2**63:
                    raise IntegerOverflowError(col)
                cur = self.model.get(k, ZERO)["i"]
                new: Any = cur + by
                if not I_MIN <= new <= I_MAX:
                    raise IntegerOverflowError(col)
            else:
                if isinstance(by, bool) or not isinstance(by, (int, float)):
                    raise ColumnTypeError(col)
                step = float(by)
                if not math.isfinite(step):
                    raise NonFiniteFloatError(col)
                new = self.model.get(k, ZERO)["f"] + step
                if not math.isfinite(new):
                    raise NonFiniteFloatError(col)
            if k not in self.model and len(self.model) >= CAPACITY:
                raise TableFullError(k)
            self.model.setdefault(k, dict(ZERO))[col] = new
            return new

        self.both(lambda: self.table.incr(key, col, by), model)

    @rule(key=st.one_of(stored, keys), expected=st.integers(-2, 2), new=st.integers(-2, 2))
    def compare_and_set(self, key: str, expected: int, new: int) -> None:
        def model() -> bool:
            k = model_key(key)
            cur = self.model.get(k, ZERO)["i"]
            if cur != expected:
                return False
            if k not in self.model and len(self.model) >= CAPACITY:
                raise TableFullError(k)
            self.model.setdefault(k, dict(ZERO))["i"] = new
            return True

        self.both(lambda: self.table.compare_and_set(key, "i", expected, new), model)

    @rule()
    def clear(self) -> None:
        self.table.clear()
        self.model.clear()

    @invariant()
    def same_rows(self) -> None:
        assert len(self.table) == len(self.model)
        assert dict(self.table.items()) == self.model


TableMachine.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=40,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)
test_table_matches_dict_model = TableMachine.TestCase
