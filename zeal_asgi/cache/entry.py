"""Cache keys, TTLs and memory-tier rows: validation and the row format.

A memory-tier row is ``{"v": head ‖ body, "exp": expires_at, "m": mac}``.  ``head`` packs the
row kind, the serializer id and the expiry; ``body`` is the serialized value (``INLINE``) or the
16-byte nonce of the file-tier entry holding it (``POINTER``).  ``exp`` repeats the expiry for
the GC sweeps, which read it without opening ``v``.

Where rows are authenticated, ``mac`` is a keyed BLAKE2b (HMAC-SHA256 in pickle mode, where what
is loaded may run code) over the row key and ``v``, checked before ``v`` is used:

* on the shared backends (redis, tiered, memcached), where other hosts write the rows;
* on the table backend in pickle mode.

On the table backend with the JSON serializer the rows carry no MAC (``m`` is empty).  The
memory tier is then a shared-memory segment of this server, mode 0600: only the server's own
user (or root) can write it, and that user can also read the MAC key (it lives in the same
process memory, or in a segment beside it when no secret is configured), attach a debugger to
the workers or rewrite the application, so a MAC there would detect nothing it could not forge.
What can reach the segment by accident is ruled out by the table itself (no torn reads, typed
writes), and the JSON serializer runs no code whatever the bytes (beyond the validators of
pydantic models the application already imported, as for any JSON it receives).  Rows are still
checked for shape (a bad head, kind or length is counted as ``memory_corrupt`` and dropped), and
decoding errors are misses, never errors.  The file tier is different: its directory outlives
the server and may be restored, copied or shared, so every file keeps its HMAC-SHA256
(reliability §3).

Row keys: on shared backends ``blake2b(key)`` as 32 hex chars; on the table backend the key
itself when it is shorter than ``LOCAL_KEY_BYTES`` (no hashing on the hot path), else a 64-byte
BLAKE2b of it, a length no direct key has, so the two kinds never collide.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from typing import Any

from zeal_asgi.errors import InvalidKeyError, InvalidTTLError, KeyTooLongError, KeyTypeError

__all__ = [
    "HEAD",
    "INLINE",
    "LOCAL_KEY_BYTES",
    "MAX_KEY_BYTES",
    "MAX_TTL",
    "NONCE_END",
    "POINTER",
    "RowCodec",
    "check_key",
    "check_ttl",
    "local_key",
    "memory_key",
    "well_formed",
]

MAX_KEY_BYTES = 4096
MAX_TTL = 10 * 365 * 86400
"""Ten years: a longer TTL is a unit mistake (milliseconds?), refused rather than stored."""

INLINE = 1
POINTER = 2
HEAD = struct.Struct("<BBd")
"""Head of ``v``: kind, serializer id (0 in a pointer), expires_at (0.0 = never)."""
NONCE_END = HEAD.size + 16
"""Length of a pointer row's ``v``."""
LOCAL_KEY_BYTES = 64
"""Row keys of the table backend are at most this long (the table's default key limit)."""
MAC_BYTES = 16


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
    """Row key of a cache key on shared backends and of its lock: (32 hex chars, 16 bytes)."""
    raw = hashlib.blake2b(key, digest_size=16, person=b"zeal-cache-key").digest()
    return raw.hex(), raw


def local_key(key: bytes) -> bytes:
    """Row key of a cache key on the table backend: itself if shorter than 64 bytes."""
    if len(key) < LOCAL_KEY_BYTES:
        return key
    return hashlib.blake2b(key, digest_size=LOCAL_KEY_BYTES, person=b"zeal-cache-key").digest()


class RowCodec:
    """Builds memory-tier rows and checks them, authenticated with ``mac_key`` or not at all.

    The MAC is keyed BLAKE2b (a MAC by design, twice as fast as HMAC-SHA256 on short rows); with
    ``hmac_sha256=True`` (pickle mode: what is loaded may run code) it is HMAC-SHA256, truncated
    to the same 16 bytes.  ``mac_key=None``: rows are not authenticated (see the module doc).
    """

    def __init__(self, mac_key: bytes | None, *, hmac_sha256: bool = False) -> None:
        self._key = mac_key
        self._hmac = hmac_sha256
        self.authenticated = mac_key is not None

    def _mac(self, row_key: bytes, v: bytes) -> bytes:
        if self._key is None:
            return b""
        if self._hmac:
            return hmac.digest(self._key, row_key + v, "sha256")[:MAC_BYTES]
        return hashlib.blake2b(row_key + v, key=self._key, digest_size=MAC_BYTES).digest()

    def inline(self, row_key: bytes, exp: float, serializer: int, payload: bytes) -> dict[str, Any]:
        """A row holding the value itself."""
        v = HEAD.pack(INLINE, serializer, exp) + payload
        return {"v": v, "exp": exp, "m": self._mac(row_key, v)}

    def pointer(self, row_key: bytes, exp: float, nonce: bytes) -> dict[str, Any]:
        """A row saying: the value is in the file tier, in the file carrying ``nonce``."""
        v = HEAD.pack(POINTER, 0, exp) + nonce
        return {"v": v, "exp": exp, "m": self._mac(row_key, v)}

    def check(self, row_key: bytes, row: Any) -> bytes | None:
        """``v`` of a well-formed (and, with a key, authentic) row; ``None`` otherwise."""
        try:
            v, mac = row["v"], row["m"]
        except (KeyError, TypeError):
            return None
        if not (isinstance(v, bytes) and isinstance(mac, bytes)):
            return None
        if self._key is not None and not hmac.compare_digest(mac, self._mac(row_key, v)):
            return None
        return v if well_formed(v) else None


def well_formed(v: bytes) -> bool:
    """``v`` has a head and a body of its kind's length."""
    n = len(v)
    if n < HEAD.size:
        return False
    kind = v[0]
    return (kind == INLINE and v[1] != 0) or (kind == POINTER and n == NONCE_END)
