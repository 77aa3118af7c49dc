"""The serializers: exact round trips, refusals before I/O, hostile input never runs code."""

from __future__ import annotations

import datetime as dt
import enum
import json
import struct
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings, strategies as st
from pydantic import BaseModel

from zeal_asgi.cache.serializer import BLOB_CHARS, JsonSerializer, PickleSerializer, get_serializer
from zeal_asgi.errors import ConfigError, SerializationError

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


# -- payload formats: raw str / bytes, long strings beside the JSON -----------------------------

long_text = st.text(min_size=BLOB_CHARS, max_size=BLOB_CHARS + 300)
blob_values = st.recursive(
    st.none() | st.integers() | st.text(max_size=8) | long_text | st.binary(max_size=8),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.tuples(inner, inner)
        | st.dictionaries(st.text(max_size=5), inner, max_size=3)
        | st.dictionaries(long_text | st.integers(), inner, max_size=2)
    ),
    max_leaves=8,
)


@settings(max_examples=100, deadline=None)
@given(blob_values)
def test_values_with_long_strings_round_trip_exactly(value: Any) -> None:
    data = JSON.dumps(value)
    back = JSON.loads(data)
    assert back == value and repr(back) == repr(value)


def test_payload_formats() -> None:
    assert JSON.dumps("é" * 3) == b"\x01" + ("é" * 3).encode()
    assert JSON.dumps(b"\x00raw") == b"\x02\x00raw"
    assert JSON.dumps({"a": 1}) == b'{"a":1}'  # short values stay plain JSON
    big = JSON.dumps({"a": "x" * BLOB_CHARS})
    assert big[0] == 3 and big.endswith(b"x" * BLOB_CHARS)
    assert JSON.loads(big) == {"a": "x" * BLOB_CHARS}
    with pytest.raises(SerializationError):
        JSON.dumps("lone \ud800 surrogate")


def test_payloads_written_before_the_format_byte_still_load() -> None:
    assert JSON.loads(b'"plain json string"') == "plain json string"
    assert JSON.loads(b'{"__zt__":"bytes","v":"AAE="}') == b"\x00\x01"
    assert JSON.loads(b'{"bio":"' + b"x" * 10_000 + b'"}') == {"bio": "x" * 10_000}


def _blobs(count: int, sizes: list[int], rest: bytes) -> bytes:
    return b"\x03" + struct.pack("<I", count) + b"".join(struct.pack("<I", n) for n in sizes) + rest


@pytest.mark.parametrize(
    "data",
    [
        b"\x00{}",  # unknown format byte
        b"\x01\xff\xfe",  # a str that is not UTF-8
        b"\x03",  # no blob count
        b"\x03\xff\xff\xff\xff",  # more blobs than bytes
        _blobs(1, [100], b'{"a":1}'),  # a blob longer than the value
        _blobs(1, [2], b'{"__zt__":"s","i":1}xx'),  # a reference past the blobs
        _blobs(1, [2], b'{"__zt__":"s","i":"0"}xx'),  # a reference that is not an int
        _blobs(1, [2], b'{"__zt__":"s","i":0,"x":1}xx'),  # a reference with extra fields
        _blobs(1, [2], b'{"__zt__":"s","i":0}\xff\xfe'),  # a blob that is not UTF-8
        _blobs(0, [], b'{"a":1} trailing'),  # trailing data after the JSON
        b'{"__zt__":"s","i":0}',  # a reference outside a blob payload
        b'{"a":1}garbage',
        b" {}",  # leading whitespace is never written
    ],
)
def test_hostile_payload_formats_are_serialization_errors(data: bytes) -> None:
    with pytest.raises(SerializationError):
        JSON.loads(data)
