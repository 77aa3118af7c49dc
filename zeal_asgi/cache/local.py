"""The memory tier on the table backend: one shared-memory table, read and written synchronously.

Every worker of the host maps the same table, so nothing here awaits: a hit is a row read, a
head check and a decode, called straight from ``Cache.get`` without a coroutine in between.  On
this backend every entry is also written to the file tier, which serves the values the table
does not hold (after a restart, a full table, an oversize value behind a pointer row); see
:mod:`zeal_asgi.cache.tiers` for the rules the two tiers follow and :mod:`zeal_asgi.cache.entry`
for why rows carry a MAC only in pickle mode here.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from zeal_asgi.cache.entry import (
    HEAD,
    INLINE,
    LOCAL_KEY_BYTES,
    NONCE_END,
    POINTER,
    RowCodec,
    check_key,
    local_key,
)
from zeal_asgi.cache.files.tier import Entry, FileTier
from zeal_asgi.cache.memo import DecodeMemo
from zeal_asgi.errors import CapacityError, SerializationError, TableFullError

if TYPE_CHECKING:
    from zeal_asgi.shm import Table

__all__ = ["SPILL_ERRORS", "ZERO_NONCE", "LocalTier", "expiries", "read_file"]

ZERO_NONCE = b"\0" * 16
"""Nonce of the file copy of an inline row (no pointer row names it)."""
SPILL_ERRORS = (TableFullError, CapacityError)
"""What a memory-tier write raises when the value must spill to the file tier instead."""
_HEAD = HEAD.size
_unpack_head = HEAD.unpack_from
_time = time.time


def expiries(seconds: float, ttl_seconds: float | None) -> tuple[float, float]:
    """``(expires_at, memory_expires_at)`` of a value stored now for ``seconds`` (0: never);
    the memory tier's own ``ttl_seconds`` may end its row earlier than the file."""
    now = _time()
    exp = now + seconds if seconds else 0.0
    if not ttl_seconds:
        return exp, exp
    return exp, min(exp or float("inf"), now + ttl_seconds)


def read_file(
    files: FileTier,
    memo: DecodeMemo,
    serializer: int,
    count: Callable[[str], None],
    key: bytes,
    nonce: bytes | None,
    now: float,
) -> tuple[bool, Any]:
    """``(True, value)`` from the file of ``key`` (carrying ``nonce`` if given), else a miss.

    A file that is authentic but cannot be used (another serializer, undecodable) is dropped.
    """
    entry = files.read(key, now)
    if entry is None or (nonce is not None and entry.nonce != nonce):
        return False, None
    return use_entry(files, memo, serializer, count, key, entry)


def use_entry(
    files: FileTier,
    memo: DecodeMemo,
    serializer: int,
    count: Callable[[str], None],
    key: bytes,
    entry: Entry,
) -> tuple[bool, Any]:
    """``(True, value)`` of an authentic file entry of ``key``; an unusable one is dropped."""
    if entry.serializer != serializer:
        count("serializer_mismatch")  # e.g. a pickle entry read by a JSON cache
    else:
        try:
            return True, memo.loads((key, 0), entry.payload)  # the slot LocalTier uses too
        except SerializationError:
            count("decode_errors")
    files.discard(key, "undecodable")
    return False, None


