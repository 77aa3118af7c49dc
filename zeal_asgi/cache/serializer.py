"""Cache value serializers: JSON with a typed envelope (default, never runs code) and pickle.

The JSON serializer round-trips JSON-like values plus ``bytes``, ``bytearray``, tuples, sets,
dicts with non-``str`` keys, non-finite floats, ``datetime``/``date``/``time``/``timedelta``,
``Decimal``, ``UUID`` and pydantic models.  Values it cannot represent exactly raise
:class:`~zeal_asgi.errors.SerializationError` at ``dumps`` (before any I/O): nothing is converted
silently, so an ``IntEnum`` is refused rather than stored as an ``int``.  Loading only builds
those types; a pydantic model is re-validated with ``model_validate_json`` on a class that is
already imported and is a ``BaseModel`` subclass, never instantiated from an arbitrary class.

Its payloads start with a format byte, because decoding JSON strings is slow (about 0.8 ns per
character in CPython, against 0.05 for a UTF-8 decode):

* ``0x01`` + UTF-8: a ``str`` value; ``0x02`` + raw bytes: a ``bytes`` value;
* ``0x03`` + blob table + JSON: JSON whose strings of ``BLOB_CHARS`` characters or more are kept
  out of it as raw UTF-8 and referenced by index (``{"__zt__": "s", "i": n}``);
* anything else is plain compact JSON text (whose first byte is never below ``0x20``).

Each form is plain data: loading one only decodes UTF-8 and JSON, so it never runs code.

The pickle serializer is opt-in (``Cache.init(serializer="pickle", secret=...)``) and the cache
only ever calls its ``loads`` on bytes whose MAC checked out.
"""

from __future__ import annotations

import base64
import datetime as dt
import itertools
import json
import math
import pickle
import struct
import sys
import threading
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, NoReturn
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from zeal_asgi.errors import ConfigError, SerializationError

JSON_ID = 1
PICKLE_ID = 2

TAG = "__zt__"
"""Key of a typed envelope; a user dict that has this key is itself stored as an envelope."""

_SCALARS = (int, bool, type(None))

BLOB_CHARS = 512
"""Strings at least this long (in characters) are stored as raw UTF-8 beside the JSON."""

_FMT_STR = 1
_FMT_BYTES = 2
_FMT_BLOBS = 3
_U32 = struct.Struct("<I")


# -- JSON with a typed envelope --------------------------------------------------------------


def _env(tag: str, v: Any) -> dict[str, Any]:
    return {TAG: tag, "v": v}


def _model_path(cls: type) -> str:
    """``module:qualname`` of a model class that can be found again by name."""
    module, qualname = cls.__module__, cls.__qualname__
    if "<locals>" in qualname or _resolve(module, qualname) is not cls:
        raise SerializationError(
            f"pydantic model {qualname!r} cannot be found again by name (defined inside a "
            "function or not importable from its module); define it at module level"
        )
    return f"{module}:{qualname}"


def _resolve(module: str, qualname: str) -> Any:
    obj: Any = sys.modules.get(module)
    for part in qualname.split("."):
        if obj is None:
            return None
        obj = getattr(obj, part, None)
    return obj


def _clock(v: dt.datetime | dt.time) -> dict[str, Any]:
    """A datetime or time with its offset (a datetime may keep its ZoneInfo) and its fold."""
    kind, tz = type(v).__name__, v.tzinfo
    out = _env(kind, v.isoformat())
    if kind == "datetime" and isinstance(tz, ZoneInfo):  # the zone itself, not today's offset
        out.update(v=v.replace(tzinfo=None).isoformat(), tz=tz.key)
    elif tz is not None and not isinstance(tz, dt.timezone):
        zones = "datetime.timezone" + (" or zoneinfo.ZoneInfo" if kind == "datetime" else "")
        raise SerializationError(
            f"{kind} with tzinfo {type(tz).__name__} cannot be stored exactly; use {zones}"
        )
    if v.fold:  # isoformat() drops the fold of an ambiguous wall time
        out["fold"] = 1
    return out


# Values that are not plain JSON, by exact type (a subclass, e.g. an IntEnum, is refused).
_ENCODERS: dict[type, Callable[[Any, list[str]], Any]] = {
    bytes: lambda v, _: _env("bytes", base64.b64encode(v).decode("ascii")),
    bytearray: lambda v, _: _env("bytearray", base64.b64encode(v).decode("ascii")),
    tuple: lambda v, blobs: _env("tuple", [_encode(x, blobs) for x in v]),
    set: lambda v, blobs: _env("set", [_encode(x, blobs) for x in v]),
    frozenset: lambda v, blobs: _env("frozenset", [_encode(x, blobs) for x in v]),
    dt.datetime: lambda v, _: _clock(v),
    dt.date: lambda v, _: _env("date", v.isoformat()),
    dt.time: lambda v, _: _clock(v),
    dt.timedelta: lambda v, _: _env("timedelta", [v.days, v.seconds, v.microseconds]),
    Decimal: lambda v, _: _env("decimal", str(v)),
    uuid.UUID: lambda v, _: _env("uuid", str(v)),
}


