"""Where series live: one shared table per registry, a row of eight FLOAT cells per series.

A row's key is the JSON list ``[metric, part, *label values]``.  ``part`` is the row's index
for a metric's own rows (a histogram takes ``ceil((buckets + 1) / 8)``), ``"<pid>:<start>"`` for
one process's share of a per-worker gauge, ``"retired"`` for the shares of dead processes a
``sum`` gauge keeps.  Rows are written only through :class:`~zeal_asgi.shm.ext.Cells` (atomics
on the cells, no lock) and deleted only when they are a dead process's share, which no live
process holds.  A scrape reads every row once and hands each metric declared in this process
the rows of its series.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, NamedTuple, TypeVar

from zeal_asgi.errors import MetricError, ZealError
from zeal_asgi.settings import ZealSettings
from zeal_asgi.shm.ext import Cells, Table
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.process import process_alive, process_start_time

if TYPE_CHECKING:
    from zeal_asgi.metrics.kinds import Metric

log = logging.getLogger("zeal_asgi.metrics")

ROW_CELLS = 8
KEY_SIZE = 256
"""Bytes of a row key: the metric name and label values, JSON-encoded."""
_C = TypeVar("_C", bound=Cells)
DROPPED = "metrics_dropped_series"
"""Host counter of series refused because the registry was full (``zeal_..._total``): each
process counts a series once, however often it is used."""
REFUSALS_KEPT = 1024
"""Refused series a metric remembers per process (see :class:`Refusals`)."""

Labels = tuple[tuple[str, str], ...]
Rows = dict[Labels, dict[int | str, "list[float] | Cells"]]
"""One metric's rows read by a scrape: labels -> part -> its cells (read when indexed)."""


class Sample(NamedTuple):
    """One exposition line: its full name, labels and value."""

    name: str
    labels: Labels
    value: float


class Family(NamedTuple):
    """A metric as exposed: ``name`` without a counter's ``_total``; ``type`` is ``counter``,
    ``gauge``, ``histogram`` or ``summary``."""

    name: str
    type: str
    help: str
    samples: list[Sample]


class Worker(NamedTuple):
    """This process, as its per-worker gauge shares name it: pid and start time (a reused pid
    is another process)."""

    pid: int
    start: int

    @property
    def part(self) -> str:
        """The ``part`` of this process's share rows."""
        return f"{self.pid}:{self.start}"


_worker: Worker | None = None


def worker() -> Worker:
    """This process (a new object after a fork, so cached shares are re-resolved)."""
    global _worker
    if _worker is None:
        _worker = Worker(os.getpid(), process_start_time(os.getpid()) or 0)
    return _worker


def _after_fork() -> None:
    global _worker
    _worker = None


os.register_at_fork(after_in_child=_after_fork)


def alive(part: str, seen: dict[str, bool]) -> bool:
    """Is the process of a share row alive (memoised in ``seen`` for one scrape)?"""
    if part not in seen:
        pid, _, start = part.partition(":")
        seen[part] = process_alive(int(pid), int(start) or None)
    return seen[part]