class LocalTier:
    """Rows of one cache in its shared table, plus the file tier behind them."""

    def __init__(
        self,
        table: Table,
        codec: RowCodec,
        files: FileTier,
        memo: DecodeMemo,
        serializer: int,
        memory_value_bytes: int,
        ttl_seconds: float | None,
        count: Callable[[str], None],
    ) -> None:
        self.table = table
        self.codec = codec
        self.files = files
        self.memo = memo
        self.serializer = serializer
        self.memory_value_bytes = memory_value_bytes
        self.ttl_seconds = ttl_seconds
        self.count = count
        # bound once: every attribute lookup shows on a 1.5 µs hit
        self._get = table.get
        self._loads = memo.loads
        self._read = files.read
        self._authenticated = codec.authenticated

    def _row(self, rk: str | bytes) -> bytes | None:
        """``v`` of the row at ``rk`` after the MAC check (pickle mode); counted when bad."""
        row = self.table.get(rk)
        if row is None:
            return None
        v = self.codec.check(rk.encode() if isinstance(rk, str) else rk, row)
        if v is None:
            self.count("memory_corrupt")
            self.table.delete(rk)
        return v

    def lookup(self, key: str | bytes) -> tuple[bool, Any, str]:
        """``(found, value, event)`` for a cache key (validated here, like ``check_key``)."""
        raw: bytes | None
        if type(key) is str and 0 < len(key) < LOCAL_KEY_BYTES and key.isascii():
            rk: str | bytes = key  # the same row as its UTF-8 bytes, without encoding it
            raw = None
        else:
            raw = check_key(key)
            rk = local_key(raw)
        v = self._row(rk) if self._authenticated else self._get(rk, "v")
        now = _time()
        entry: Entry | None = None
        file_read = False
        if v is not None:
            if len(v) >= _HEAD:
                kind, ser, exp = _unpack_head(v)
                if exp and exp <= now:
                    self.count("memory_expired")
                elif kind == INLINE and ser == self.serializer:
                    try:
                        return True, self._loads(rk, v, _HEAD), "hits_memory"
                    except SerializationError:
                        self.count("decode_errors")
                elif kind == POINTER and len(v) == NONCE_END:
                    if raw is None:
                        raw = key.encode()  # type: ignore[union-attr]
                    entry, file_read = self._read(raw, now), True
                    if entry is not None and entry.nonce == v[_HEAD:]:
                        found, value = use_entry(
                            self.files, self.memo, self.serializer, self.count, raw, entry
                        )
                        if found:
                            return True, value, "hits_file"
                        entry = None  # dropped as unusable
                    # a stale pointer: the file already read decides, below
                elif kind == INLINE and ser:
                    self.count("serializer_mismatch")
                else:
                    self.count("memory_corrupt")
            else:
                self.count("memory_corrupt")
            self.table.delete(rk)
            self.memo.forget(rk)
        if raw is None:
            raw = key.encode()  # type: ignore[union-attr]
        if not file_read:
            entry = self._read(raw, now)
        if entry is None:
            return False, None, "misses"
        found, value = use_entry(self.files, self.memo, self.serializer, self.count, raw, entry)
        return found, value, "hits_file" if found else "misses"

    def put(self, key: bytes, payload: bytes, seconds: float) -> bool:
        """Store a serialized value: an inline row and its file copy, or a file and a pointer
        row; ``False`` when nothing was stored."""
        exp, mexp = expiries(seconds, self.ttl_seconds)
        rk = local_key(key)
        ser = self.serializer
        if len(payload) <= self.memory_value_bytes:
            try:
                self.table.set(rk, self.codec.inline(rk, mexp, ser, payload))
            except SPILL_ERRORS:
                self.count("spills_full")
            else:
                # The file is the copy served after a restart; if it cannot be written, an
                # older file of this key must not be served later instead.
                if not self.files.write(key, ser, exp, payload, ZERO_NONCE):
                    self.files.delete(key)
                return True
        else:
            self.count("spills_oversize")
        nonce = secrets.token_bytes(16)
        if not self.files.write(key, ser, exp, payload, nonce):
            # nothing may keep serving an older value of this key
            self.table.delete(rk)
            self.files.delete(key)
            return False
        try:
            self.table.set(rk, self.codec.pointer(rk, mexp, nonce))
        except SPILL_ERRORS:
            self.table.delete(rk)  # the file alone serves it
        return True

    def delete(self, key: bytes) -> bool:
        """Remove ``key`` from both tiers; ``True`` if either held it."""
        rk = local_key(key)
        self.memo.forget(rk)
        if rk is key and key.isascii():
            self.memo.forget(key.decode())  # lookup's slot for the same key given as a str
        in_memory = self.table.delete(rk)
        return self.files.delete(key) or in_memory