def _encode(v: object, blobs: list[str]) -> Any:
    t = type(v)
    if t is str:
        if len(v) < BLOB_CHARS:  # type: ignore[arg-type]
            return v
        blobs.append(v)  # type: ignore[arg-type]
        return {TAG: "s", "i": len(blobs) - 1}
    if t in _SCALARS:
        return v
    if t is float:
        if math.isfinite(v):  # type: ignore[arg-type]
            return v
        return _env("float", repr(v))
    if t is list:
        return [_encode(x, blobs) for x in v]  # type: ignore[attr-defined]
    if t is dict:
        d: dict[Any, Any] = v  # type: ignore[assignment]
        if TAG not in d and all(type(k) is str for k in d):
            return {k: _encode(x, blobs) for k, x in d.items()}
        return _env("dict", [[_encode(k, blobs), _encode(x, blobs)] for k, x in d.items()])
    if (encoder := _ENCODERS.get(t)) is not None:
        return encoder(v, blobs)
    if isinstance(v, BaseModel):
        try:
            doc = v.model_dump_json()
        except Exception as exc:
            raise SerializationError(f"pydantic model {t.__qualname__!r}: {exc}") from exc
        return {TAG: "model", "c": _model_path(t), "v": doc}
    raise SerializationError(
        f"the JSON cache serializer cannot store a {t.__module__}.{t.__qualname__} exactly "
        "(JSON-like values, bytes, tuples, sets, datetimes, Decimal, UUID and pydantic models "
        "are supported); convert it, or opt in to serializer='pickle' with a secret"
    )


def _decode_clock(d: dict[str, Any]) -> dt.datetime | dt.time:
    value = (dt.datetime if d[TAG] == "datetime" else dt.time).fromisoformat(d["v"])
    if (tz := d.get("tz")) is not None:
        value = value.replace(tzinfo=ZoneInfo(tz))
    return value.replace(fold=1) if d.get("fold") else value


def _decode_model(d: dict[str, Any]) -> BaseModel:
    module, _, qualname = str(d["c"]).partition(":")
    cls = _resolve(module, qualname)
    if not (isinstance(cls, type) and issubclass(cls, BaseModel)):
        raise SerializationError(
            f"cached model class {d['c']!r} is not an imported pydantic BaseModel subclass"
        )
    return cls.model_validate_json(d["v"])


_DECODERS: dict[str, Callable[[dict[str, Any]], Any]] = {
    "bytes": lambda d: base64.b64decode(d["v"], validate=True),
    "bytearray": lambda d: bytearray(base64.b64decode(d["v"], validate=True)),
    "tuple": lambda d: tuple(_list(d)),
    "set": lambda d: set(_list(d)),
    "frozenset": lambda d: frozenset(_list(d)),
    "dict": lambda d: {k: x for k, x in _list(d)},
    "float": lambda d: float(d["v"]) if d["v"] in ("nan", "inf", "-inf") else _bad(d),
    "datetime": _decode_clock,
    "date": lambda d: dt.date.fromisoformat(d["v"]),
    "time": _decode_clock,
    "timedelta": lambda d: dt.timedelta(days=d["v"][0], seconds=d["v"][1], microseconds=d["v"][2]),
    "decimal": lambda d: Decimal(d["v"]),
    "uuid": lambda d: uuid.UUID(d["v"]),
    "model": _decode_model,
    "s": lambda d: _blob(d),
}

_refs = threading.local()
"""The blobs of the ``0x03`` payload being decoded by this thread (``s`` envelopes index it)."""


def _blob(d: dict[str, Any]) -> str:
    blobs: list[str] | None = getattr(_refs, "blobs", None)
    i = d.get("i")
    if blobs is None or type(i) is not int or not 0 <= i < len(blobs) or len(d) != 2:
        _bad(d)
    return blobs[i]


def _list(d: dict[str, Any]) -> list[Any]:
    v = d.get("v")
    return v if isinstance(v, list) else _bad(d)


def _bad(d: dict[str, Any]) -> NoReturn:
    raise SerializationError(f"malformed cache envelope {str(d)[:80]!r}")


def _decode_obj(d: dict[str, Any]) -> Any:
    tag = d.get(TAG)
    if tag is None:
        return d
    decode = _DECODERS.get(tag, _bad) if isinstance(tag, str) else _bad
    return decode(d)


