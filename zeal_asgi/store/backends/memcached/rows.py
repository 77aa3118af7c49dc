"""Row helpers of the memcached backend: layout choice, expiry, ``incr`` results, options.

The results of ``incr`` raise the same errors, with the same messages, as the shared-memory table.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Iterable
from typing import Any, TypeVar

from zeal_asgi.errors import ConfigError, IntegerOverflowError, NonFiniteFloatError
from zeal_asgi.shm.schema import Column, ColumnType
from zeal_asgi.store.base import TableSpec

__all__ = ["added", "expiry", "gather_all", "native_column", "seconds"]

R = TypeVar("R")

_RELATIVE_TTL_MAX = 30 * 24 * 3600
"""memcached reads an expiry above 30 days as an absolute Unix time."""
_INT64 = (-(2**63), 2**63 - 1)


def seconds(value: object, name: str) -> float:
    """A timeout option, in seconds: finite, positive, at most an hour (else ConfigError)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"memcached {name} must be a number of seconds, got {value!r}")
    if not math.isfinite(value) or not 0 < value <= 3600:
        raise ConfigError(f"memcached {name} must be in (0, 3600] seconds, got {value!r}")
    return float(value)


def native_column(spec: TableSpec) -> Column | None:
    """The column when the table has only one and it is INT(8): its rows are native counters.

    INT(8) spans memcached's whole 64-bit counter space, so its edge is practically out of
    reach; smaller INT columns would have to undo an overflowing native step after the fact,
    where concurrent clients could see it, so they use gets/cas like every other table.
    """
    cols = spec.schema.columns
    if len(cols) == 1 and cols[0].type is ColumnType.INT and cols[0].size == 8:
        return cols[0]
    return None


def expiry(spec: TableSpec) -> int:
    """The memcached exptime of a write to ``spec`` (0: never; absolute beyond 30 days).

    memcached's clock ticks in whole seconds, so an exptime of ``ttl`` lets a row vanish up to a
    second early; one more second makes it live at least ``ttl`` (at most ``ttl + 1``), like the
    other backends' "expires after ttl".
    """
    if spec.mode != "ttl" or not spec.ttl:
        return 0
    ttl = spec.ttl + 1
    return ttl if ttl <= _RELATIVE_TTL_MAX else int(time.time()) + ttl


def added(col: Column, old: Any, step: int | float, table: str, allow_nan: bool) -> Any:
    """``old + step`` for the column, or the table's overflow / non-finite error."""
    if col.type is ColumnType.INT:
        new = old + step
        lo, hi = col.int_range
        if not lo <= new <= hi:
            raise IntegerOverflowError(
                f"incr of column {col.name!r} of table {table!r} by {step} would leave "
                f"[{lo}, {hi}] (INT({col.size})); the value stays {old}"
            )
        return new
    result = float(old) + float(step)
    if not allow_nan and not math.isfinite(result):
        raise NonFiniteFloatError(
            f"incr of column {col.name!r} of table {table!r} by {step!r} overflows to a "
            f"non-finite value; the value stays {old!r}"
        )
    return result


async def gather_all(coros: Iterable[Awaitable[R]]) -> list[R]:
    """Await every coroutine, then raise the first failure: none is left running unseen."""
    results = await asyncio.gather(*coros, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r
    return results  # type: ignore[return-value]
