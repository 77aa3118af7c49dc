"""Cache keys, TTLs and the value of a memory-tier row.

A memory-tier row has one column, ``v`` = ``head ‖ mac ‖ body``.  ``head`` packs the row kind,
the serializer id and the expiry; ``body`` is the serialized value (``INLINE``) or the 16-byte
nonce of the file-tier entry holding it (``POINTER``).

Where rows are authenticated, ``mac`` is 16 bytes of a keyed BLAKE2b (HMAC-SHA256 in pickle mode,
where what is loaded may run code) over the row key, ``head`` and ``body``, checked before the
body is used:

* on the shared backends (redis, tiered, memcached), where other hosts write the rows;
* on the table backend in pickle mode.

On the table backend with the JSON serializer rows carry no MAC (``mac`` is empty).  The memory
tier is then a shared-memory segment of this server, mode 0600: only the server's own user (or
root) can write it, and that user can also read the MAC key (it lives in the same process memory,
or in a segment beside it when no secret is configured), attach a debugger to the workers or
rewrite the application, so a MAC there would detect nothing it could not forge.  What can reach
the segment by accident is ruled out by the table itself (no torn reads, typed writes), and the
JSON serializer runs no code whatever the bytes (beyond the validators of pydantic models the
application already imported, as for any JSON it receives).  Rows are still checked for shape (a
bad head, kind or length is counted as ``memory_corrupt`` and dropped), and decoding errors are
misses, never errors.  The file tier is different: its directory outlives the server and may be
restored, copied or shared, so every file keeps its HMAC-SHA256 (reliability §3).

Row keys: on shared backends ``blake2b(key)`` as 32 hex chars; on the table backend the key
itself when it is shorter than ``LOCAL_KEY_BYTES`` (no hashing on the hot path), else a 64-byte
BLAKE2b of it, a length no direct key has, so the two kinds never collide.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import struct
from collections.abc import Callable

from zeal_asgi.errors import InvalidKeyError, InvalidTTLError, KeyTooLongError, KeyTypeError

__all__ = [
    "HEAD",
    "INLINE",
    "LOCAL_KEY_BYTES",
    "MAC_BYTES",
    "MAX_KEY_BYTES",
    "POINTER",
    "Mac",
    "check_key",
    "check_ttl",
    "local_key",
    "memory_key",
    "row_mac",
    "seal",
    "unseal",
]

MAX_KEY_BYTES = 4096
MAX_TTL = 10 * 365 * 86400
"""Ten years: a longer TTL is a unit mistake (milliseconds?), refused rather than stored."""

INLINE = 1
POINTER = 2
HEAD = struct.Struct("<BBd")
"""Head of ``v``: kind, serializer id (0 in a pointer), expires_at (0.0 = never)."""
LOCAL_KEY_BYTES = 64
"""Row keys of the table backend are at most this long (the table's default key limit)."""
MAC_BYTES = 16
NONCE_BYTES = 16

Mac = Callable[[bytes], bytes]
"""A row MAC: 16 bytes over the given bytes."""


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


def memory_key(key: bytes) -> str:
    """Row key of a cache key on shared backends, and name of its locks: 32 hex chars."""
    return hashlib.blake2b(key, digest_size=16, person=b"zeal-cache-key").hexdigest()


def local_key(key: bytes) -> bytes:
    """Row key of a cache key on the table backend: itself if shorter than 64 bytes."""
    if len(key) < LOCAL_KEY_BYTES:
        return key
    return hashlib.blake2b(key, digest_size=LOCAL_KEY_BYTES, person=b"zeal-cache-key").digest()


def row_mac(key: bytes, hmac_sha256: bool) -> Mac:
    """The MAC of rows under ``key``: keyed BLAKE2b (a MAC by design, twice as fast as
    HMAC-SHA256 on short rows), or HMAC-SHA256 truncated to the same 16 bytes (pickle mode)."""
    if hmac_sha256:
        return lambda data: hmac.digest(key, data, "sha256")[:MAC_BYTES]
    return lambda data: hashlib.blake2b(data, key=key, digest_size=MAC_BYTES).digest()


def seal(mac: Mac | None, rk: bytes, kind: int, serializer: int, exp: float, body: bytes) -> bytes:
    """The ``v`` of a row at ``rk``: an ``INLINE`` value or a ``POINTER`` nonce."""
    head = HEAD.pack(kind, serializer, exp)
    return head + (mac(rk + head + body) if mac else b"") + body


def unseal(mac: Mac | None, rk: bytes, v: bytes) -> int:
    """Where the body of ``v`` starts if the row is well formed (and, with ``mac``, authentic);
    -1 otherwise."""
    start = HEAD.size + (MAC_BYTES if mac else 0)
    if len(v) < start:
        return -1
    if mac and not hmac.compare_digest(v[HEAD.size : start], mac(rk + v[: HEAD.size] + v[start:])):
        return -1
    kind = v[0]
    if (kind == INLINE and v[1]) or (kind == POINTER and len(v) == start + NONCE_BYTES):
        return start
    return -1
