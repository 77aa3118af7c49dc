"""Cache value serializers: JSON with a typed envelope (default, never runs code) and pickle.

The JSON serializer round-trips JSON-like values plus ``bytes``, ``bytearray``, tuples, sets,
dicts with non-``str`` keys, non-finite floats, ``datetime``/``date``/``time``/``timedelta``,
``Decimal``, ``UUID`` and pydantic models.  Values it cannot represent exactly raise
:class:`~zeal_asgi.errors.SerializationError` at ``dumps`` (before any I/O): nothing is converted
silently, so an ``IntEnum`` is refused rather than stored as an ``int``.  Loading only builds
those types; a pydantic model is re-validated with ``model_validate_json`` on a class that is
already imported and is a ``BaseModel`` subclass, never instantiated from an arbitrary class.

The pickle serializer is opt-in (``Cache.init(serializer="pickle", secret=...)``) and the cache
only ever calls its ``loads`` on bytes whose MAC checked out.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import math
import pickle
import sys
import uuid
from collections.abc import Callable
from decimal import Decimal
from typing import Any, Protocol
from zoneinfo import ZoneInfo

from pydantic import BaseModel

from .errors import ConfigError, SerializationError

__all__ = [
    "JSON_ID",
    "PICKLE_ID",
    "JsonSerializer",
    "PickleSerializer",
    "Serializer",
    "get_serializer",
]

JSON_ID = 1
PICKLE_ID = 2

TAG = "__zt__"
"""Key of a typed envelope; a user dict that has this key is itself stored as an envelope."""

_SCALARS = (str, int, bool, type(None))


class Serializer(Protocol):
    """Turns values into bytes and back; ``id`` is stored with every entry."""

    id: int
    name: str

    def dumps(self, value: object) -> bytes:
        """Encode ``value``; SerializationError for a value it cannot represent exactly."""
        ...

    def loads(self, data: bytes) -> Any:
        """Decode bytes produced by ``dumps``; SerializationError when they are not valid."""
        ...


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


def _datetime(v: dt.datetime) -> dict[str, Any]:
    tz = v.tzinfo
    if tz is None or isinstance(tz, dt.timezone):
        out = _env("datetime", v.isoformat())
    elif isinstance(tz, ZoneInfo):
        # keep the zone itself, not just today's offset
        out = {TAG: "datetime", "v": v.replace(tzinfo=None).isoformat(), "tz": tz.key}
    else:
        raise SerializationError(
            f"datetime with tzinfo {type(tz).__name__} cannot be stored exactly; use "
            "datetime.timezone or zoneinfo.ZoneInfo"
        )
    if v.fold:  # isoformat() drops the fold of an ambiguous wall time
        out["fold"] = 1
    return out


def _other(v: object) -> Any:
    """Envelope of a value that is not a plain JSON type (rare types, checked by isinstance)."""
    t = type(v)
    if t is bytes:
        return _env("bytes", base64.b64encode(v).decode("ascii"))  # type: ignore[arg-type]
    if t is bytearray:
        return _env("bytearray", base64.b64encode(v).decode("ascii"))  # type: ignore[arg-type]
    if t is tuple:
        return _env("tuple", [_encode(x) for x in v])  # type: ignore[attr-defined]
    if t is set or t is frozenset:
        return _env(t.__name__, [_encode(x) for x in v])  # type: ignore[attr-defined]
    if t is dt.datetime:
        return _datetime(v)  # type: ignore[arg-type]
    if t is dt.date:
        return _env("date", v.isoformat())  # type: ignore[attr-defined]
    if t is dt.time:
        tz = v.tzinfo  # type: ignore[attr-defined]
        if tz is not None and not isinstance(tz, dt.timezone):
            raise SerializationError(
                f"time with tzinfo {type(tz).__name__} cannot be stored exactly; use "
                "datetime.timezone"
            )
        out = _env("time", v.isoformat())  # type: ignore[attr-defined]
        if v.fold:  # type: ignore[attr-defined]
            out["fold"] = 1
        return out
    if t is dt.timedelta:
        return _env("timedelta", [v.days, v.seconds, v.microseconds])  # type: ignore[attr-defined]
    if t is Decimal:
        return _env("decimal", str(v))
    if t is uuid.UUID:
        return _env("uuid", str(v))
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


def _encode(v: object) -> Any:
    t = type(v)
    if t in _SCALARS:
        return v
    if t is float:
        if math.isfinite(v):  # type: ignore[arg-type]
            return v
        return _env("float", repr(v))
    if t is list:
        return [_encode(x) for x in v]  # type: ignore[attr-defined]
    if t is dict:
        d: dict[Any, Any] = v  # type: ignore[assignment]
        if TAG not in d and all(type(k) is str for k in d):
            return {k: _encode(x) for k, x in d.items()}
        return _env("dict", [[_encode(k), _encode(x)] for k, x in d.items()])
    return _other(v)


def _decode_datetime(d: dict[str, Any]) -> dt.datetime:
    value = dt.datetime.fromisoformat(d["v"])
    tz = d.get("tz")
    if tz is not None:
        value = value.replace(tzinfo=ZoneInfo(tz))
    return value.replace(fold=1) if d.get("fold") else value


def _decode_time(d: dict[str, Any]) -> dt.time:
    value = dt.time.fromisoformat(d["v"])
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
    "datetime": _decode_datetime,
    "date": lambda d: dt.date.fromisoformat(d["v"]),
    "time": _decode_time,
    "timedelta": lambda d: dt.timedelta(days=d["v"][0], seconds=d["v"][1], microseconds=d["v"][2]),
    "decimal": lambda d: Decimal(d["v"]),
    "uuid": lambda d: uuid.UUID(d["v"]),
    "model": _decode_model,
}


def _list(d: dict[str, Any]) -> list[Any]:
    v = d.get("v")
    if not isinstance(v, list):
        _bad(d)
    return v  # type: ignore[return-value]


def _bad(d: dict[str, Any]) -> Any:
    raise SerializationError(f"malformed cache envelope {str(d)[:80]!r}")


def _decode_obj(d: dict[str, Any]) -> Any:
    tag = d.get(TAG)
    if tag is None:
        return d
    fn = _DECODERS.get(tag) if isinstance(tag, str) else None
    if fn is None:
        return _bad(d)
    return fn(d)


# built once: json.dumps/loads with options build a new encoder/decoder on every call
_ENCODER = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
_DECODER = json.JSONDecoder(object_hook=_decode_obj)


class JsonSerializer:
    """The default serializer: compact JSON plus typed envelopes; loading never runs code."""

    id: int = JSON_ID
    name: str = "json"

    def dumps(self, value: object) -> bytes:
        """Encode ``value`` exactly, or raise SerializationError naming the unsupported type."""
        try:
            return _ENCODER.encode(_encode(value)).encode("utf-8")
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
            return _DECODER.decode(data.decode("utf-8"))
        except SerializationError:
            raise
        except Exception as exc:  # hostile or damaged input: one error type for the caller
            raise SerializationError(f"cannot decode cached JSON value: {exc!r}"[:200]) from exc


class PickleSerializer:
    """Opt-in pickle (any picklable value); the cache calls ``loads`` only behind a valid MAC."""

    id: int = PICKLE_ID
    name: str = "pickle"

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


def get_serializer(name: str) -> Serializer:
    """The serializer called ``name`` (``"json"`` or ``"pickle"``)."""
    if name == "json":
        return JsonSerializer()
    if name == "pickle":
        return PickleSerializer()
    raise ConfigError(f"serializer must be 'json' or 'pickle', got {name!r}")
