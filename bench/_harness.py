"""Timing, process, server and reporting helpers shared by every benchmark suite.

Servers (redis-server, memcached, the app under ``zeal-asgi run``) are the test harness's
(``tests/_harness``): one way to start, wait for and stop them, for tests and benchmarks alike.

A suite builds :data:`Loop` callables (``loop(n)`` runs one operation ``n`` times), times them
with :func:`measure` (single process) or :func:`measure_concurrent` (forked processes hammering
the same state), collects :class:`Result` rows and returns a :class:`SuiteReport`, which
``python -m bench`` prints, saves as JSON and writes into ``docs/benchmarks.md``.

Method, kept identical to ``perf-anchors.md`` so numbers stay comparable with it: tight
``for _ in itertools.repeat(None, n)`` loops over bound methods (or the inline idiom a user
would write), timed with ``time.perf_counter``, a warm-up, then the median of the reps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import importlib
import importlib.metadata
import itertools
import json
import multiprocessing
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator, Sequence
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypedDict

from tests._harness.servers import RedisServer

__all__ = [
    "DASH",
    "TIMES",
    "Concurrent",
    "ConcurrentTiming",
    "Config",
    "CpuWatch",
    "Loop",
    "NotInstalled",
    "Result",
    "RowId",
    "SuiteReport",
    "Timing",
    "calibrate",
    "call0",
    "call1",
    "call2",
    "dist_version",
    "fmt_iters",
    "fmt_ns",
    "fmt_ops",
    "fmt_ratio",
    "log",
    "machine_info",
    "machine_markdown",
    "machine_summary",
    "markdown_table",
    "measure",
    "measure_concurrent",
    "need",
    "now_utc",
    "others_cpu_share",
    "redis_server",
    "redis_server_version",
    "shm_tempdir",
    "source_revision",
    "wait_quiet",
    "write_docs_section",
    "write_json",
]

# Escaped so the sources stay ASCII (ruff flags the multiplication sign as ambiguous).
TIMES = "\u00d7"
DASH = "\u2014"

BUSY = 0.25
"""Rows measured while other processes used more than this share of the CPUs get flagged."""

Loop = Callable[[int], None]
"""Runs one operation ``n`` times: ``loop(n)``."""


def log(msg: str) -> None:
    """Progress line on stderr, so stdout carries only the markdown report."""
    print(msg, file=sys.stderr, flush=True)


# -- configuration -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Config:
    """How long and how often to measure."""

    quick: bool = False
    reps: int = 5
    rep_seconds: float = 0.4
    """Target duration of one rep; the iteration count is calibrated to it."""
    calib_seconds: float = 0.03
    """Minimum duration of the calibration run, which is also the warm-up."""
    min_iters: int = 2_000
    max_iters: int = 5_000_000
    procs: int = 2
    """Processes of the concurrent measurements."""
    wait_quiet: float = 0.0
    """Before each measurement, wait up to this many seconds for other processes to leave the
    CPUs alone (0: don't wait); for shared machines where tests run next to the benchmark."""
    conc_rep_seconds: float = 0.4
    """Target duration of one concurrent rep: long against the fork/start skew of ~1 ms, or
    the processes would mostly run one after the other."""

    @classmethod
    def full(cls) -> Config:
        """The configuration of a publishable run."""
        return cls()

    @classmethod
    def smoke(cls) -> Config:
        """A few seconds per suite: checks that everything runs, numbers are indicative."""
        return cls(
            quick=True,
            reps=3,
            rep_seconds=0.01,
            calib_seconds=0.002,
            min_iters=50,
            max_iters=100_000,
            conc_rep_seconds=0.05,
        )

    def iters_for(self, ns_per_op: float) -> int:
        """Iterations for one rep of an op that takes ``ns_per_op``."""
        n = self.rep_seconds * 1e9 / max(ns_per_op, 1.0)
        return _round2(min(self.max_iters, max(self.min_iters, int(n))))

    def conc_iters_for(self, ns_per_op: float) -> int:
        """Iterations per process for one concurrent rep of an op that takes ``ns_per_op``
        in one process (assuming the processes together go about as fast as one)."""
        n = self.conc_rep_seconds * 1e9 / max(ns_per_op, 1.0) / self.procs
        return _round2(min(5_000_000, max(self.min_iters // self.procs, int(n), 1)))


def _round2(n: int) -> int:
    """Two significant digits, so the ``iters`` column stays readable."""
    if n < 100:
        return max(1, n)
    scale: int = 10 ** (len(str(n)) - 2)
    return n // scale * scale


# -- loops -------------------------------------------------------------------------------------


def call0(fn: Callable[[], object]) -> Loop:
    """Loop calling the bound method ``fn()``."""

    def loop(n: int) -> None:
        f = fn  # a local is cheaper than a closure cell inside the hot loop
        for _ in itertools.repeat(None, n):
            f()

    return loop


def call1(fn: Callable[[Any], object], a: Any) -> Loop:
    """Loop calling the bound method ``fn(a)``."""

    def loop(n: int) -> None:
        f, x = fn, a
        for _ in itertools.repeat(None, n):
            f(x)

    return loop


def call2(fn: Callable[[Any, Any], object], a: Any, b: Any) -> Loop:
    """Loop calling the bound method ``fn(a, b)``."""

    def loop(n: int) -> None:
        f, x, y = fn, a, b
        for _ in itertools.repeat(None, n):
            f(x, y)

    return loop


# -- single-process timing ---------------------------------------------------------------------


@dataclasses.dataclass
class Timing:
    """Reps of one single-process measurement."""

    iters: int
    reps_ns: list[float]
    """ns per operation of each rep."""
    background: float | None = None
    """Share of all CPUs that other processes used while the reps ran."""

    @property
    def ns_per_op(self) -> float:
        """Median ns per operation."""
        return statistics.median(self.reps_ns)

    @property
    def ops_per_s(self) -> float:
        """Operations per second at the median."""
        return 1e9 / self.ns_per_op


def _time_once(loop: Loop, n: int) -> float:
    t0 = time.perf_counter()
    loop(n)
    return time.perf_counter() - t0


def calibrate(loop: Loop, cfg: Config) -> float:
    """Run ``loop`` for at least ``cfg.calib_seconds`` (the warm-up); returns ns per op."""
    n = 10
    while True:
        dt = _time_once(loop, n)
        if dt >= cfg.calib_seconds or n >= cfg.max_iters:
            return dt * 1e9 / n
        # grow towards the calibration time without overshooting it by much
        n = min(cfg.max_iters, n * 10 if dt < cfg.calib_seconds / 20 else n * 2)


def others_cpu_share(sample: float = 0.25) -> float:
    """Share of all CPUs used by other processes during the next ``sample`` seconds."""
    hz, ncpu = os.sysconf("SC_CLK_TCK"), os.cpu_count() or 1
    busy0, _ = _cpu_ticks()
    own0 = CpuWatch._own()
    time.sleep(sample)
    busy1, _ = _cpu_ticks()
    others = (busy1 - busy0) / hz - (CpuWatch._own() - own0)
    return min(1.0, max(0.0, others) / (sample * ncpu))


def wait_quiet(max_wait: float, threshold: float = 0.1) -> None:
    """Wait up to ``max_wait`` seconds until other processes use under ``threshold`` of the
    CPUs (logs when it had to wait, and when it gave up)."""
    if max_wait <= 0:
        return
    t0 = time.monotonic()
    share = others_cpu_share()
    while share >= threshold:
        waited = time.monotonic() - t0
        if waited >= max_wait:
            log(f"  machine still busy ({share:.0%} of the CPUs) after {waited:.0f} s: measuring")
            return
        share = others_cpu_share(0.5)
    if time.monotonic() - t0 > 1:
        log(f"  waited {time.monotonic() - t0:.0f} s for other processes to calm down")


def _disturbed(background: float | None) -> bool:
    return background is not None and background > BUSY


def measure(loop: Loop, cfg: Config) -> Timing:
    """Warm up/calibrate, then time ``cfg.reps`` reps of ``loop``; median in the result.

    With ``cfg.wait_quiet``, a measurement disturbed by other processes is repeated (twice at
    most) and the least disturbed one kept.
    """
    best: Timing | None = None
    for _ in range(3 if cfg.wait_quiet > 0 else 1):
        wait_quiet(cfg.wait_quiet)
        n = cfg.iters_for(calibrate(loop, cfg))
        watch = CpuWatch.start()
        reps = [_time_once(loop, n) * 1e9 / n for _ in range(cfg.reps)]
        t = Timing(n, reps, watch.stop()["other_processes"])
        if best is None or (t.background or 0.0) < (best.background or 0.0):
            best = t
        if not _disturbed(best.background):
            break
        log(f"  other processes used {t.background:.0%} of the CPUs meanwhile: measuring again")
    assert best is not None
    return best


# -- concurrent timing -------------------------------------------------------------------------


@dataclasses.dataclass
class Concurrent:
    """How to run an operation from several forked processes at once."""

    make_loop: Callable[[], Loop]
    """Called in each child after the fork (open connections, attach by name, ...)."""
    read: Callable[[], int] | None
    """Reads the shared counter in the parent; ``None`` when the state is not shared."""
    prepare: Callable[[], None] | None = None
    """Runs in the parent before the first fork (e.g. closes a handle that must not cross a
    fork, as an LMDB environment)."""


@dataclasses.dataclass
class ConcurrentTiming:
    """Reps of one concurrent measurement."""

    procs: int
    iters_per_proc: int
    reps_ops: list[float]
    """Total operations per second of each rep (all processes, first start to last finish)."""
    lost: list[int] | None
    """Per rep: expected minus observed increments; ``None`` when the state is not shared."""
    overlap: list[float]
    """Per rep: the share of the wall time during which all processes were running."""
    start_skew: list[float]
    """Per rep: the share of the wall time between the first and the last start."""
    background: float | None = None
    """Share of all CPUs that other processes used while the reps ran."""

    @property
    def ops_per_s(self) -> float:
        """Median total operations per second."""
        return statistics.median(self.reps_ops)

    @property
    def expected(self) -> int:
        """Increments per rep."""
        return self.procs * self.iters_per_proc

    @property
    def exact(self) -> bool | None:
        """True when no rep lost (or invented) an increment."""
        return None if self.lost is None else all(x == 0 for x in self.lost)

    def correctness(self) -> str:
        """``exact (5/5 reps)``, ``LOST up to ...`` or ``n/a (not shared)``, plus a warning
        when the processes mostly ran one after the other (then it is not a contention test)."""
        warn = ""
        if self.median_overlap < 0.8:
            skew = statistics.median(self.start_skew)
            if skew < 0.1:
                # they started together: an unfair lock let one process finish early
                warn = f"; one process finished after {self.median_overlap:.0%} of the wall time"
            else:
                warn = f"; processes ran together only {self.median_overlap:.0%} of the time"
        return self._count() + warn

    @property
    def median_overlap(self) -> float:
        """Median share of the wall time during which all processes were running."""
        return statistics.median(self.overlap) if self.overlap else 1.0

    def _count(self) -> str:
        if self.lost is None:
            return "n/a (not shared)"
        reps = len(self.lost)
        if self.exact:
            return f"exact ({reps}/{reps} reps)"
        ok = sum(1 for x in self.lost if x == 0)
        worst = max(self.lost, key=abs)
        if worst < 0:
            return f"**WRONG**: {-worst:,} increments too many; exact {ok}/{reps}"
        pct = 100.0 * worst / self.expected
        return f"**LOST** up to {worst:,} of {self.expected:,} ({pct:.1f}%); exact {ok}/{reps}"


def _child(
    make_loop: Callable[[], Loop],
    n: int,
    barrier: Any,
    conn: Connection,
) -> None:
    try:
        loop = make_loop()
        barrier.wait(60)
        t0 = time.perf_counter()
        loop(n)
        t1 = time.perf_counter()
        conn.send(("ok", t0, t1))
    except BaseException:
        barrier.abort()  # the parent and the sibling stop waiting at once
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def measure_concurrent(conc: Concurrent, n_each: int, cfg: Config) -> ConcurrentTiming:
    """Fork ``cfg.procs`` processes that each run the op ``n_each`` times, released together.

    Total ops/s = all operations / wall time from the first start to the last finish
    (``perf_counter`` is CLOCK_MONOTONIC, comparable across processes).  The counter is read
    before and after each rep to check that every increment landed.  With ``cfg.wait_quiet``,
    a disturbed measurement is repeated like in :func:`measure`; a lost increment is never
    discarded that way (an inexact attempt always wins).
    """
    if conc.prepare is not None:
        conc.prepare()
    best: ConcurrentTiming | None = None
    for _ in range(3 if cfg.wait_quiet > 0 else 1):
        wait_quiet(cfg.wait_quiet)
        t = _measure_concurrent_once(conc, n_each, cfg)
        if t.exact is False:
            return t
        if best is None or (t.background or 0.0) < (best.background or 0.0):
            best = t
        if not _disturbed(best.background):
            break
        log(f"  other processes used {t.background:.0%} of the CPUs meanwhile: measuring again")
    assert best is not None
    return best


def _measure_concurrent_once(conc: Concurrent, n_each: int, cfg: Config) -> ConcurrentTiming:
    ctx = multiprocessing.get_context("fork")
    reps: list[float] = []
    overlap: list[float] = []
    skew: list[float] = []
    lost: list[int] | None = [] if conc.read is not None else None
    watch = CpuWatch.start()
    for _ in range(cfg.reps):
        before = conc.read() if conc.read is not None else 0
        barrier = ctx.Barrier(cfg.procs + 1)
        conns: list[Connection] = []
        procs = []
        for _ in range(cfg.procs):
            parent_end, child_end = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(conc.make_loop, n_each, barrier, child_end))
            p.start()
            child_end.close()
            conns.append(parent_end)
            procs.append(p)
        try:
            with contextlib.suppress(Exception):
                barrier.wait(60)  # a broken barrier shows up as an error message below
            spans: list[tuple[float, float]] = []
            errors: list[str] = []
            for c in conns:
                if not c.poll(600):
                    errors.append("child timed out")
                    continue
                try:
                    msg = c.recv()
                except EOFError:
                    errors.append("child died without reporting")
                    continue
                if msg[0] == "ok":
                    spans.append((msg[1], msg[2]))
                else:
                    errors.append(msg[1])
        finally:
            for p in procs:
                p.join(10)
                if p.is_alive():
                    p.kill()
                    p.join()
            for c in conns:
                c.close()
        if errors:
            for e in errors:
                log(e)
            last = [line for line in errors[0].splitlines() if line.strip()]
            raise RuntimeError(f"in a child: {last[-1] if last else 'unknown error'}")
        wall = max(e for _, e in spans) - min(s for s, _ in spans)
        both = min(e for _, e in spans) - max(s for s, _ in spans)
        reps.append(cfg.procs * n_each / wall)
        overlap.append(max(0.0, both) / wall)
        skew.append((max(s for s, _ in spans) - min(s for s, _ in spans)) / wall)
        if conc.read is not None and lost is not None:
            lost.append(cfg.procs * n_each - (conc.read() - before))
    background = watch.stop()["other_processes"]
    return ConcurrentTiming(cfg.procs, n_each, reps, lost, overlap, skew, background)


# -- results -----------------------------------------------------------------------------------


class NotInstalled(Exception):
    """A peer package or server is missing: its rows say "not installed"."""


def need(module: str, dist: str | None = None) -> Any:
    """Import an optional peer module, typed ``Any`` (most peers ship no type hints)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise NotInstalled(f"not installed ({dist or module})") from None


class RowId(TypedDict):
    """What identifies a row of a suite; the rest of :class:`Result` is measured."""

    suite: str
    op: str
    candidate_id: str
    candidate: str
    mode: str


@dataclasses.dataclass
class Result:
    """One row of a suite: one operation of one candidate in one mode."""

    suite: str
    op: str
    candidate_id: str
    candidate: str
    mode: str
    ops_per_s: float | None = None
    ns_per_op: float | None = None
    iters: int | None = None
    """Iterations per rep (per process for concurrent rows)."""
    procs: int = 1
    reps_ops: list[float] = dataclasses.field(default_factory=list)
    correctness: str | None = None
    exact: bool | None = None
    overlap: float | None = None
    """Concurrent rows: median share of the wall time during which all processes ran."""
    background: float | None = None
    """Share of all CPUs that other processes used during this row's reps."""
    status: str = "ok"
    """``ok``, ``not installed (...)`` or ``failed: ...``."""

    @classmethod
    def from_timing(cls, base: RowId, t: Timing) -> Result:
        """Row of a single-process measurement."""
        return cls(
            **base,
            ops_per_s=t.ops_per_s,
            ns_per_op=t.ns_per_op,
            iters=t.iters,
            reps_ops=[1e9 / x for x in t.reps_ns],
            background=t.background,
        )

    @classmethod
    def from_concurrent(cls, base: RowId, t: ConcurrentTiming) -> Result:
        """Row of a concurrent measurement (ns/op is wall time per operation of all procs)."""
        return cls(
            **base,
            ops_per_s=t.ops_per_s,
            ns_per_op=1e9 / t.ops_per_s,
            iters=t.iters_per_proc,
            procs=t.procs,
            reps_ops=t.reps_ops,
            correctness=t.correctness(),
            exact=t.exact,
            overlap=t.median_overlap,
            background=t.background,
        )


def fmt_ops(x: float | None) -> str:
    """``41.05 M``, ``318.4 k``, ``950``."""
    if x is None:
        return DASH
    if x >= 1e6:
        return f"{x / 1e6:.2f} M"
    if x >= 1e3:
        return f"{x / 1e3:.1f} k"
    return f"{x:.0f}"


def fmt_ns(x: float | None) -> str:
    """``24.4``, ``1,183``."""
    if x is None:
        return DASH
    return f"{x:.1f}" if x < 100 else f"{x:,.0f}"


def fmt_ratio(r: float | None) -> str:
    """``0.16x``, ``2.35x``, ``31.4x``, ``1,234x`` (with the multiplication sign)."""
    if r is None:
        return DASH
    if r >= 100:
        return f"{r:,.0f}{TIMES}"
    if r >= 10:
        return f"{r:.1f}{TIMES}"
    return f"{r:.2f}{TIMES}"


def fmt_iters(n: int | None) -> str:
    """``200k``, ``1.2M``, ``2,000``."""
    if n is None:
        return DASH
    if n >= 1_000_000:
        return f"{n / 1e6:g}M"
    if n >= 10_000:
        return f"{n / 1e3:g}k"
    return f"{n:,}"


def markdown_table(rows: Sequence[Result], refs: Sequence[tuple[str, float | None]]) -> str:
    """Markdown table of ``rows``; one ratio column per ``(label, reference ops/s)``.

    A ratio is the reference's ops/s divided by the row's: how many times faster the
    reference (zeal) is than that row.
    """
    concurrent = any(r.procs > 1 for r in rows)
    head = ["Candidate", "Mode / idiom", "ops/s", "ns/op"]
    head += [label for label, _ in refs]
    if concurrent:
        head += ["reps min\u2013max", "Correctness"]
    head.append("iters" + (" per proc" if concurrent else ""))
    align = ["---", "---", "---:", "---:"] + ["---:"] * len(refs)
    align += (["---:", "---"] if concurrent else []) + ["---:"]
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    flagged = False
    for r in rows:
        if r.status != "ok":
            cells = [r.candidate, r.mode, r.status, DASH] + [DASH] * len(refs)
            cells += ([DASH, DASH] if concurrent else []) + [DASH]
        else:
            cells = [r.candidate, r.mode, fmt_ops(r.ops_per_s), fmt_ns(r.ns_per_op)]
            if r.background is not None and r.background > BUSY:
                cells[2] += " \u2020"
                flagged = True
            for _, ref in refs:
                ratio = ref / r.ops_per_s if ref and r.ops_per_s else None
                cells.append(fmt_ratio(ratio))
            if concurrent:
                # two-process rows can be bimodal on a VM (where the host puts the vCPUs):
                # the spread says so where a median alone would hide it
                spread = (
                    f"{fmt_ops(min(r.reps_ops))}\u2013{fmt_ops(max(r.reps_ops))}"
                    if r.reps_ops
                    else DASH
                )
                cells += [spread, r.correctness or DASH]
            cells.append(fmt_iters(r.iters))
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if flagged:
        lines.append(
            f"\n\u2020 other processes used more than {BUSY:.0%} of the CPUs while this row "
            "was measured: expect it to be slower than on an idle machine."
        )
    return "\n".join(lines)


@dataclasses.dataclass
class SuiteReport:
    """Everything one suite produced in one run."""

    name: str
    title: str
    date: str
    machine: dict[str, Any]
    config: Config
    results: list[Result]
    body: str
    """Markdown after the heading and machine block: result tables, targets, notes."""
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)
    """Suite-specific data for the JSON output (e.g. target checks)."""

    def markdown(self) -> str:
        """The suite's section of docs/benchmarks.md (and of the printed report)."""
        quick = (
            "\n\n**Quick smoke run (`--quick`): too short to be meaningful, do not publish.**"
            if self.config.quick
            else ""
        )
        return (
            f"## {self.title}\n\n"
            f"Measured {self.date} with `python -m bench {self.name}` on "
            f"{machine_summary(self.machine)}.{quick}\n\n"
            f"{machine_markdown(self.machine)}\n\n{self.body.strip()}\n"
        )

    def to_json(self) -> dict[str, Any]:
        """Raw results (every rep) for ``--json``."""
        return {
            "name": self.name,
            "title": self.title,
            "date": self.date,
            "machine": self.machine,
            "config": dataclasses.asdict(self.config),
            "results": [dataclasses.asdict(r) for r in self.results],
            **self.extra,
        }


# -- machine description -----------------------------------------------------------------------


def now_utc() -> str:
    """``2026-11-25 17:04 UTC``."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")


def _read(path: str) -> str:
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _cpuinfo_field(text: str, field: str) -> str | None:
    m = re.search(rf"^{re.escape(field)}\s*:\s*(.*)$", text, re.MULTILINE)
    return m.group(1).strip() if m else None


def dist_version(dist: str) -> str:
    """Installed version of a distribution, or ``not installed``."""
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def source_revision(repo: Path | None = None) -> str:
    """``git 93b5e60`` of the checkout being measured, with a note when it has uncommitted
    changes to the package or the extension (so a number can be traced to its code)."""
    root = repo or Path(__file__).resolve().parent.parent
    try:
        rev = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "zeal_asgi", "ext"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return f"git {rev}" + (" + uncommitted changes in zeal_asgi/ or ext/" if dirty else "")


def machine_info(
    packages: Sequence[str] = (), tools: dict[str, str] | None = None
) -> dict[str, Any]:
    """CPU model, cores, memory, kernel, OS, Python, and the versions of ``packages``."""
    cpuinfo = _read("/proc/cpuinfo")
    cpu = _cpuinfo_field(cpuinfo, "model name") or platform.processor() or "unknown"
    family, model = _cpuinfo_field(cpuinfo, "cpu family"), _cpuinfo_field(cpuinfo, "model")
    if family and model:
        cpu += f" (family {family}, model {model})"
    if "hypervisor" in (_cpuinfo_field(cpuinfo, "flags") or "").split():
        cpu += ", virtual machine"
    mem = re.search(r"^MemTotal:\s*(\d+) kB", _read("/proc/meminfo"), re.MULTILINE)
    osrel = re.search(r'^PRETTY_NAME="?([^"\n]*)', _read("/etc/os-release"), re.MULTILINE)
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": platform.release(),
        "os": osrel.group(1) if osrel else platform.platform(),
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "source": source_revision(),
        "packages": {p: dist_version(p) for p in packages},
        "tools": dict(tools or {}),
    }


def _cpu_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of all CPUs since boot, from /proc/stat."""
    try:
        first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    except OSError:
        return 0, 0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in first[1:9])
    return user + nice + system + irq + softirq, steal


def _live_descendants_cpu() -> float:
    """CPU seconds (with their reaped children) of our live descendant processes."""
    parent: dict[int, int] = {}
    ticks: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            raw = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        f = raw[raw.rindex(")") + 2 :].split()
        parent[int(entry.name)] = int(f[1])
        ticks[int(entry.name)] = int(f[11]) + int(f[12]) + int(f[13]) + int(f[14])
    me, total = os.getpid(), 0
    for pid in parent:
        p = parent.get(pid, 0)
        while p > 1 and p != me:
            p = parent.get(p, 0)
        if p == me and pid != me:
            total += ticks[pid]
    return total / os.sysconf("SC_CLK_TCK")


@dataclasses.dataclass
class CpuWatch:
    """How busy the machine was with *other* work while a suite ran: on a shared 2-core VM
    that, not the code, is the usual reason two runs disagree."""

    wall0: float
    busy0: int
    steal0: int
    own0: float

    @staticmethod
    def _own() -> float:
        # Ours includes every descendant: reaped ones through os.times(), live ones (the
        # Manager process, redis-server) through /proc, or their work would count as noise.
        t = os.times()
        return t.user + t.system + t.children_user + t.children_system + _live_descendants_cpu()

    @classmethod
    def start(cls) -> CpuWatch:
        """Start watching."""
        busy, steal = _cpu_ticks()
        return cls(time.monotonic(), busy, steal, cls._own())

    def stop(self) -> dict[str, float]:
        """Shares of the machine's CPU time (all cores) since :meth:`start`."""
        busy, steal = _cpu_ticks()
        hz = os.sysconf("SC_CLK_TCK")
        capacity = (time.monotonic() - self.wall0) * (os.cpu_count() or 1)
        others = (busy - self.busy0) / hz - (self._own() - self.own0)
        return {
            # clamped: tick granularity can overshoot on short windows
            "other_processes": round(min(1.0, max(0.0, others) / capacity), 3),
            "steal": round((steal - self.steal0) / hz / capacity, 3),
        }


def machine_summary(m: dict[str, Any]) -> str:
    """One line: ``AMD EPYC (...), 2 cores, Linux 6.18, CPython 3.11.7``."""
    return f"{m['cpu']}, {m['cores']} cores, Linux {m['kernel']}, {m['python']}"


def machine_markdown(m: dict[str, Any]) -> str:
    """Two-column markdown table of the machine and the package versions."""
    pkgs = ", ".join(f"{k} {v}" for k, v in m["packages"].items())
    tools = ", ".join(f"{k} {v}" for k, v in m["tools"].items())
    cores = f"{m['cores']}"
    if m["usable_cores"] != m["cores"]:
        cores += f" ({m['usable_cores']} usable by this process)"
    rows = [
        ("CPU", m["cpu"]),
        ("Cores", cores),
        ("Memory", f"{m['memory_gib']} GiB" if m["memory_gib"] else DASH),
        ("OS / kernel", f"{m['os']}, Linux {m['kernel']}"),
        ("Python", m["python"]),
        ("zeal_asgi source", m.get("source", DASH)),
        ("Packages", pkgs or DASH),
    ]
    if tools:
        rows.append(("Servers", tools))
    if "background" in m:
        bg = m["background"]
        text = (
            f"{bg['other_processes']:.0%} of all CPU time used by other processes over the "
            f"whole run, {bg['steal']:.0%} stolen by the hypervisor"
        )
        if "during_rows" in bg:
            text += (
                f"; while rows were measured: median {bg['during_rows']:.0%}, "
                f"max {bg['during_rows_max']:.0%}"
            )
        rows.append(("Other load", text))
    return "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


# -- resources ---------------------------------------------------------------------------------


@contextlib.contextmanager
def shm_tempdir(prefix: str = "zeal-bench-") -> Iterator[str]:
    """A temporary directory on tmpfs (``/dev/shm``), so file stores do no disk I/O;
    removed on exit."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") else None
    path = tempfile.mkdtemp(prefix=prefix, dir=base)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def redis_server_version(exe: str | None = None) -> str | None:
    """``7.0.15``, or ``None`` when redis-server is not on PATH."""
    exe = exe or shutil.which("redis-server")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"v=(\S+)", out)
    return m.group(1) if m else out.strip() or "unknown"


@contextlib.contextmanager
def redis_server() -> Iterator[RedisServer]:
    """A throw-away redis-server on a free loopback port (no persistence; the tests' harness
    starts it), stopped on exit.  Raises :class:`NotInstalled` when it is not on PATH."""
    if shutil.which("redis-server") is None:
        raise NotInstalled("not installed (redis-server)")
    with RedisServer() as server:
        yield server


# -- docs --------------------------------------------------------------------------------------

DOCS_HEADER = """# Benchmarks

Generated by `python -m bench --write-docs`; each section below is rewritten by its suite.
"""


def write_docs_section(path: Path, name: str, content: str) -> None:
    """Replace the text between ``<!-- bench:NAME -->`` and ``<!-- /bench:NAME -->`` in
    ``path`` (appending the section when it is not there yet); the rest is left alone."""
    begin, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{begin}\n{content.strip()}\n{end}"
    text = path.read_text() if path.exists() else DOCS_HEADER
    i, j = text.find(begin), text.find(end)
    if i >= 0 and j > i:
        text = text[:i] + block + text[j + len(end) :]
    else:
        text = text.rstrip("\n") + "\n\n" + block + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json(path: Path, reports: Sequence[SuiteReport]) -> None:
    """Save the raw results of a run (every rep of every row)."""
    data = {"date": now_utc(), "suites": {r.name: r.to_json() for r in reports}}
    path.write_text(json.dumps(data, indent=2) + "\n")
