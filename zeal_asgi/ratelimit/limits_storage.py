"""``LimitsStorage``: a storage of the ``limits`` library in this host's shared memory.

``storage_from_string("zeal://")`` (and so slowapi's ``Limiter(..., storage_uri="zeal://")``)
gives every worker of the host the same counters: a fixed-window limit lets exactly its amount
through however many workers serve the requests, where limits' ``memory://`` keeps one counter
per process.  Options ride in the query: ``zeal://?max_keys=65536``.

A counter is one row of a shared table, changed by one
:func:`~zeal_asgi.shm.ext.incr_bounded`.  For the fixed window its INT column holds when the
window ends (in 1/64 s) in the high bits and the count in the low 26 bits; a row whose end has
passed is below the floor ``now`` and is replaced by ``(now + expiry, 0)`` in the same locked
step as the add, so a window starts at its first hit, as in limits' own storages.  (A count
past 2^26 - 1, 67 million in one window, would spill into the end: far above any limit.)  The
sliding-window counter keeps one row per window (aligned, as limits does for it) and charges the
current one only while the weighted count stays within the limit.  The moving window (a log of
every hit) has no fixed-size row and is not supported.
"""

from __future__ import annotations

import math
import time
import urllib.parse
from hashlib import blake2b
from typing import Any

from limits.storage import SlidingWindowCounterSupport, Storage
from limits.storage.base import TimestampedSlidingWindow

from zeal_asgi.errors import ConfigError, TableFullError, ZealError
from zeal_asgi.shm.ext import Table, incr_bounded

_SHIFT = 26
_MASK = (1 << _SHIFT) - 1
_TICKS = 64  # per second: the resolution of a window's end
_KEY_BYTES = 200  # longer keys are stored as a hash of themselves
_tables: dict[int, Table] = {}


def _row(key: str) -> str:
    if len(key) <= _KEY_BYTES and key.isascii():
        return key
    raw = key.encode("utf-8", "surrogatepass")
    if len(raw) <= _KEY_BYTES:
        return key
    return "#" + blake2b(raw, digest_size=20).hexdigest()


class LimitsStorage(Storage, SlidingWindowCounterSupport, TimestampedSlidingWindow):
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
        """Add ``amount`` to ``key``'s count; a key without a live window starts one of
        ``expiry`` seconds."""
        now = int(time.time() * _TICKS)
        fresh = (now + round(expiry * _TICKS)) << _SHIFT
        value, _ = self._bounded(_row(key), amount, 2**63 - 1, (now + 1) << _SHIFT, fresh)
        return int(value & _MASK)

    def _bounded(
        self, key: str, by: int, bound: int, floor: int | None, reset: int | None = None
    ) -> tuple[int, bool]:
        try:
            return incr_bounded(self.table, key, "v", by, bound, floor, reset)
        except TableFullError:
            if not self._reclaim():
                raise
            return incr_bounded(self.table, key, "v", by, bound, floor, reset)

    def _current(self, key: str) -> tuple[int, float] | None:
        """``(count, window end)`` of a fixed-window counter whose window has not ended."""
        value = self.table.get(_row(key), "v")
        if value is None or value >> _SHIFT <= time.time() * _TICKS:
            return None
        return value & _MASK, (value >> _SHIFT) / _TICKS

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

    @classmethod
    def _keys(cls, key: str, expiry: float, now: float) -> tuple[str, str]:
        previous, current = cls.sliding_window_keys(key, int(expiry), now)
        return _row(previous), _row(current)

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
        prev, prev_ttl, cur, _ = self._window_info(previous, current, expiry, now)
        bound = limit - math.floor(prev * prev_ttl / expiry)
        _, applied = self._bounded(current, amount, bound, None)
        if applied and cur == 0:  # the window's first hit: its length, for the reclaim sweep
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
            if per > 0:  # a sliding window's row: the next window still reads it
                window = str(key).rpartition("/")[2]
                stale = window.lstrip("-").isdigit() and int(window) < int(now // per) - 1
            else:  # a fixed window's row: stale once its end has passed
                stale = row["v"] >> _SHIFT <= now * _TICKS
            # only if no hit changed the row since it was read: a new window keeps its count
            if stale and self.table.delete_if(key, "v", row["v"]):
                removed += 1
        return removed > 0