class Registry:
    """A set of metrics and the shared table their series live in, ``max_series`` rows.

    Every process of the server that declares a registry of the same ``name`` uses the same
    memory; declare registries and metrics at import, before workers start.  Past
    ``max_series`` rows, new series are dropped: their children do nothing, each dropped series
    is counted once per process in ``zeal_metrics_dropped_series_total`` and the first is logged;
    nothing raises.  A dropped series is created once rows are freed.
    """

    def __init__(self, max_series: int | None = None, *, name: str = "__zeal_metrics__") -> None:
        if max_series is None:
            max_series = ZealSettings.from_env().metrics_max_series
        if isinstance(max_series, bool) or not isinstance(max_series, int) or max_series < 1:
            raise MetricError(f"max_series is a positive int, got {max_series!r}")
        self.max_series = max_series
        self.table = Table(
            max_series,
            {f"c{i}": ("float", 8) for i in range(ROW_CELLS)},
            name=name,
            key_size=KEY_SIZE,
            binary_keys=True,
        )
        self._metrics: dict[str, Metric] = {}
        self._samples: set[str] = set()
        self._keys: dict[bytes, tuple[str, int | str, Labels | None, Cells | None]] = {}
        self._lock = threading.Lock()
        self._warned = False
        self._pruned: Worker | None = None

    def register(self, metric: Metric, samples: Iterable[str]) -> None:
        """Add ``metric``, whose lines are named ``samples``; a name taken is a MetricError."""
        names = set(samples)
        with self._lock:
            if metric.name in self._metrics or names & self._samples:
                raise MetricError(f"metric {metric.name!r} is already declared in this registry")
            self._metrics[metric.name] = metric
            self._samples |= names
            self._keys = {}  # rows parsed before were not known as this metric's

    def key(self, name: str, part: int | str, values: Sequence[str]) -> bytes:
        """The row key of a series; MetricError past :data:`KEY_SIZE` bytes."""
        key = json.dumps([name, part, *values], ensure_ascii=False, separators=(",", ":"))
        raw = key.encode()
        if len(raw) > KEY_SIZE:
            raise MetricError(
                f"metric {name!r}: its name and label values take {len(raw)} bytes encoded; "
                f"the limit is {KEY_SIZE}"
            )
        return raw

    def cells(
        self,
        keys: list[bytes],
        bounds: Sequence[float] | None = None,
        monotonic: bool = False,
        cls: type[_C] = Cells,  # type: ignore[assignment]
    ) -> _C | None:
        """``cls`` cells of the rows ``keys`` (created zeroed), or ``None`` when the series is
        dropped (not counted here: :meth:`Refusals.cells` counts it once)."""
        try:
            if len(self.table) + len(keys) <= self.max_series or all(k in self.table for k in keys):
                return cls(self.table, keys, bounds, monotonic)
        except ZealError as exc:  # full meanwhile, or a row lock stuck: never the caller's problem
            log.debug("zeal_asgi.metrics: series %r not created: %s", keys[0], exc)
        return None

    def freed(self) -> int:
        """Rows ever deleted from the table, by any process of the host: once it changes, a
        series refused before may fit (-1 when the table cannot say)."""
        try:
            return int(self.table.stats()["deletes"])
        except ZealError:
            return -1

    def dropped(self) -> None:
        """Count a series refused (in ``zeal_metrics_dropped_series_total``); log the first."""
        host_stats().incr(DROPPED)
        if not self._warned:
            self._warned = True
            log.warning(
                "zeal_asgi.metrics: registry %r is full (max_series=%d rows): new series are "
                "dropped and counted in zeal_metrics_dropped_series_total",
                self.table.name,
                self.max_series,
            )
        return None

    def shared_by_worker(self) -> Worker:
        """This process, after a first look for dead processes' shares (once per process)."""
        me = worker()
        if self._pruned is not me:
            self._pruned = me
            self.collect()
        return me

    def rows(self) -> dict[str, Rows]:
        """Every row of a metric declared here, read once: metric -> labels -> part -> cells."""
        out: dict[str, Rows] = {}
        known, keys = self._keys, {}
        for raw in self.table:
            entry = known.get(raw)
            if entry is None:
                entry = self._parse(raw)
            keys[raw] = entry
            name, part, labels, cells = entry
            if labels is None:
                continue
            if cells is None:
                row = self.table.get(raw)
                if row is None:
                    continue
            out.setdefault(name, {}).setdefault(labels, {})[part] = (
                list(row.values()) if cells is None else cells
            )
        self._keys = keys  # only live rows' keys: nothing grows with worker restarts
        return out

    def _parse(self, raw: bytes) -> tuple[str, int | str, Labels | None, Cells | None]:
        """A row key's metric, part and labels (``None``: not a metric declared here, or not
        with these labels), and the cells of a metric's own row (never deleted: read directly,
        from the second scrape on without a lookup; a share row may go: it is read by key)."""
        name, part, *values = json.loads(raw)
        metric = self._metrics.get(name)
        if metric is None or len(values) != len(metric.labelnames):
            return name, part, None, None
        labels = tuple(zip(metric.labelnames, values, strict=True))
        return name, part, labels, Cells(self.table, [raw]) if isinstance(part, int) else None

    def collect(self) -> list[Family]:
        """Every metric of this registry declared in this process, host-wide, plus the count of
        dropped series."""
        rows = self.rows()
        seen: dict[str, bool] = {}
        families = [m.family(rows.get(m.name, {}), seen) for m in list(self._metrics.values())]
        dropped = float(host_stats().host().get(DROPPED, 0))
        total = Sample("zeal_metrics_dropped_series_total", (), dropped)
        help_ = "Series refused because a metrics registry of this host was full."
        families.append(Family("zeal_metrics_dropped_series", "counter", help_, [total]))
        return families


