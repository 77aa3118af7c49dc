"""``Counter``, ``Gauge``, ``Histogram`` and ``Summary``: declarations, children, and how each
turns the rows a scrape read into its samples."""

from __future__ import annotations

import contextlib
import functools
import inspect
import itertools
import math
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal, TypeVar

from zeal_asgi.errors import ColumnTypeError, MetricError, ZealError
from zeal_asgi.metrics.registry import (
    ROW_CELLS,
    Family,
    Labels,
    Refusals,
    Registry,
    Rows,
    Sample,
    Worker,
    alive,
    default_registry,
    log,
    worker,
)
from zeal_asgi.shm.ext import Cells

DEFAULT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
"""Prometheus' default histogram buckets (seconds); ``+Inf`` is always added."""
GaugeMode = Literal["livesum", "sum", "max", "min", "mostrecent"]
GAUGE_MODES = ("livesum", "sum", "max", "min", "mostrecent")

_NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
_LABEL = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_F = TypeVar("_F", bound=Callable[..., Any])
Parts = dict[int | str, list[float] | Cells]


class _Timer(contextlib.ContextDecorator):
    """A block or a function (sync or async): ``enter()`` before, ``leave(seconds)`` after."""

    def __init__(self, leave: Callable[[float], object], enter: Callable[[], object] = int) -> None:
        self._enter, self._leave = enter, leave
        self._starts = threading.local()

    def __enter__(self) -> _Timer:
        self._enter()
        self._starts.__dict__.setdefault("s", []).append(time.perf_counter())
        return self

    def __exit__(self, *exc: object) -> None:
        self._leave(time.perf_counter() - self._starts.s.pop())

    def __call__(self, fn: _F) -> _F:
        if not inspect.iscoroutinefunction(fn):
            return super().__call__(fn)

        @functools.wraps(fn)
        async def timed(*args: Any, **kwargs: Any) -> Any:
            with self:
                return await fn(*args, **kwargs)

        return timed  # type: ignore[return-value]


class _Dropped:
    """The child of a series a full registry refused: every call does nothing."""

    def inc(self, amount: float = 1) -> None:
        """Nothing."""

    dec = set = observe = set_to_current_time = inc

    def time(self) -> _Timer:
        """Nothing."""
        return _Timer(int)

    track_inprogress = time


_DROPPED = _Dropped()


def _negated(amount: float) -> float:
    try:
        return -amount
    except TypeError:
        raise ColumnTypeError(f"a metric step is a number, got {type(amount).__name__}") from None


class TimedChild(Cells):
    """A histogram's or a summary's series: ``observe(v)`` (no lock, one bucket and the sum
    updated atomically) and ``time()``."""

    __slots__ = ()

    def time(self) -> _Timer:
        """``with child.time():`` or ``@child.time()``: observe the duration in seconds."""
        return _Timer(self.observe)