# built once: json.dumps/loads with options build a new encoder/decoder on every call
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(object_hook=_decode_obj)
# The scanner itself: JSONDecoder.decode adds two regex matches for whitespace we never write.
_SCAN: Callable[[str, int], tuple[Any, int]] = _DECODER.scan_once  # type: ignore[attr-defined]


def _json(text: str) -> Any:
    try:
        value, end = _SCAN(text, 0)
    except StopIteration:
        raise SerializationError(f"cached value is not JSON: {text[:40]!r}") from None
    if end != len(text):
        raise SerializationError(f"cached JSON value has trailing data at offset {end}")
    return value


def _pack_blobs(skeleton: bytes, blobs: list[str]) -> bytes:
    raw = [b.encode("utf-8") for b in blobs]
    sizes = [_U32.pack(len(r)) for r in raw]
    return b"".join([bytes((_FMT_BLOBS,)), _U32.pack(len(raw)), *sizes, skeleton, *raw])


def _unpack_blobs(data: bytes) -> Any:
    (n,) = _U32.unpack_from(data, 1)
    table = 5 + 4 * n
    if table > len(data):
        raise SerializationError(f"cached value names {n} blobs but is {len(data)} bytes long")
    sizes = struct.unpack_from(f"<{n}I", data, 5)
    end = len(data) - sum(sizes)
    if end < table:
        raise SerializationError("cached value's blobs are longer than the value")
    view = memoryview(data)
    starts = itertools.accumulate(sizes, initial=end)  # one more than sizes: the end
    blobs = [str(view[at : at + size], "utf-8") for at, size in zip(starts, sizes, strict=False)]
    previous = getattr(_refs, "blobs", None)
    _refs.blobs = blobs
    try:
        return _json(str(view[table:end], "utf-8"))
    finally:
        _refs.blobs = previous


class JsonSerializer:
    """The default serializer: compact JSON plus typed envelopes; loading never runs code.

    A ``str`` or ``bytes`` value is stored raw behind a format byte, and long strings inside
    JSON values beside it, so large text is never scanned by the JSON decoder.
    """

    id: int = JSON_ID

    def dumps(self, value: object) -> bytes:
        """Encode ``value`` exactly, or raise SerializationError naming the unsupported type."""
        try:
            if type(value) is str:
                return bytes((_FMT_STR,)) + value.encode("utf-8")
            if type(value) is bytes:
                return bytes((_FMT_BYTES,)) + value
            blobs: list[str] = []
            text = _ENCODER.encode(_encode(value, blobs)).encode("utf-8")
            return _pack_blobs(text, blobs) if blobs else text
        except SerializationError:
            raise
        except RecursionError as exc:
            raise SerializationError(
                "value is nested too deeply (or contains itself) for the JSON cache serializer"
            ) from exc
        except (ValueError, TypeError, UnicodeEncodeError) as exc:
            raise SerializationError(f"cannot encode value as JSON: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        """Decode; any malformed input raises SerializationError (never another exception)."""
        try:
            fmt = data[0]
            if fmt > _FMT_BLOBS:
                return _json(data.decode("utf-8"))
            if fmt == _FMT_STR:
                return str(memoryview(data)[1:], "utf-8")
            if fmt == _FMT_BYTES:
                return data[1:]
            if fmt == _FMT_BLOBS:
                return _unpack_blobs(data)
            raise SerializationError(f"unknown cached value format {fmt}")
        except SerializationError:
            raise
        except Exception as exc:  # hostile or damaged input: one error type for the caller
            raise SerializationError(f"cannot decode cached JSON value: {exc!r}"[:200]) from exc


class PickleSerializer:
    """Opt-in pickle (any picklable value); the cache calls ``loads`` only behind a valid MAC."""

    id: int = PICKLE_ID

    def dumps(self, value: object) -> bytes:
        """Pickle ``value`` (protocol 5); an unpicklable value raises SerializationError."""
        try:
            return pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL)
        except Exception as exc:  # PicklingError, TypeError, AttributeError, RecursionError...
            raise SerializationError(f"cannot pickle {type(value).__qualname__}: {exc}") from exc

    def loads(self, data: bytes) -> Any:
        """Unpickle authenticated bytes; failures raise SerializationError."""
        try:
            return pickle.loads(data)  # only ever called after the MAC check
        except Exception as exc:
            raise SerializationError(f"cannot unpickle cached value: {exc!r}"[:200]) from exc


Serializer = JsonSerializer | PickleSerializer
"""Turns values into bytes (``dumps``) and back (``loads``); ``id`` is stored with every entry."""


def get_serializer(name: str) -> Serializer:
    """The serializer called ``name`` (``"json"`` or ``"pickle"``)."""
    if name == "json":
        return JsonSerializer()
    if name == "pickle":
        return PickleSerializer()
    raise ConfigError(f"serializer must be 'json' or 'pickle', got {name!r}")
