"""The serializers: exact round trips, refusals before I/O, hostile input never runs code."""

from __future__ import annotations

import datetime as dt
import enum
import json
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import BaseModel

from zeal_asgi.errors import ConfigError, SerializationError
from zeal_asgi.serializer import JsonSerializer, PickleSerializer, get_serializer

JSON = JsonSerializer()


class Color(enum.IntEnum):
    """Not representable exactly by the JSON serializer (would come back as an int)."""

    RED = 1


class Point(BaseModel):
    """A module-level model."""

    x: int
    y: int


class _OddZone(dt.tzinfo):
    """A tzinfo that is neither ``timezone`` nor ``ZoneInfo``: cannot be stored exactly."""

    def utcoffset(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(hours=1)

    def dst(self, d: dt.datetime | None) -> dt.timedelta:
        return dt.timedelta(0)

    def tzname(self, d: dt.datetime | None) -> str:
        return "ODD"


def test_zoned_datetimes_keep_their_zone_and_fold() -> None:
    paris = ZoneInfo("Europe/Paris")
    ambiguous = dt.datetime(2024, 10, 27, 2, 30, tzinfo=paris, fold=1)
    back = JSON.loads(JSON.dumps(ambiguous))
    assert back.tzinfo is paris and back.fold == 1 and back.utcoffset() == ambiguous.utcoffset()


@pytest.mark.parametrize(
    "value",
    [
        Color.RED,
        object(),
        lambda: 1,
        dt.datetime(2024, 1, 1, tzinfo=_OddZone()),
        {"nested": [1, {2, object()}]},
    ],
    ids=["intenum", "object", "lambda", "custom-tzinfo", "nested-object"],
)
def test_values_that_cannot_round_trip_exactly_are_refused(value: Any) -> None:
    with pytest.raises(SerializationError) as info:
        JSON.dumps(value)
    assert isinstance(info.value, TypeError)


def test_locally_defined_models_are_refused_at_dumps() -> None:
    class Local(BaseModel):
        a: int

    with pytest.raises(SerializationError, match="module level"):
        JSON.dumps(Local(a=1))


def test_models_are_revalidated_and_only_from_basemodel_subclasses() -> None:
    assert JSON.loads(JSON.dumps(Point(x=1, y=2))) == Point(x=1, y=2)
    forged = {"__zt__": "model", "c": f"{__name__}:Point", "v": '{"x": "not an int", "y": 2}'}
    with pytest.raises(SerializationError):
        JSON.loads(json.dumps(forged).encode())
    for path in ("os:system", "builtins:eval", "subprocess:Popen", "not.imported.module:X"):
        doc = {"__zt__": "model", "c": path, "v": "{}"}
        with pytest.raises(SerializationError, match="not an imported pydantic BaseModel"):
            JSON.loads(json.dumps(doc).encode())


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"\xff\xfe",
        b"{",
        b'{"__zt__": "unknown", "v": 1}',
        b'{"__zt__": "bytes", "v": "***"}',
        b'{"__zt__": "tuple", "v": "abc"}',
        b'{"__zt__": "float", "v": "1e400"}',
        b'{"__zt__": "set", "v": [[1]]}',
        b'{"__zt__": "datetime", "v": "yesterday"}',
        b'{"__zt__": "datetime", "v": "2024-01-01T00:00:00", "tz": "../../etc/passwd"}',
        b"[" * 100_000,
    ],
)
def test_hostile_json_is_a_serialization_error(data: bytes) -> None:
    with pytest.raises(SerializationError):
        JSON.loads(data)


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False)
    | st.text()
    | st.binary()
    | st.datetimes()
    | st.times()
    | st.dates()
    | st.timedeltas()
    | st.decimals(allow_nan=False)
    | st.floats(allow_nan=False).map(lambda f: frozenset({f}))
    | st.uuids(),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5) | st.integers(), inner, max_size=4)
    ),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_round_trips_exactly(value: Any) -> None:
    back = JSON.loads(JSON.dumps(value))
    assert back == value
    assert repr(back) == repr(value)  # same types all the way down (tuple vs list, int keys)


def test_pickle_round_trips_anything_picklable() -> None:
    p = PickleSerializer()
    assert p.loads(p.dumps(Color.RED)) is Color.RED
    with pytest.raises(SerializationError):
        p.dumps(lambda: 1)
    with pytest.raises(SerializationError):
        p.loads(b"not a pickle")


def test_unknown_serializer_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="'json' or 'pickle'"):
        get_serializer("marshal")
