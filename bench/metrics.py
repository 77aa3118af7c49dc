"""Suite ``metrics``: ``zeal_asgi.metrics`` against ``prometheus_client``, in one run.

Updates from Python in one process: a cached child's ``Counter.inc()`` and
``Histogram.observe()`` (and a ``livesum`` gauge's ``inc()``), zeal's (shared memory) against
``prometheus_client`` single-process (a float under a lock, this process only) and its
multiprocess mode (an mmap'd file per process, what it offers for workers).

Scrapes: 10,000 counter series that 2 live workers (forked processes) incremented, read and
rendered as text by a third process of the host (zeal: ``render(registry.collect())``;
multiprocess mode: ``MultiProcessCollector`` + ``generate_latest``); then after worker restarts,
each restart a process that incremented every series and died.  zeal's series are rows of one
table, so restarts add nothing; multiprocess mode keeps one file per process that ever lived
(``mark_process_dead`` removes only live-gauge files), so its scrape grows with restarts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing
import os
import statistics
import time
import traceback
import uuid
from collections.abc import Callable, Iterator, Sequence

from ._harness import (
    DASH,
    TIMES,
    Config,
    CpuWatch,
    Loop,
    NotInstalled,
    Result,
    RowId,
    SuiteReport,
    call0,
    call1,
    fmt_ns,
    fmt_ratio,
    log,
    machine_info,
    measure,
    need,
    now_utc,
    shm_tempdir,
)
from .store import Target, row_table, short_error, target_table

__all__ = ["NAME", "TITLE", "run"]

NAME = "metrics"
TITLE = "Metrics vs prometheus_client (single-process and multiprocess mode)"
PACKAGES = ("zeal-asgi", "prometheus-client")
SERIES = 10_000
RESTARTS = (0, 10, 25, 50, 100)
QUICK_RESTARTS = (0, 5)
LABELS = ("GET", "/items/{item_id}", "200")

_FORK = multiprocessing.get_context("fork")


# -- updates in one process --------------------------------------------------------------------


def _zeal_updates(stack: contextlib.ExitStack) -> dict[str, tuple[str, Loop]]:
    from zeal_asgi import metrics
    from zeal_asgi.shm.segments import destroy

    reg = metrics.Registry(100, name=f"bench-{uuid.uuid4().hex[:8]}")
    stack.callback(destroy, reg.table)
    c = metrics.Counter("requests_total", "x", ("method", "route", "status"), registry=reg)
    h = metrics.Histogram("latency_seconds", "x", ("route",), registry=reg)
    g = metrics.Gauge("in_flight", "x", registry=reg)
    return {
        "inc": ("c.labels(...) cached; child.inc()", call0(c.labels(*LABELS).inc)),
        "observe": ("h.labels(...) cached; child.observe(0.3)", call1(h.labels("/x").observe, 0.3)),
        "gauge": ("livesum gauge.inc()", call0(g.inc)),
    }


def _prometheus_updates(
    stack: contextlib.ExitStack, tmp: str | None
) -> dict[str, tuple[str, Loop]]:
    pc = need("prometheus_client", "prometheus-client")
    values = need("prometheus_client.values")
    if tmp is not None:  # multiprocess mode, as PROMETHEUS_MULTIPROC_DIR selects it at import
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp
        saved = values.ValueClass
        values.ValueClass = values.MultiProcessValue()
        stack.callback(setattr, values, "ValueClass", saved)
        stack.callback(values.close_all_multiprocess_files)  # its mmap'd files, before tmp goes
        stack.callback(os.environ.pop, "PROMETHEUS_MULTIPROC_DIR", None)
    reg = pc.CollectorRegistry()
    c = pc.Counter("requests_total", "x", ("method", "route", "status"), registry=reg)
    h = pc.Histogram("latency_seconds", "x", ("route",), registry=reg)
    mode = {"multiprocess_mode": "livesum"} if tmp is not None else {}
    g = pc.Gauge("in_flight", "x", registry=reg, **mode)
    return {
        "inc": ("c.labels(...) cached; child.inc()", call0(c.labels(*LABELS).inc)),
        "observe": ("h.labels(...) cached; child.observe(0.3)", call1(h.labels("/x").observe, 0.3)),
        "gauge": ("gauge.inc()" + (" (livesum)" if tmp else ""), call0(g.inc)),
    }


UPDATE_PEERS = (
    ("zeal", "zeal_asgi.metrics", "shared memory, every worker's updates in one series"),
    ("prom", "prometheus_client", "single-process: this process only"),
    ("prom-mp", "prometheus_client multiprocess", "a mmap'd file per process"),
)


def _updates(cfg: Config, out: list[Result]) -> None:
    for op in ("inc", "observe", "gauge"):
        for cid, name, _ in UPDATE_PEERS:
            base = RowId(suite=NAME, op=op, candidate_id=cid, candidate=name, mode=DASH)
            try:
                with contextlib.ExitStack() as stack:
                    if cid == "zeal":
                        loops = _zeal_updates(stack)
                    else:
                        tmp = stack.enter_context(shm_tempdir()) if cid == "prom-mp" else None
                        loops = _prometheus_updates(stack, tmp)
                    base["mode"], loop = loops[op]
                    log(f"  {op}: {name}")
                    out.append(Result.from_timing(base, measure(loop, cfg)))
            except NotInstalled as exc:
                out.append(Result(**base, status=str(exc)))
            except Exception as exc:
                log(traceback.format_exc())
                out.append(Result(**base, status=short_error(exc)))


# -- scrapes -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Scrape:
    """One scrape measurement: the median of its reps, and what the host held then."""

    candidate: str
    restarts: int
    ms: list[float]
    cpu_ms: list[float]
    files: int | None
    bytes: int

    @property
    def median(self) -> float:
        """Median wall ms of one scrape."""
        return statistics.median(self.ms)


def _timed(fn: Callable[[], object], reps: int) -> tuple[list[float], list[float]]:
    """Wall and CPU ms of each of ``reps`` calls, after a warm-up call."""
    fn()
    wall, cpu = [], []
    for _ in range(reps):
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        wall.append((time.perf_counter() - t0) * 1e3)
        cpu.append((time.process_time() - c0) * 1e3)
    return wall, cpu


def _worker(work: Callable[[], None], linger: bool) -> multiprocessing.process.BaseProcess:
    """A forked "worker" that runs ``work``; with ``linger`` it stays alive until killed."""
    done = _FORK.Event()

    def body() -> None:
        work()
        done.set()
        if linger:
            time.sleep(3600)

    p = _FORK.Process(target=body, daemon=True)
    p.start()
    if not done.wait(300):
        raise RuntimeError("a worker did not finish its increments")
    if not linger:
        p.join(60)
    return p


@contextlib.contextmanager
def _workers(work: Callable[[], None]) -> Iterator[None]:
    """Two live workers that each ran ``work``, stopped afterwards."""
    procs = [_worker(work, linger=True) for _ in range(2)]
    try:
        yield
    finally:
        for p in procs:
            p.kill()
            p.join(10)


def _zeal_scrapes(cfg: Config, series: int, restarts: Sequence[int]) -> list[Scrape]:
    from zeal_asgi import metrics
    from zeal_asgi.shm.segments import destroy

    reg = metrics.Registry(series + 16, name=f"bench-{uuid.uuid4().hex[:8]}")
    try:
        c = metrics.Counter("requests_total", "x", ("id",), registry=reg)

        def work() -> None:
            for i in range(series):
                c.labels(str(i)).inc()

        out: list[Scrape] = []
        with _workers(work):
            done = 0
            for target in restarts:
                for _ in range(target - done):
                    _worker(work, linger=False)
                done = target
                ms, cpu = _timed(lambda: metrics.render(reg.collect()), cfg.reps)
                out.append(Scrape("zeal", target, ms, cpu, None, reg.table.memory_bytes))
                total = sum(
                    s.value for f in reg.collect() for s in f.samples if s.name == c.name + "_total"
                )
                assert total == series * (2 + target), "zeal lost or invented increments"
        return out
    finally:
        destroy(reg.table)


def _prometheus_scrapes(cfg: Config, series: int, restarts: Sequence[int]) -> list[Scrape]:
    pc = need("prometheus_client", "prometheus-client")
    mp = need("prometheus_client.multiprocess")
    values = need("prometheus_client.values")
    with shm_tempdir() as tmp:
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tmp

        def work() -> None:
            values.ValueClass = values.MultiProcessValue()  # in this new process
            c = pc.Counter("requests_total", "x", ("id",), registry=pc.CollectorRegistry())
            for i in range(series):
                c.labels(str(i)).inc()

        def scrape() -> bytes:
            reg = pc.CollectorRegistry()
            mp.MultiProcessCollector(reg, path=tmp)
            return bytes(pc.generate_latest(reg))

        out: list[Scrape] = []
        try:
            with _workers(work):
                done = 0
                for target in restarts:
                    for _ in range(target - done):
                        _worker(work, linger=False)
                    done = target
                    ms, cpu = _timed(scrape, cfg.reps)
                    names = os.listdir(tmp)
                    size = sum(os.path.getsize(os.path.join(tmp, n)) for n in names)
                    out.append(
                        Scrape("prometheus_client multiprocess", target, ms, cpu, len(names), size)
                    )
        finally:
            os.environ.pop("PROMETHEUS_MULTIPROC_DIR", None)
        return out


# -- report ------------------------------------------------------------------------------------


def _find(results: Sequence[Result], cid: str, op: str) -> Result | None:
    return next(
        (r for r in results if r.candidate_id == cid and r.op == op and r.status == "ok"), None
    )


def _targets(results: Sequence[Result], scrapes: Sequence[Scrape]) -> list[Target]:
    out: list[Target] = []

    def rate(label: str, r: Result | None, floor: float) -> None:
        if r is None or not r.ops_per_s:
            out.append(Target(label, "not measured", None))
            return
        out.append(
            Target(
                label,
                f"{r.ops_per_s / 1e6:.2f} M/s ({fmt_ns(r.ns_per_op)} ns)",
                r.ops_per_s >= floor,
            )
        )

    def ratio(label: str, op: str) -> None:
        z, p = _find(results, "zeal", op), _find(results, "prom-mp", op)
        if z is None or p is None or not z.ops_per_s or not p.ops_per_s:
            out.append(Target(label, "not measured", None))
            return
        x = z.ops_per_s / p.ops_per_s
        out.append(
            Target(
                label,
                f"{fmt_ratio(x)} ({fmt_ns(z.ns_per_op)} ns vs {fmt_ns(p.ns_per_op)} ns)",
                x >= 3,
            )
        )

    rate("`Counter.inc()` on a cached child \u2265 5,000,000/s", _find(results, "zeal", "inc"), 5e6)
    rate("`Histogram.observe()` \u2265 2,000,000/s", _find(results, "zeal", "observe"), 2e6)
    ratio(f"`Counter.inc()` \u2265 3{TIMES} prometheus_client multiprocess mode", "inc")
    ratio(f"`Histogram.observe()` \u2265 3{TIMES} prometheus_client multiprocess mode", "observe")
    zeal = next((s for s in scrapes if s.candidate == "zeal" and s.restarts == 0), None)
    out.append(
        Target(
            f"scrape of {SERIES:,} series with 2 workers \u2264 50 ms",
            "not measured" if zeal is None else f"{zeal.median:.1f} ms",
            None if zeal is None else zeal.median <= 50,
        )
    )
    return out


def _scrape_table(scrapes: Sequence[Scrape]) -> str:
    lines = [
        "| Candidate | Mode / idiom | scrape ms | CPU ms | files | bytes held |",
        "|---|---|---:|---:|---:|---:|",
    ]
    for s in scrapes:
        files = DASH if s.files is None else f"{s.files:,}"
        cpu = statistics.median(s.cpu_ms)
        mode = f"after {s.restarts} worker restarts"
        lines.append(
            f"| {s.candidate} | {mode} | {s.median:.1f} | {cpu:.1f} | {files} | {s.bytes:,} |"
        )
    return "\n".join(lines)


def _body(
    results: Sequence[Result],
    scrapes: Sequence[Scrape],
    failures: Sequence[str],
    targets: Sequence[Target],
    cfg: Config,
) -> str:
    def ref(r: Result) -> float | None:
        z = _find(results, "zeal", r.op)
        return z.ops_per_s if z else None

    titles = {
        "inc": "Counter.inc() on a cached child (one process)",
        "observe": "Histogram.observe() on a cached child (one process)",
        "gauge": "Gauge.inc() (one process)",
    }
    sections = [
        "Reproduce: `python -m bench metrics` (~3 min; `--quick`: seconds); needs "
        "`prometheus-client` (the `bench` extra). Updates: median of "
        f"{cfg.reps} reps of ~{cfg.rep_seconds:g} s after a warm-up, the same call in a loop; "
        "the ratio column is zeal's ops/s divided by the row's. prometheus_client's "
        "multiprocess mode is switched on in-process exactly as `PROMETHEUS_MULTIPROC_DIR` "
        "does at import (its value class), with its files on tmpfs.",
    ]
    for op, title in titles.items():
        rows = [r for r in results if r.op == op]
        sections.append(f"### {title}\n\n" + row_table(rows, ref, f"zeal {TIMES}"))
    sections.append(
        f"### Scrape of {SERIES:,} counter series, 2 live workers, then worker restarts\n\n"
        "Each worker (a forked process) incremented every series; a third process of the host "
        "scrapes (reads every series and renders the text format); median of "
        f"{cfg.reps} scrapes, wall time and the scraping process's CPU time (on a busy machine "
        "the wall time includes waiting for a CPU). A restart is a process that incremented "
        "every series and died. "
        "*bytes held*: zeal's shared table (fixed when declared), multiprocess mode's "
        "directory.\n\n"
        + _scrape_table(scrapes)
        + ("\n\nNot measured: " + "; ".join(failures) if failures else "")
    )
    sections.append("### Targets\n\n" + target_table(targets))
    return "\n\n".join(sections)


def run(cfg: Config) -> SuiteReport:
    """Run the suite: updates of each peer in turn, then the scrapes."""
    date = now_utc()
    machine = machine_info(PACKAGES)
    watch = CpuWatch.start()
    results: list[Result] = []
    _updates(cfg, results)
    restarts = QUICK_RESTARTS if cfg.quick else RESTARTS
    scrapes: list[Scrape] = []
    failures: list[str] = []
    for name, fn in (
        ("zeal", _zeal_scrapes),
        ("prometheus_client multiprocess", _prometheus_scrapes),
    ):
        log(f"  scrapes: {name}")
        try:
            scrapes += fn(cfg, SERIES, restarts)
        except Exception as exc:
            log(traceback.format_exc())
            failures.append(f"{name}: {short_error(exc)}")
    for s in scrapes:
        row = RowId(
            suite=NAME,
            op="scrape",
            candidate_id=s.candidate,
            candidate=s.candidate,
            mode=f"after {s.restarts} restarts",
        )
        results.append(
            Result(
                **row,
                ops_per_s=1e3 / s.median,
                ns_per_op=s.median * 1e6,
                iters=len(s.ms),
                exact=True if s.candidate == "zeal" else None,
            )
        )
    for f in failures:
        results.append(
            Result(suite=NAME, op="scrape", candidate_id=f, candidate=f, mode=DASH, status="failed")
        )
    machine["background"] = watch.stop()
    targets = _targets(results, scrapes)
    return SuiteReport(
        name=NAME,
        title=TITLE,
        date=date,
        machine=machine,
        config=cfg,
        results=results,
        body=_body(results, scrapes, failures, targets, cfg),
        extra={
            "targets": [dataclasses.asdict(t) for t in targets],
            "scrapes": [dataclasses.asdict(s) for s in scrapes],
        },
    )