class Refusals:
    """The series of one metric this process was refused, each counted once.

    A refused series is remembered with :meth:`Registry.freed` as it was before the attempt:
    :meth:`still` answers from memory (no key encoded, nothing counted) until rows are freed or
    the table has room, and only then is the series tried again, counted again only if it was
    forgotten.  Memory is bounded under unbounded label values: past :data:`REFUSALS_KEPT`
    series the oldest is forgotten (a forgotten series used again costs one more attempt and
    counts once more), so a metric keeps at most ~1,024 label tuples of at most
    :data:`KEY_SIZE` bytes.  A forked child starts with nothing remembered: it counts for itself
    (and a per-worker gauge share is a row of its own).
    """

    __slots__ = ("_lock", "_marks", "_owner", "_rows", "registry")

    def __init__(self, registry: Registry) -> None:
        self.registry = registry
        self._marks: dict[tuple[str, ...], int] = {}
        self._owner: Worker | None = None
        self._rows = 1  # rows of a series of this metric: the same for every series
        self._lock = threading.Lock()

    def still(self, values: tuple[str, ...]) -> bool:
        """Was the series of ``values`` refused in this process, with no row freed since?"""
        mark = self._marks.get(values)
        if mark is None or self._owner is not worker():
            return False
        reg = self.registry
        try:  # tried again when the table has room now, or rows were freed since
            return len(reg.table) + self._rows > reg.max_series and reg.freed() == mark
        except ZealError:  # the table closed in this process: nothing to try again
            return True

    def cells(
        self,
        values: tuple[str, ...],
        keys: list[bytes],
        bounds: Sequence[float] | None = None,
        monotonic: bool = False,
        cls: type[_C] = Cells,  # type: ignore[assignment]
    ) -> _C | None:
        """:meth:`Registry.cells` of the series of ``values``; a refusal is remembered and
        counted, unless this process already counted this series."""
        mark = self.registry.freed()  # before the attempt: a row freed during it is a change
        made = self.registry.cells(keys, bounds, monotonic, cls)
        me = worker()
        with self._lock:
            if self._owner is not me:
                self._owner, self._marks = me, {}
            if made is not None:
                self._marks.pop(values, None)
                return made
            new = values not in self._marks
            if new and len(self._marks) >= REFUSALS_KEPT:
                del self._marks[next(iter(self._marks))]  # the oldest (insertion order)
            self._marks[values] = mark
            self._rows = len(keys)
        if new:
            self.registry.dropped()
        return None


_default: Registry | None = None
_default_lock = threading.Lock()


def default_registry() -> Registry:
    """The registry metrics use unless given one (made on first use, ``ZEAL_METRICS_MAX_SERIES``
    rows)."""
    global _default
    with _default_lock:
        if _default is None:
            _default = Registry()
        return _default