class Metric:
    """What every metric has: a name, a help text, label names fixed at declaration, and its
    children (one per label values, made once and cached)."""

    kind: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]] = ("",)

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        registry: Registry | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise MetricError(
                f"invalid metric name {name!r} (Prometheus: [a-zA-Z_:][a-zA-Z0-9_:]*)"
            )
        if isinstance(labels, str):
            raise MetricError(f"metric {name!r}: labels is a sequence of names, not {labels!r}")
        self.labelnames = tuple(labels)
        reserved = "le" if self.kind == "histogram" else "quantile"
        for label in self.labelnames:
            if not isinstance(label, str) or not _LABEL.match(label) or label.startswith("__"):
                raise MetricError(f"metric {name!r}: invalid label name {label!r}")
            if label == reserved:
                raise MetricError(f"metric {name!r}: label {label!r} is reserved")
        if len(set(self.labelnames)) != len(self.labelnames):
            raise MetricError(f"metric {name!r}: label names repeat: {self.labelnames}")
        self.name = name.removesuffix("_total") if self.kind == "counter" else name
        self.documentation = documentation
        self.registry = registry if registry is not None else default_registry()
        self.registry.register(self, (self.name + s for s in self.suffixes))
        self._children: dict[tuple[str, ...], Any] = {}  # kept series only
        self.refused = Refusals(self.registry)
        self._lock = threading.Lock()
        self._default = None if self.labelnames else self.labels()

    def labels(self, *values: object, **by_name: object) -> Any:
        """The child of these label values (positional, or every one by name); a series the full
        registry refused is a child that does nothing (counted once, tried again only once rows
        are freed)."""
        if by_name:
            if values or set(by_name) != set(self.labelnames):
                raise MetricError(f"metric {self.name!r} takes the labels {self.labelnames}")
            values = tuple(by_name[n] for n in self.labelnames)
        key = tuple(map(str, values))
        child = self._children.get(key)
        if child is not None:
            return child
        if len(key) != len(self.labelnames):
            raise MetricError(
                f"metric {self.name!r} takes {len(self.labelnames)} label values "
                f"{self.labelnames}, got {len(key)}"
            )
        if self.refused.still(key):
            return _DROPPED
        with self._lock:
            child = self._children.get(key) or self._child(key)
            if child is not _DROPPED:
                self._children[key] = child
        return child

    def _only(self) -> Any:
        child = self._default
        if child is _DROPPED:  # refused at declaration: labels() tries again once rows are freed
            child = self._default = self.labels()
        elif child is None:
            raise MetricError(f"metric {self.name!r} has labels: use .labels(...) first")
        return child

    def _keys(self, values: tuple[str, ...], cells: int) -> list[bytes]:
        """Row keys of a series of ``cells`` cells (``ROW_CELLS`` a row)."""
        return [self.registry.key(self.name, i, values) for i in range(-(-cells // ROW_CELLS))]

    def _child(self, values: tuple[str, ...]) -> Any:
        raise NotImplementedError

    def family(self, rows: Rows, seen: dict[str, bool]) -> Family:
        """This metric's exposition, from the rows a scrape read (``seen``: liveness of the
        processes met so far)."""
        if not self.labelnames and () not in rows:
            rows = {(): {}}  # an unlabelled metric is always exposed, 0 until used
        samples: list[Sample] = []
        for labels, parts in rows.items():
            samples += self._samples(labels, parts, seen)
        return Family(self.name, self.kind, self.documentation, samples)

    def _samples(self, labels: Labels, parts: Parts, seen: dict[str, bool]) -> list[Sample]:
        raise NotImplementedError


class Counter(Metric):
    """A count that only goes up, every worker's increments in one series.

    ``Counter("jobs_total", "Jobs run", labels=("queue",)).labels("mail").inc()``: a cached
    child's ``inc()`` is one atomic instruction on shared memory.  A negative step raises
    MetricError; NaN or an infinity, NonFiniteFloatError.
    """

    kind = "counter"
    suffixes = ("_total",)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` (>= 0) to the unlabelled counter."""
        self._only().inc(amount)

    def _child(self, values: tuple[str, ...]) -> Cells | _Dropped:
        return self.refused.cells(values, self._keys(values, 1), monotonic=True) or _DROPPED

    def _samples(self, labels: Labels, parts: Parts, seen: dict[str, bool]) -> list[Sample]:
        return [Sample(self.name + "_total", labels, parts.get(0, [0.0])[0])]


class Histogram(Metric):
    """Observations counted in buckets (Prometheus' defaults unless ``buckets`` is given;
    ``+Inf`` is added) with their sum, every worker's in one series.  NaN and infinities raise
    NonFiniteFloatError."""

    kind = "histogram"
    suffixes: ClassVar[tuple[str, ...]] = ("_bucket", "_count", "_sum")

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        buckets: Sequence[float] = DEFAULT_BUCKETS,
        registry: Registry | None = None,
    ) -> None:
        try:
            bounds = [float(b) for b in buckets]
        except (TypeError, ValueError):
            raise MetricError(f"histogram {name!r}: buckets are numbers, got {buckets!r}") from None
        if not bounds or bounds[-1] != math.inf:
            bounds.append(math.inf)
        if math.isnan(bounds[0]) or any(not a < b for a, b in itertools.pairwise(bounds)):
            raise MetricError(f"histogram {name!r}: buckets must increase, got {buckets!r}")
        self.buckets = tuple(bounds)
        super().__init__(name, documentation, labels, registry=registry)

    def observe(self, value: float) -> None:
        """Count ``value`` in the unlabelled histogram."""
        self._only().observe(value)

    def time(self) -> _Timer:
        """``with h.time():`` or ``@h.time()``: observe the duration in seconds."""
        return _Timer(self.observe)

    def _child(self, values: tuple[str, ...]) -> TimedChild | _Dropped:
        keys = self._keys(values, len(self.buckets) + 1)
        return self.refused.cells(values, keys, self.buckets, cls=TimedChild) or _DROPPED

    def _samples(self, labels: Labels, parts: Parts, seen: dict[str, bool]) -> list[Sample]:
        n = len(self.buckets)
        rows = [parts.get(i, []) for i in range(-(-(n + 1) // ROW_CELLS))]
        cells = [row[j] for row in rows for j in range(len(row))]
        if len(cells) <= n:  # not all of its rows were created: the series was dropped
            return []
        out, total = [], 0.0
        for bound, count in zip(self.buckets, cells, strict=False):
            total += count
            le = "+Inf" if bound == math.inf else repr(bound)
            out.append(Sample(self.name + "_bucket", (*labels, ("le", le)), total))
        out.append(Sample(self.name + "_count", labels, total))
        out.append(Sample(self.name + "_sum", labels, cells[n]))
        return out


class Summary(Histogram):
    """The count and the sum of observations, every worker's in one series (no quantiles: they
    cannot be merged across workers honestly)."""

    kind = "summary"
    suffixes = ("_count", "_sum")

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        registry: Registry | None = None,
    ) -> None:
        super().__init__(name, documentation, labels, buckets=(), registry=registry)

    def _samples(self, labels: Labels, parts: Parts, seen: dict[str, bool]) -> list[Sample]:
        return super()._samples(labels, parts, seen)[1:]  # a histogram's, but its +Inf bucket


class GaugeChild:
    """One series of a gauge: ``inc``, ``dec`` and ``set`` act on this process's share (the
    ``mostrecent`` gauge: on the one shared value)."""

    __slots__ = ("_cells", "_gauge", "_owner", "_values")

    def __init__(self, gauge: Gauge, values: tuple[str, ...]) -> None:
        self._gauge, self._values = gauge, values
        self._cells: Cells | None = None  # None: not made yet in this process, or dropped
        self._owner: Worker | None = None

    def _share(self) -> Cells | _Dropped:
        if self._owner is not worker() or self._cells is None:  # first use, a fork, or dropped
            return self._make()
        return self._cells

    def _make(self) -> Cells | _Dropped:
        """This process's share (the ``mostrecent`` gauge: the shared value), made now unless
        the series was refused and no row was freed since."""
        g = self._gauge
        if g.refused.still(self._values):
            return _DROPPED
        if g.mode == "mostrecent":
            self._owner = worker()  # the same row in every process: a fork just attaches again
            keys = g._keys(self._values, 1)
        else:
            self._owner = g.registry.shared_by_worker()
            keys = [g.registry.key(g.name, self._owner.part, self._values)]
        self._cells = g.refused.cells(self._values, keys)
        if self._cells is None:
            # Not kept among the gauge's children: labels() answers from g.refused, so dropped
            # series take no memory past what it keeps.
            if g._children.get(self._values) is self:
                g._children.pop(self._values, None)
            return _DROPPED
        return self._cells

    def inc(self, amount: float = 1) -> None:
        """Add ``amount``."""
        self._share().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount``."""
        self._share().inc(_negated(amount))

    def set(self, value: float) -> None:
        """Set to ``value`` (finite)."""
        self._share().set(value)

    def set_to_current_time(self) -> None:
        """Set to the Unix time in seconds."""
        self.set(time.time())

    def track_inprogress(self) -> _Timer:
        """``with child.track_inprogress():`` or as a decorator: +1 while inside."""
        return _Timer(lambda s: self.dec(), self.inc)

    def time(self) -> _Timer:
        """``with child.time():`` or as a decorator: set to the duration in seconds."""
        return _Timer(self.set)


class Gauge(Metric):
    """A value that goes up and down; ``mode`` says how the workers' values make the series:

    - ``livesum`` (default): the sum over live workers; a dead worker's share disappears at the
      next scrape (in-flight requests, open connections);
    - ``sum``: the sum over every worker, dead ones' last values included;
    - ``max`` / ``min``: the largest / smallest value any worker (dead ones included) holds;
    - ``mostrecent``: one value shared by all workers; the last ``set`` wins.
    """

    kind = "gauge"

    def __init__(
        self,
        name: str,
        documentation: str,
        labels: Sequence[str] = (),
        *,
        mode: GaugeMode = "livesum",
        registry: Registry | None = None,
    ) -> None:
        if mode not in GAUGE_MODES:
            raise MetricError(f"gauge {name!r}: mode is one of {GAUGE_MODES}, got {mode!r}")
        self.mode = mode
        super().__init__(name, documentation, labels, registry=registry)

    def inc(self, amount: float = 1) -> None:
        """Add ``amount`` to the unlabelled gauge."""
        self._only().inc(amount)

    def dec(self, amount: float = 1) -> None:
        """Subtract ``amount`` from the unlabelled gauge."""
        self._only().dec(amount)

    def set(self, value: float) -> None:
        """Set the unlabelled gauge."""
        self._only().set(value)

    def set_to_current_time(self) -> None:
        """Set the unlabelled gauge to the Unix time."""
        self._only().set_to_current_time()

    def track_inprogress(self) -> _Timer:
        """+1 on the unlabelled gauge while inside a block or a function."""
        return self._only().track_inprogress()  # type: ignore[no-any-return]

    def time(self) -> _Timer:
        """Set the unlabelled gauge to the duration of a block or a function."""
        return self._only().time()  # type: ignore[no-any-return]

    def _child(self, values: tuple[str, ...]) -> GaugeChild:
        return GaugeChild(self, values)

    def _samples(self, labels: Labels, parts: Parts, seen: dict[str, bool]) -> list[Sample]:
        if self.mode == "mostrecent":
            return [Sample(self.name, labels, parts.get(0, [0.0])[0])]
        live: list[tuple[float, str]] = []
        dead: list[tuple[float, str]] = []
        for part, cells in parts.items():
            if isinstance(part, str) and part != "retired":
                (live if alive(part, seen) else dead).append((cells[0], part))
        pool = [v for v, _ in live] + ([] if self.mode == "livesum" else [v for v, _ in dead])
        if self.mode in ("livesum", "sum"):
            value = math.fsum(pool) + parts.get("retired", [0.0])[0]
        else:
            value = (max if self.mode == "max" else min)(pool, default=0.0)
        try:
            self._retire(tuple(v for _, v in labels), dead)
        except ZealError as exc:  # tidying up never fails a scrape
            log.debug("zeal_asgi.metrics: retiring dead shares of %r: %s", self.name, exc)
        return [Sample(self.name, labels, value)]

    def _retire(self, values: tuple[str, ...], dead: list[tuple[float, str]]) -> None:
        """Delete dead processes' shares: ``livesum`` drops them, ``sum`` adds them to its
        ``retired`` row first, ``max``/``min`` keep the one extreme share.  Only the scrape whose
        delete succeeds moves a share: never twice."""
        reg = self.registry
        if not dead:
            return
        if self.mode in ("max", "min"):
            dead.remove((max if self.mode == "max" else min)(dead))
        into = reg.cells([reg.key(self.name, "retired", values)]) if self.mode == "sum" else None
        if self.mode == "sum" and into is None:
            return  # no series dropped, so nothing counted: the dead shares stay until room
        for value, part in dead:
            if reg.table.delete(reg.key(self.name, part, values)) and into is not None:
                into.inc(value)
