"""Pub/sub channel names and payloads: one rule for every backend.

``Store.publish`` and every subscriber validate here, so a name or payload that one backend
refuses is refused, with the same typed error, by all of them.
"""

from __future__ import annotations

from zeal_asgi.errors import InvalidKeyError, KeyTypeError, SerializationError
from zeal_asgi.shm.bus import CHANNEL_MAX

__all__ = ["CHANNEL_MAX", "as_bytes", "is_pattern", "validate_channel"]

_GLOB = frozenset("*?[")


def validate_channel(channel: object, what: str = "channel") -> str:
    """A channel (or pattern) name, or a typed error naming the limit."""
    if not isinstance(channel, str):
        raise KeyTypeError(f"a pub/sub {what} is a str, got {type(channel).__name__}")
    if not channel:
        raise InvalidKeyError(f"empty pub/sub {what} name")
    try:
        n = len(channel.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKeyError(f"pub/sub {what} {channel!r} is not encodable as UTF-8") from exc
    if n > CHANNEL_MAX:
        raise InvalidKeyError(f"pub/sub {what} name is {n} bytes; the limit is {CHANNEL_MAX} bytes")
    return channel


def is_pattern(channel: str) -> bool:
    """True when ``channel`` has a glob metacharacter (``*``, ``?`` or ``[``)."""
    return not _GLOB.isdisjoint(channel)


def as_bytes(payload: object) -> bytes:
    """A payload as bytes (``str`` is UTF-8 encoded)."""
    if isinstance(payload, str):
        try:
            return payload.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise SerializationError("pub/sub payload is not encodable as UTF-8") from exc
    if isinstance(payload, (bytes, bytearray, memoryview)):
        return bytes(payload)  # a bytes object itself, not a copy
    raise SerializationError(f"a pub/sub payload is str or bytes, got {type(payload).__name__}")
