"""``LimitsStorage``: a storage of the ``limits`` library in this host's shared memory.

``storage_from_string("zeal://")`` (and so slowapi's ``Limiter(..., storage_uri="zeal://")``)
gives every worker of the host the same counters: a fixed-window limit lets exactly its amount
through however many workers serve the requests, where limits' ``memory://`` keeps one counter
per process.  Options ride in the query: ``zeal://?max_keys=65536``.

A counter is one row of a shared table, changed by one
:func:`~zeal_asgi.shm.ext.incr_bounded`: for the fixed window its INT column holds the window
number in the high 32 bits and the count in the low 32, and the floor ``window << 32`` starts a
new window at zero in the same locked step as the add (so windows are aligned to the epoch, like
limits' own sliding-window counters).  The sliding-window counter keeps one row per window and
charges the current one only while the weighted count stays within the limit.  The moving
window (a log of every hit) has no fixed-size row and is not supported.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from hashlib import blake2b
from typing import Any

from limits.storage import SlidingWindowCounterSupport, Storage

from zeal_asgi.errors import ConfigError, TableFullError, ZealError
from zeal_asgi.shm.ext import Table, incr_bounded

__all__ = ["LimitsStorage"]

_SHIFT = 32
_MASK = (1 << _SHIFT) - 1
_KEY_BYTES = 200  # longer keys are stored as a hash of themselves
_tables: dict[int, Table] = {}


def _row(key: str) -> str:
    if len(key) <= _KEY_BYTES and key.isascii():
        return key
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= _KEY_BYTES:
        return key
    return "#" + blake2b(raw, digest_size=20).hexdigest()


class LimitsStorage(Storage, SlidingWindowCounterSupport):
    """Fixed-window and sliding-window-counter storage for ``limits`` (scheme ``zeal://``),
    shared by every worker of the host.

    Create it (or the slowapi ``Limiter`` that does) at import time, before the workers start,
    like every shared table.
    """

    STORAGE_SCHEME = ["zeal"]

    def __init__(
        self, uri: str | None = None, wrap_exceptions: bool = False, **options: Any
    ) -> None:
        query = dict(urllib.parse.parse_qsl(urllib.parse.urlparse(uri or "zeal://").query))
        query.update({k: str(v) for k, v in options.items()})
        unknown = set(query) - {"max_keys"}
        if unknown:
            raise ConfigError(f"zeal:// storage: unknown options {sorted(unknown)}")
        try:
            max_keys = int(query.get("max_keys", 65536))
        except ValueError:
            raise ConfigError(f"zeal:// max_keys is an int, got {query['max_keys']!r}") from None
        if not 1 <= max_keys <= 2**28:
            raise ConfigError(f"zeal:// max_keys must be in [1, {2**28}], got {max_keys}")
        table = _tables.get(max_keys)
        if table is None or table.closed:
            table = Table(
                max_keys,
                {"v": ("int", 8), "p": ("float", 8)},
                name=f"ratelimit:limits:{max_keys}",
                key_size=_KEY_BYTES + 24,
            )
            _tables[max_keys] = table
        self.table = table
        self._reclaimed_at = 0.0
        super().__init__(uri, wrap_exceptions=wrap_exceptions)

    @property
    def base_exceptions(self) -> type[Exception] | tuple[type[Exception], ...]:
        """What limits wraps in ``StorageError`` (with ``wrap_exceptions=True``)."""
        return ZealError

    # -- fixed window --------------------------------------------------------------------------

    def incr(self, key: str, expiry: float, amount: int = 1) -> int:
        """Add ``amount`` to ``key``'s count in the current window of ``expiry`` seconds."""
        now = time.time()
        w = int(now // expiry)
        k = _row(key)
        value, applied = self._bounded(k, amount, ((w + 1) << _SHIFT) - 1, w << _SHIFT)
        if not applied:
            return _MASK  # over 4 billion in one window: above any limit
        count = value & _MASK
        if count == amount:  # the window's first hit: record its length for get/get_expiry
            self.table.set(k, {"p": float(expiry)})
        return count

    def _bounded(self, key: str, by: int, bound: int, floor: int | None) -> tuple[int, bool]:
        try:
            return incr_bounded(self.table, key, "v", by, bound, floor)
        except TableFullError:
            if not self._reclaim():
                raise
            return incr_bounded(self.table, key, "v", by, bound, floor)

    def _current(self, key: str) -> tuple[int, float] | None:
        """``(count, window end)`` of a fixed-window counter in its current window."""
        row = self.table.get(_row(key))
        if row is None or row["p"] <= 0:
            return None
        w, per = row["v"] >> _SHIFT, row["p"]
        if w != int(time.time() // per):
            return None
        return row["v"] & _MASK, (w + 1) * per

    def get(self, key: str) -> int:
        """The count of ``key`` in its current window (0 when none)."""
        current = self._current(key)
        return 0 if current is None else current[0]

    def get_expiry(self, key: str) -> float:
        """When ``key``'s current window ends (now when it has none)."""
        current = self._current(key)
        return time.time() if current is None else current[1]

    def clear(self, key: str) -> None:
        """Forget ``key``."""
        self.table.delete(_row(key))

    def reset(self) -> int | None:
        """Forget every key; the number of rows removed."""
        n = len(self.table)
        self.table.clear()
        return n

    def check(self) -> bool:
        """Shared memory is always there."""
        return not self.table.closed

    # -- sliding window counter ----------------------------------------------------------------

    @staticmethod
    def _keys(key: str, expiry: float, now: float) -> tuple[str, str]:
        w = int(now // expiry)
        return _row(f"{key}/{w - 1}"), _row(f"{key}/{w}")

    def _window_info(
        self, previous: str, current: str, expiry: float, now: float
    ) -> tuple[int, float, int, float]:
        prev = self.table.get(previous, "v") or 0
        cur = self.table.get(current, "v") or 0
        prev_ttl = (1 - ((now - expiry) / expiry) % 1) * expiry if prev else 0.0
        cur_ttl = (1 - (now / expiry) % 1) * expiry + expiry
        return prev, prev_ttl, cur, cur_ttl

    def acquire_sliding_window_entry(
        self, key: str, limit: int, expiry: int, amount: int = 1
    ) -> bool:
        """Charge ``amount`` to the current window while the weighted count of the two windows
        stays within ``limit`` (one locked step: no other hit passes in between)."""
        if amount > limit:
            return False
        now = time.time()
        previous, current = self._keys(key, expiry, now)
        prev, prev_ttl, _, _ = self._window_info(previous, current, expiry, now)
        bound = limit - math.floor(prev * prev_ttl / expiry)
        _, applied = self._bounded(current, amount, bound, None)
        if applied:
            self.table.set(current, {"p": float(expiry)})
        return applied

    def get_sliding_window(self, key: str, expiry: int) -> tuple[int, float, int, float]:
        """``(previous count, its ttl, current count, its ttl)``, as limits expects."""
        now = time.time()
        return self._window_info(*self._keys(key, expiry, now), expiry, now)

    def clear_sliding_window(self, key: str, expiry: int) -> None:
        """Forget both windows of ``key``."""
        for k in self._keys(key, expiry, time.time()):
            self.table.delete(k)

    # -- memory --------------------------------------------------------------------------------

    def _reclaim(self) -> bool:
        """Remove rows of windows that have ended (at most once a second, when the table is
        full); ``True`` when any was."""
        now = time.time()
        if now - self._reclaimed_at < 1.0:
            return False
        self._reclaimed_at = now
        removed = 0
        for key, row in list(self.table.items()):
            per = row["p"]
            if per <= 0:
                continue
            _, sep, tail = str(key).rpartition("/")
            if sep and tail.lstrip("-").isdigit():  # a sliding window's row: read one window on
                stale = int(tail) < int(now // per) - 1
            else:
                stale = row["v"] >> _SHIFT < int(now // per)
            if stale and self.table.delete(key):
                removed += 1
        return removed > 0
