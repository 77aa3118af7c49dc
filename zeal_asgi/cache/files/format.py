"""The layout of a file-tier entry and the checks of its header that need no key.

Layout (little-endian)::

    magic "ZC\\x01\\x00" | version u16 | serializer u8 | flags u8 | key id u32 |
    created_at f64 | expires_at f64 (0 = never) | nonce 16 B | key_len u32 | payload_len u64 |
    HMAC-SHA256 32 B | key bytes | payload
"""

from __future__ import annotations

import os
import re
import struct

__all__ = [
    "HEADER",
    "HEAD_LEN",
    "MAC_LEN",
    "MAGIC",
    "NAME_RE",
    "READ_FLAGS",
    "VERSION",
    "check_head",
]

MAGIC = b"ZC\x01\x00"
VERSION = 1
HEADER = struct.Struct("<4sHBBIdd16sIQ")
MAC_LEN = 32
HEAD_LEN = HEADER.size + MAC_LEN
NAME_RE = re.compile(r"^[0-9a-f]{64}\.zc$")
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Never follow a planted symlink; never block on a planted FIFO."""


def check_head(head: bytes, size: int, kid: int) -> str | None:
    """Why the header of a ``size``-byte file is unusable under key id ``kid``, or ``None``."""
    if len(head) < HEADER.size:
        return "short"
    magic, ver, _, flags, file_kid, _, _, _, klen, plen = HEADER.unpack_from(head)
    if magic != MAGIC:
        return "magic"
    if ver != VERSION or flags != 0:
        return "version"
    if HEAD_LEN + klen + plen != size:
        return "size"
    if file_kid != kid:
        return "key_id"  # written under another key (an earlier server run): unreadable
    return None
