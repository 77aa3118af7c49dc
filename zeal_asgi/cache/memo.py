"""Per-worker memo of decoded cache values, keyed by slot and checked against the exact bytes.

Decoding is the largest part of a hit once the bytes are in hand, and a hot key's bytes rarely
change.  A worker that decoded a payload keeps the result beside those bytes; the next hit whose
bytes are *equal* (compared in full, one ``memcmp``) gets a copy instead of a second decode.  Only
values whose copy is exact and independent are kept: immutable scalars (``str``, ``bytes``,
``int``, ``float``, ``bool``, ``None``), tuples of them, and flat ``dict`` / ``list`` of them
(a shallow copy is then a full copy).  Anything else is decoded every time, so a caller can
always mutate what it got without touching what another caller gets.

The memo lives in one worker's memory, never in a shared or persistent surface, and it is
consulted only with bytes that were read and checked the usual way: it changes the cost of a
hit, never its outcome.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from typing import Any, cast

from zeal_asgi.cache.serializer import Serializer

_IMMUTABLE = frozenset({str, bytes, int, float, bool, type(None)})
MAX_VALUE_BYTES = 256 << 10
"""Payloads larger than this are never kept: they are decoded every time."""


def _copier(value: Any) -> Callable[[], Any] | None:
    """A function returning exact, independent copies of ``value``, if a cheap one exists."""
    t = type(value)
    if t in _IMMUTABLE or (t is tuple and all(type(x) in _IMMUTABLE for x in value)):
        return lambda: value
    if t is dict or t is list:
        items = value.values() if t is dict else value
        if all(type(x) in _IMMUTABLE for x in items):
            return cast(Callable[[], Any], value.copy)  # flat: a shallow copy is a full one
    return None


class DecodeMemo:
    """Decoded values of one serializer by slot (a row key, a file name), bounded.

    Args:
        serializer: decodes the payloads.
        max_entries / max_bytes: when either is reached the memo starts over (cleared), which
            keeps it bounded at no cost per hit.

    Payloads larger than ``MAX_VALUE_BYTES`` are never kept.
    """

    def __init__(
        self, serializer: Serializer, *, max_entries: int = 4096, max_bytes: int = 4 << 20
    ) -> None:
        self._loads = serializer.loads
        self._memo: dict[Hashable, tuple[bytes, int, Callable[[], Any]]] = {}
        self._bytes = 0
        self.max_entries = max_entries
        self.max_bytes = max_bytes

    def loads(self, slot: Hashable, blob: bytes, start: int = 0) -> Any:
        """The value serialized in ``blob[start:]``; ``blob`` is what must match next time.

        Raises SerializationError like the serializer's ``loads``.
        """
        kept = self._memo.get(slot)
        if kept is not None and (kept[0] is blob or kept[0] == blob) and kept[1] == start:
            return kept[2]()
        value = self._loads(blob[start:] if start else blob)
        size = len(blob)
        if size <= MAX_VALUE_BYTES:
            copier = _copier(value)
            if copier is not None:
                if kept is not None:
                    self._bytes -= len(kept[0])
                if len(self._memo) >= self.max_entries or self._bytes + size > self.max_bytes:
                    self.clear()
                self._memo[slot] = (blob, start, copier)
                self._bytes += size
                return copier()  # the kept value itself is never handed out
        return value

    def kept(
        self, slot: Hashable, blob: bytes, start: int = 0
    ) -> tuple[bytes, Callable[[], Any]] | None:
        """The bytes kept at ``slot`` (equal to ``blob``) and what hands out copies of their
        value; ``None`` when the memo keeps no value for ``blob[start:]`` there."""
        kept = self._memo.get(slot)
        if kept is not None and kept[0] == blob and kept[1] == start:
            return kept[0], kept[2]
        return None

    def clear(self) -> None:
        """Drop every kept value."""
        self._memo.clear()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._memo)
