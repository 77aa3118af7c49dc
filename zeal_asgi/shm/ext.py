"""The public ``Table`` and ``Atomic``: the compiled core, on a segment opened by ``segments``.

This is the only import of the compiled extension.  There is no pure-Python fallback: a missing
or broken build fails here, loudly, with the command that rebuilds it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from zeal_asgi.errors import ColumnTypeError, IntegerOverflowError
from zeal_asgi.shm import segments
from zeal_asgi.shm.schema import Schema

try:
    from zeal_asgi.shm import _shmtable
except ImportError as exc:  # pragma: no cover - exercised by a broken install only
    raise ImportError(
        "zeal_asgi's compiled extension zeal_asgi.shm._shmtable is missing or broken "
        f"({exc}). Reinstall from source so it is compiled: pip install -e . "
        "(needs a C compiler and the Python headers; Cython is fetched at build time)"
    ) from exc

incr_bounded = _shmtable.incr_bounded
"""``incr_bounded(table, key, column, by, bound, floor=None, reset=None) -> (value, applied)``:
add ``by`` to a numeric column only when the result stays ``<= bound`` (after replacing a value
below ``floor`` by ``reset``, or by ``floor``), in one locked step; a missing row counts as zero
and is created only when the add applies."""

Cells = _shmtable.Cells
"""``Cells(table, keys, bounds=None, monotonic=False)``: the FLOAT columns of a few rows of a
table (one without a ttl), located once and then updated in place with lock-free atomics (the
metrics' series)."""

Tally = _shmtable.Tally
"""``Tally(table, key, column)``: an 8-byte INT column of one row (of a table without a ttl),
located once and then added to with one lock-free atomic (``add()``): a hot counter."""

FieldMemo = _shmtable.FieldMemo
"""``FieldMemo(table, key, column, want, until, make, tally=None)``: ``get(miss)`` returns
``make()`` (counted in ``tally``) while the row of ``key`` still holds exactly ``want`` in that
BYTES column, before ``until`` (checked in place, copying only the row's head and that much
of the column, not the whole row), else ``miss``."""


class Table(_shmtable.Table):
    """A fixed-schema hash table in shared memory, shared by every worker of one server.

    Build tables with ``Store.make(name, max_rows, columns)`` (or ``Table(max_rows, columns,
    name=...)``) before workers start.  Every method is synchronous and takes nanoseconds to
    microseconds; one ``set`` is atomic (readers see the old or the new row), ``incr``/``decr``/
    ``compare_and_set`` are atomic across processes, and no input is ever truncated or wrapped.
    With ``ttl`` (seconds), a row expires ``ttl`` seconds after its last write: reads miss it,
    and a write to it starts a new row.

    Example::

        t = Store.make("users", 1024, {"name": (Store.TYPE_STRING, 32), "n": (Store.TYPE_INT, 4)})
        t.set("u1", {"name": "alice", "n": 100})
        t.incr("u1", "n")              # 101
        t.get("u1")                    # {'name': 'alice', 'n': 101}
    """

    __slots__ = ("created", "path", "schema")
    path: Any
    """The segment under the shared-memory directory (a str); ``None`` for a memfd segment."""
    schema: Schema
    created: bool
    """True when this process created the segment (False: attached to a sibling's)."""

    def __init__(
        self,
        max_rows: int,
        columns: Mapping[str, Any],
        *,
        name: str | None = None,
        key_size: int = 64,
        lock_timeout: float = 1.0,
        allow_nan: bool = False,
        binary_keys: bool = False,
        ttl: float | None = None,
    ) -> None:
        self.schema = Schema.declare(
            columns, key_size=key_size, allow_nan=allow_nan, binary_keys=binary_keys, ttl=ttl
        )
        self._bind(self.schema, segments.display_name(name, "table"), lock_timeout)
        self.path, self.created = segments.open_table(self, name, max_rows, self.schema)


class Atomic(_shmtable.Atomic):
    """A lock-free signed 64-bit integer in shared memory, shared by every worker.

    ``increment``/``decrement``/``compare_and_set`` are single atomic instructions (a CAS loop
    that checks overflow first): a worker killed at any point never leaves it half-updated, and
    overflow raises IntegerOverflowError with the value unchanged.  Build it before workers
    start (``Counter(0, name=...)`` does) so every worker attaches to the same integer.
    """

    __slots__ = ("created", "path")
    path: Any
    """The segment under the shared-memory directory (a str); ``None`` for a memfd segment."""
    created: bool

    def __init__(self, initial: int = 0, *, name: str | None = None) -> None:
        self._bind(segments.display_name(name, "atomic"))
        if not isinstance(initial, int) or isinstance(initial, bool):
            raise ColumnTypeError(f"atomic {name!r}: initial must be an int, got {initial!r}")
        if not -(2**63) <= initial < 2**63:
            raise IntegerOverflowError(
                f"atomic {name!r}: initial {initial} is outside the signed 64-bit range"
            )
        self.path, self.created = segments.open_atomic(self, name, initial)
