"""Cache keys, TTLs and memory-tier rows: validation and the authenticated row format.

A memory-tier row is ``{"v": body, "exp": expires_at, "m": mac}`` under the key
``blake2b(cache key)`` (32 hex chars, whatever the key's length).  ``body`` is either
``INLINE ‖ serializer id ‖ payload`` or ``POINTER ‖ nonce``: the value lives in the file tier,
in the file whose header carries that nonce.  ``mac`` is a keyed BLAKE2b (HMAC-SHA256 in pickle
mode) over the key hash, the expiry and the body, checked before the body is used.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from typing import Any

from .errors import InvalidKeyError, InvalidTTLError, KeyTooLongError, KeyTypeError

__all__ = [
    "INLINE",
    "MAX_KEY_BYTES",
    "MAX_TTL",
    "POINTER",
    "RowCodec",
    "check_key",
    "check_ttl",
    "memory_key",
]

MAX_KEY_BYTES = 4096
MAX_TTL = 10 * 365 * 86400
"""Ten years: a longer TTL is a unit mistake (milliseconds?), refused rather than stored."""

INLINE = 1
POINTER = 2
_EXP = struct.Struct("<d")


def check_key(key: object) -> bytes:
    """The bytes of a valid cache key (``str`` as UTF-8, or ``bytes``), or a typed error."""
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(
                f"cache key {key[:40]!r} is not encodable as UTF-8 (lone surrogate?)"
            ) from exc
    elif isinstance(key, bytes):
        raw = key
    else:
        raise KeyTypeError(f"cache keys are str or bytes, got {type(key).__name__}")
    if not raw:
        raise InvalidKeyError("empty cache key")
    if len(raw) > MAX_KEY_BYTES:
        raise KeyTooLongError(
            f"cache key of {len(raw)} bytes exceeds the limit of {MAX_KEY_BYTES} bytes "
            "(never truncated)"
        )
    return raw


def check_ttl(ttl: object, what: str = "ttl") -> float:
    """``ttl`` as float seconds (0 = no expiry), or InvalidTTLError naming the limit."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)):
        raise InvalidTTLError(
            f"{what} must be a number of seconds (int or float), got {type(ttl).__name__}"
        )
    if isinstance(ttl, float) and not math.isfinite(ttl):
        raise InvalidTTLError(f"{what} must be finite, got {ttl!r}")
    if ttl < 0:
        raise InvalidTTLError(f"{what} must be >= 0 seconds (0 = no expiry), got {ttl!r}")
    if ttl > MAX_TTL:
        raise InvalidTTLError(
            f"{what} of {ttl!r} s exceeds the limit of {MAX_TTL} s (10 years); use 0 for no expiry"
        )
    return float(ttl)


def memory_key(key: bytes) -> tuple[str, bytes]:
    """Memory-tier key of a cache key: (32 hex chars, the 16 raw bytes)."""
    raw = hashlib.blake2b(key, digest_size=16, person=b"zeal-cache-key").digest()
    return raw.hex(), raw


class RowCodec:
    """Builds and opens authenticated memory-tier rows with one MAC key.

    The MAC is keyed BLAKE2b (a MAC by design, twice as fast as HMAC-SHA256 here); with
    ``hmac_sha256=True`` (pickle mode: what is loaded may run code) it is HMAC-SHA256, truncated
    to the same 16 bytes.
    """

    def __init__(self, mac_key: bytes, *, hmac_sha256: bool = False) -> None:
        self._key = mac_key
        self._hmac = hmac_sha256

    def _mac(self, raw: bytes, exp: float, body: bytes) -> bytes:
        msg = raw + _EXP.pack(exp) + body
        if self._hmac:
            return hmac.digest(self._key, msg, "sha256")[:16]
        return hashlib.blake2b(msg, key=self._key, digest_size=16).digest()

    def inline(self, raw: bytes, exp: float, serializer: int, payload: bytes) -> dict[str, Any]:
        """A row holding the value itself."""
        body = bytes((INLINE, serializer)) + payload
        return {"v": body, "exp": exp, "m": self._mac(raw, exp, body)}

    def pointer(self, raw: bytes, exp: float, nonce: bytes) -> dict[str, Any]:
        """A row saying: the value is in the file tier, in the file carrying ``nonce``."""
        body = bytes((POINTER,)) + nonce
        return {"v": body, "exp": exp, "m": self._mac(raw, exp, body)}

    def open(self, raw: bytes, row: Any) -> tuple[int, float, bytes] | None:
        """``(kind, expires_at, rest)`` of an authentic row, ``None`` if it fails the check."""
        try:
            body, exp, mac = row["v"], row["exp"], row["m"]
        except (KeyError, TypeError):
            return None
        if not (isinstance(body, bytes) and isinstance(exp, float) and isinstance(mac, bytes)):
            return None
        if len(body) < 2 or not hmac.compare_digest(mac, self._mac(raw, exp, body)):
            return None
        kind = body[0]
        if kind == INLINE or (kind == POINTER and len(body) == 17):
            return kind, exp, body[1:]
        return None
