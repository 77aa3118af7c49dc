"""Suite ``table``: ``Table`` get / set / incr and ``Atomic.increment`` against their peers.

Peers, each with the idiom a user would write (same row, key and idioms as perf-anchors.md):
a plain dict (the in-process floor), ``multiprocessing.Manager().dict()``, UltraDict (with its
fork-shared RLock and with ``shared_lock=True``), shared-memory-dict, diskcache, lmdb, redis-py
against a private redis-server, plus ``multiprocessing.Value`` and the ``atomics`` package as
counter-only peers.  Single process, then two forked processes incrementing one counter.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import multiprocessing
import os
import statistics
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ._harness import (
    TIMES,
    Concurrent,
    Config,
    CpuWatch,
    Loop,
    NotInstalled,
    Result,
    RowId,
    SuiteReport,
    call0,
    call1,
    call2,
    fmt_ns,
    fmt_ops,
    fmt_ratio,
    log,
    machine_info,
    markdown_table,
    measure,
    measure_concurrent,
    need,
    now_utc,
    redis_server,
    redis_server_version,
    shm_tempdir,
)

__all__ = ["NAME", "TITLE", "run"]

NAME = "table"
TITLE = "Table and Atomic vs shared-state peers"

ROW: dict[str, Any] = {"name": "alice", "score": 100}
"""Template only: every peer gets its own copy (:func:`_row`), since a dict stores the very
object it is given and a later in-place increment would change it for everyone."""
ROWS = 100
KEY = "user:5"
"""The hot key every get / set / row incr hits."""
COUNTER = "counter"
"""Peers without row columns increment this int key (their natural counter)."""
SCHEMA: dict[str, Any] = {"name": ("string", 32), "score": ("int", 8)}
MAX_ROWS = 1024

PACKAGES = (
    "zeal-asgi",
    "UltraDict",
    "atomics",
    "shared-memory-dict",
    "diskcache",
    "lmdb",
    "orjson",
    "redis",
    "hiredis",
)

_FORK = multiprocessing.get_context("fork")


@dataclasses.dataclass
class Spec:
    """One measurement of a peer: a single-process loop or a concurrent increment."""

    op: str
    """``get``, ``set``, ``incr`` (one process) or ``incr2`` (concurrent)."""
    mode: str
    loop: Loop | None = None
    conc: Concurrent | None = None
    variant: str = ""
    """Distinguishes two rows of one peer in the same table (e.g. dict get with a copy)."""


Factory = Callable[[contextlib.ExitStack[Any], str], list[Spec]]


@dataclasses.dataclass(frozen=True)
class Peer:
    """A candidate: how to set it up (resources go on the exit stack) and what it reports."""

    id: str
    name: str
    summary: str
    """Mode shown on its rows when it is not installed."""
    ops: tuple[str, ...]
    factory: Factory


def _row() -> dict[str, Any]:
    return dict(ROW)


def _populate(setitem: Callable[[str, Any], object], value: Any) -> None:
    for i in range(ROWS):
        setitem(f"user:{i}", value)


# -- zeal_asgi ---------------------------------------------------------------------------------


def _zeal_table(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    from zeal_asgi import Table
    from zeal_asgi.shm.segments import destroy

    name = f"bench_rows_{os.getpid()}"
    t = Table(MAX_ROWS, SCHEMA, name=name)
    stack.callback(destroy, t)
    _populate(t.set, _row())

    def attach() -> Loop:
        # what a worker of a multi-process server does: attach by name, then increment
        mine = Table(MAX_ROWS, SCHEMA, name=name)
        return call2(mine.incr, KEY, "score")

    return [
        Spec("get", "t.get(k) -> dict", call1(t.get, KEY)),
        Spec(
            "get",
            "t.get(k, 'score') -> int (one column)",
            call2(t.get, KEY, "score"),
            variant="field",
        ),
        Spec("set", "t.set(k, row)", call2(t.set, KEY, _row())),
        Spec("incr", "t.incr(k, 'score'): row column, atomic", call2(t.incr, KEY, "score")),
        Spec(
            "incr2",
            "each process attaches by name; t.incr(k, 'score')",
            conc=Concurrent(attach, lambda: int(t.get(KEY, "score"))),
        ),
    ]


def _zeal_atomic(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    from zeal_asgi import Atomic
    from zeal_asgi.shm.segments import destroy

    name = f"bench_counter_{os.getpid()}"
    a = Atomic(0, name=name)
    stack.callback(destroy, a)

    def attach() -> Loop:
        return call0(Atomic(0, name=name).increment)

    return [
        Spec("incr", "a.increment(): lock-free int64", call0(a.increment)),
        Spec(
            "incr2", "each process attaches by name; a.increment()", conc=Concurrent(attach, a.get)
        ),
    ]


# -- in-process floor --------------------------------------------------------------------------


def _dict(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    d: dict[str, dict[str, Any]] = {f"user:{i}": _row() for i in range(ROWS)}
    new_row = _row()

    def get(n: int) -> None:
        dd, k = d, KEY
        for _ in itertools.repeat(None, n):
            dd[k]  # the lookup itself is what is measured

    def get_copy(n: int) -> None:
        dd, k = d, KEY
        for _ in itertools.repeat(None, n):
            dd[k].copy()

    def set_(n: int) -> None:
        dd, k, row = d, KEY, new_row
        for _ in itertools.repeat(None, n):
            dd[k] = row

    def incr(n: int) -> None:
        dd, k = d, KEY
        for _ in itertools.repeat(None, n):
            dd[k]["score"] += 1

    return [
        Spec("get", "d[k]: the stored dict itself, not shared", get),
        Spec("get", "d[k].copy(): a fresh dict, like a shared get", get_copy, variant="copy"),
        Spec("set", "d[k] = row", set_),
        Spec("incr", "d[k]['score'] += 1", incr),
        # each forked child increments its own copy: the no-sharing ceiling of 2 cores
        Spec(
            "incr2",
            "d[k]['score'] += 1, each process its own dict",
            conc=Concurrent(lambda: incr, None),
        ),
    ]


# -- shared peers ------------------------------------------------------------------------------


def _manager(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    mgr = _FORK.Manager()
    stack.callback(mgr.shutdown)
    d: Any = mgr.dict()
    d.update({f"user:{i}": _row() for i in range(ROWS)})
    d[COUNTER] = 0
    lock = _FORK.Lock()

    def get(n: int) -> None:
        dd, k = d, KEY
        for _ in itertools.repeat(None, n):
            dd[k]  # a round trip to the manager process

    def set_(n: int) -> None:
        dd, k, row = d, KEY, _row()
        for _ in itertools.repeat(None, n):
            dd[k] = row

    def incr(n: int) -> None:
        dd, c, lk = d, COUNTER, lock
        for _ in itertools.repeat(None, n):
            with lk:
                dd[c] += 1

    return [
        Spec("get", "d[k] (pickled over a socket to the manager process)", get),
        Spec("set", "d[k] = row", set_),
        Spec("incr", "with mp.Lock (fork-shared): d[c] += 1", incr),
        Spec(
            "incr2",
            "with mp.Lock (fork-shared): d[c] += 1",
            conc=Concurrent(lambda: incr, lambda: int(d[COUNTER])),
        ),
    ]


def _ultradict(shared_lock: bool) -> Factory:
    if shared_lock:
        lock_mode = "shared_lock=True: atomics spin lock in shm"
    else:
        lock_mode = "default mp.RLock, fork-shared"

    def factory(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
        ultradict = need("UltraDict")
        if shared_lock:
            need("atomics")
        ud: Any = ultradict.UltraDict(
            name=f"zb_ud{int(shared_lock)}_{os.getpid()}",
            create=True,
            buffer_size=1_000_000,
            full_dump_size=1_000_000,
            shared_lock=shared_lock,
        )
        stack.callback(ud.unlink)
        _populate(ud.__setitem__, _row())
        ud[COUNTER] = 0
        lock = ud.lock

        def get(n: int) -> None:
            dd, k = ud, KEY
            for _ in itertools.repeat(None, n):
                dd[k]  # local replica + update-stream check

        def set_(n: int) -> None:
            dd, k, row = ud, KEY, _row()
            for _ in itertools.repeat(None, n):
                dd[k] = row

        def incr(n: int) -> None:
            dd, c, lk = ud, COUNTER, lock
            for _ in itertools.repeat(None, n):
                with lk:
                    dd[c] += 1

        incr_mode = f"with ud.lock: ud[c] += 1 ({lock_mode})"
        return [
            Spec("get", f"ud[k] ({lock_mode})", get),
            Spec("set", f"ud[k] = row ({lock_mode})", set_),
            Spec("incr", incr_mode, incr),
            Spec("incr2", incr_mode, conc=Concurrent(lambda: incr, lambda: int(ud[COUNTER]))),
        ]

    return factory


def _shared_memory_dict(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    # read when the module is imported: without it the library has no lock at all
    os.environ["SHARED_MEMORY_USE_LOCK"] = "1"
    smd_mod = need("shared_memory_dict", "shared-memory-dict")
    smd: Any = smd_mod.SharedMemoryDict(name=f"zb_smd_{os.getpid()}", size=16 * 1024)

    def close() -> None:
        smd.shm.unlink()
        smd.shm.close()

    stack.callback(close)
    _populate(smd.__setitem__, _row())
    smd[COUNTER] = 0
    lock = _FORK.Lock()

    def get(n: int) -> None:
        dd, k = smd, KEY
        for _ in itertools.repeat(None, n):
            dd[k]  # unpickles the whole dict

    def set_(n: int) -> None:
        dd, k, row = smd, KEY, _row()
        for _ in itertools.repeat(None, n):
            dd[k] = row

    def incr(n: int) -> None:
        dd, c, lk = smd, COUNTER, lock
        for _ in itertools.repeat(None, n):
            with lk:
                dd[c] = dd[c] + 1

    # its own lock does not span read-modify-write (perf-anchors.md): only a caller's lock works
    incr_mode = "own mp.Lock around smd[c] = smd[c] + 1 (library lock is not enough)"
    return [
        Spec("get", "smd[k] (unpickles the whole dict; SHARED_MEMORY_USE_LOCK=1)", get),
        Spec("set", "smd[k] = row (re-pickles the whole dict under its lock)", set_),
        Spec("incr", incr_mode, incr),
        Spec("incr2", incr_mode, conc=Concurrent(lambda: incr, lambda: int(smd[COUNTER]))),
    ]


def _diskcache(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    dc = need("diskcache")
    path = os.path.join(tmp, "diskcache")
    cache: Any = dc.Cache(path)
    stack.callback(cache.close)
    _populate(cache.set, _row())
    cache.set(COUNTER, 0)

    def attach() -> Loop:
        # SQLite connections must not cross a fork: each process opens its own
        mine: Any = dc.Cache(path)
        return call1(mine.incr, COUNTER)

    return [
        Spec("get", "cache.get(k) (SQLite in tmpfs, pickled row)", call1(cache.get, KEY)),
        Spec("set", "cache.set(k, row)", call2(cache.set, KEY, _row())),
        Spec("incr", "cache.incr(c) (atomic)", call1(cache.incr, COUNTER)),
        Spec(
            "incr2",
            "cache.incr(c), a Cache per process",
            conc=Concurrent(attach, lambda: int(cache.get(COUNTER))),
        ),
    ]


def _lmdb(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    lmdb = need("lmdb")
    orjson = need("orjson")
    path = os.path.join(tmp, "lmdb")
    key, ctr = KEY.encode(), COUNTER.encode()

    def open_env() -> Any:
        return lmdb.open(path, map_size=64 << 20, sync=False, metasync=False)

    env = open_env()
    stack.callback(env.close)
    with env.begin(write=True) as txn:
        for i in range(ROWS):
            txn.put(f"user:{i}".encode(), orjson.dumps(ROW))
        txn.put(ctr, b"0")

    def get(n: int) -> None:
        begin, loads, k = env.begin, orjson.loads, key
        for _ in itertools.repeat(None, n):
            with begin() as txn:
                loads(txn.get(k))

    def set_(n: int) -> None:
        begin, dumps, k, row = env.begin, orjson.dumps, key, _row()
        for _ in itertools.repeat(None, n):
            with begin(write=True) as txn:
                txn.put(k, dumps(row))

    def incr_on(e: Any) -> Loop:
        def incr(n: int) -> None:
            begin, c = e.begin, ctr
            for _ in itertools.repeat(None, n):
                with begin(write=True) as txn:
                    txn.put(c, b"%d" % (int(txn.get(c)) + 1))

        return incr

    # An LMDB environment must not cross a fork, and py-lmdb refuses a second open of the
    # same path in one process: the parent closes its env before forking, each child opens
    # its own, and the parent reads the counter through a short-lived one.
    def read() -> int:
        e = open_env()
        try:
            with e.begin() as txn:
                return int(txn.get(ctr))
        finally:
            e.close()

    def attach() -> Loop:
        return incr_on(open_env())

    incr_mode = "write txn: get, +1, put"
    return [
        Spec("get", "read txn: orjson.loads(txn.get(k)) (tmpfs)", get),
        Spec("set", "write txn: txn.put(k, orjson.dumps(row)), sync off", set_),
        Spec("incr", incr_mode, incr_on(env)),
        Spec("incr2", incr_mode + ", an env per process", conc=Concurrent(attach, read, env.close)),
    ]


def _redis(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    redis = need("redis")
    orjson = need("orjson")
    server = stack.enter_context(redis_server())

    def client() -> Any:
        return redis.Redis(host="127.0.0.1", port=server.port)

    r = client()
    stack.callback(r.close)
    for i in range(ROWS):
        r.set(f"user:{i}", orjson.dumps(ROW))
    r.set(COUNTER, 0)
    parser = "hiredis" if getattr(redis.utils, "HIREDIS_AVAILABLE", False) else "pure-Python parser"

    def get(n: int) -> None:
        rget, loads, k = r.get, orjson.loads, KEY
        for _ in itertools.repeat(None, n):
            loads(rget(k))

    def set_(n: int) -> None:
        rset, dumps, k, row = r.set, orjson.dumps, KEY, _row()
        for _ in itertools.repeat(None, n):
            rset(k, dumps(row))

    def attach() -> Loop:
        return call1(client().incr, COUNTER)

    return [
        Spec("get", f"orjson.loads(r.get(k)) ({parser}, loopback)", get),
        Spec("set", "r.set(k, orjson.dumps(row))", set_),
        Spec("incr", "r.incr(c) (INCR)", call1(r.incr, COUNTER)),
        Spec(
            "incr2",
            "r.incr(c), a client per process",
            conc=Concurrent(attach, lambda: int(r.get(COUNTER))),
        ),
    ]


def _mp_value(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    v: Any = _FORK.Value("q", 0)
    lock = v.get_lock()

    def incr(n: int) -> None:
        vv, lk = v, lock
        for _ in itertools.repeat(None, n):
            with lk:
                vv.value += 1

    mode = "with v.get_lock(): v.value += 1"
    return [
        Spec("incr", mode, incr),
        Spec("incr2", mode + " (fork-shared)", conc=Concurrent(lambda: incr, lambda: int(v.value))),
    ]


def _atomics(stack: contextlib.ExitStack[Any], tmp: str) -> list[Spec]:
    atomics = need("atomics")
    from multiprocessing import shared_memory

    shm = shared_memory.SharedMemory(create=True, size=8)
    # exit order (LIFO): the view, then the exported buffer, then the segment itself
    stack.callback(shm.unlink)
    stack.callback(shm.close)
    assert shm.buf is not None
    buf = shm.buf[:8]
    stack.callback(buf.release)
    a: Any = stack.enter_context(atomics.atomicview(buffer=buf, atype=atomics.INT))
    mode = "a.inc() on an atomicview INT in SharedMemory (lock-free, cffi)"
    return [
        Spec("incr", mode, call0(a.inc)),
        Spec("incr2", mode + ", fork-shared", conc=Concurrent(lambda: call0(a.inc), a.load)),
    ]


PEERS: tuple[Peer, ...] = (
    Peer("zeal-table", "zeal_asgi Table", "", ("get", "set", "incr", "incr2"), _zeal_table),
    Peer("zeal-atomic", "zeal_asgi Atomic", "", ("incr", "incr2"), _zeal_atomic),
    Peer("dict", "dict (in-process floor)", "", ("get", "set", "incr", "incr2"), _dict),
    Peer(
        "manager",
        "multiprocessing.Manager().dict()",
        "",
        ("get", "set", "incr", "incr2"),
        _manager,
    ),
    Peer(
        "ultradict-rlock",
        "UltraDict",
        "mp.RLock, fork-shared",
        ("get", "set", "incr", "incr2"),
        _ultradict(False),
    ),
    Peer(
        "ultradict-shared",
        "UltraDict",
        "shared_lock=True",
        ("get", "set", "incr", "incr2"),
        _ultradict(True),
    ),
    Peer(
        "shared-memory-dict",
        "shared-memory-dict",
        "SHARED_MEMORY_USE_LOCK=1",
        ("get", "set", "incr", "incr2"),
        _shared_memory_dict,
    ),
    Peer("diskcache", "diskcache.Cache", "", ("get", "set", "incr", "incr2"), _diskcache),
    Peer("lmdb", "lmdb", "", ("get", "set", "incr", "incr2"), _lmdb),
    Peer("redis", "redis-py (sync)", "", ("get", "set", "incr", "incr2"), _redis),
    Peer("mp-value", "multiprocessing.Value('q')", "", ("incr", "incr2"), _mp_value),
    Peer("atomics", "atomics (int64 in SharedMemory)", "", ("incr", "incr2"), _atomics),
)


# -- running -----------------------------------------------------------------------------------


def _base(peer: Peer, op: str, mode: str, variant: str = "") -> RowId:
    cid = f"{peer.id}:{variant}" if variant else peer.id
    return RowId(suite=NAME, op=op, candidate_id=cid, candidate=peer.name, mode=mode)


def _short(exc: BaseException) -> str:
    first = str(exc).strip().splitlines()
    return f"failed: {type(exc).__name__}" + (f": {first[0][:80]}" if first else "")


def _run_peer(peer: Peer, cfg: Config, tmp: str) -> list[Result]:
    results: list[Result] = []
    try:
        with contextlib.ExitStack() as stack:
            try:
                specs = peer.factory(stack, tmp)
            except NotInstalled as exc:
                log(f"[{NAME}] {peer.name} ({peer.id}): {exc}")
                return [
                    Result(**_base(peer, op, peer.summary or "\u2014"), status=str(exc))
                    for op in peer.ops
                ]
            incr_ns: float | None = None
            for spec in specs:
                base = _base(peer, spec.op, spec.mode, spec.variant)
                try:
                    if spec.loop is not None:
                        t = measure(spec.loop, cfg)
                        if spec.op == "incr":
                            incr_ns = t.ns_per_op
                        res = Result.from_timing(base, t)
                    else:
                        assert spec.conc is not None
                        # size the rep from the 1-proc speed of the same idiom
                        n_each = cfg.conc_iters_for(incr_ns or 10_000.0)
                        res = Result.from_concurrent(
                            base, measure_concurrent(spec.conc, n_each, cfg)
                        )
                except Exception as exc:
                    log(traceback.format_exc())
                    res = Result(**base, status=_short(exc))
                results.append(res)
                detail = f" {res.correctness}" if res.correctness else ""
                if res.overlap is not None and res.overlap >= 0.8:
                    detail += f" (all running {res.overlap:.0%} of the wall time)"
                log(
                    f"[{NAME}] {peer.name} {spec.op}{':' + spec.variant if spec.variant else ''}: "
                    + (
                        f"{fmt_ops(res.ops_per_s)} ops/s, {fmt_ns(res.ns_per_op)} ns{detail}"
                        if res.status == "ok"
                        else res.status
                    )
                )
    except Exception as exc:  # setup or cleanup failed: report it in the rows, go on
        log(traceback.format_exc())
        done = {(r.op, r.candidate_id) for r in results}
        results += [
            Result(**_base(peer, op, peer.summary or "\u2014"), status=_short(exc))
            for op in peer.ops
            if (op, peer.id) not in done
        ]
    return results


def _find(results: Sequence[Result], cid: str, op: str) -> Result | None:
    for r in results:
        if r.candidate_id == cid and r.op == op and r.status == "ok":
            return r
    return None


def _ops(r: Result | None) -> float | None:
    return r.ops_per_s if r is not None else None


@dataclasses.dataclass
class Target:
    """One target of the issue, checked against this run."""

    target: str
    measured: str
    met: bool | None


def _targets(results: Sequence[Result]) -> list[Target]:
    get, set_, incr = (_find(results, "zeal-table", op) for op in ("get", "set", "incr"))
    aincr = _find(results, "zeal-atomic", "incr")
    incr2 = _find(results, "zeal-table", "incr2")
    out: list[Target] = []

    def floor(label: str, r: Result | None, minimum: float) -> None:
        if r is None or r.ops_per_s is None:
            out.append(Target(label, "not measured", None))
            return
        out.append(
            Target(
                label,
                f"{fmt_ops(r.ops_per_s)} ops/s ({fmt_ns(r.ns_per_op)} ns)",
                r.ops_per_s >= minimum,
            )
        )

    floor("Table.get of a 2-column row \u2265 3,000,000 ops/s (\u2248 330 ns)", get, 3e6)
    floor("Table.set \u2265 2,500,000 ops/s", set_, 2.5e6)
    floor("Table.incr \u2265 5,000,000 ops/s", incr, 5e6)
    floor("Atomic.increment \u2265 10,000,000 ops/s", aincr, 10e6)
    label = "2 processes incrementing one row \u2265 3,000,000 ops/s total, exact count"
    if incr2 is None or incr2.ops_per_s is None:
        out.append(Target(label, "not measured", None))
    else:
        ok = incr2.ops_per_s >= 3e6 and bool(incr2.exact)
        out.append(Target(label, f"{fmt_ops(incr2.ops_per_s)} ops/s, {incr2.correctness}", ok))

    for op, zeal, minimum in (("get", get, 1.5), ("set", set_, 8.0), ("incr", incr, 25.0)):
        label = f"{op} \u2265 {minimum:g}{TIMES} UltraDict {op} (each lock mode)"
        peers = [
            (mode, _find(results, cid, op))
            for mode, cid in (("RLock", "ultradict-rlock"), ("shared_lock", "ultradict-shared"))
        ]
        zops = _ops(zeal)
        ratios = [(mode, zops / r.ops_per_s) for mode, r in peers if zops and r and r.ops_per_s]
        if not ratios:
            out.append(Target(label, "not measured", None))
            continue
        text = " / ".join(f"{fmt_ratio(x)} ({mode})" for mode, x in ratios)
        out.append(Target(label, text, min(x for _, x in ratios) >= minimum))

    copy = _find(results, "dict:copy", "get")
    label = f"Table.get within 4{TIMES} of a plain dict get + copy (d[k].copy())"
    if get is None or copy is None or not get.ns_per_op or not copy.ns_per_op:
        out.append(Target(label, "not measured", None))
    else:
        slower = get.ns_per_op / copy.ns_per_op
        text = (
            f"{fmt_ns(get.ns_per_op)} ns vs {fmt_ns(copy.ns_per_op)} ns: "
            f"{fmt_ratio(slower)} the dict's time"
        )
        out.append(Target(label, text, slower <= 4.0))
    return out


def _body(results: Sequence[Result], targets: Sequence[Target], cfg: Config) -> str:
    def rows(op: str) -> list[Result]:
        return [r for r in results if r.op == op]

    zget = _ops(_find(results, "zeal-table", "get"))
    zset = _ops(_find(results, "zeal-table", "set"))
    incr_refs = [
        (f"Table.incr {TIMES}", _ops(_find(results, "zeal-table", "incr"))),
        (f"Atomic {TIMES}", _ops(_find(results, "zeal-atomic", "incr"))),
    ]
    incr2_refs = [
        (f"Table.incr {TIMES}", _ops(_find(results, "zeal-table", "incr2"))),
        (f"Atomic {TIMES}", _ops(_find(results, "zeal-atomic", "incr2"))),
    ]
    met = {True: "**yes**", False: "**NO**", None: "\u2014"}
    target_lines = ["| Target (issue) | Measured | Met |", "|---|---|---|"]
    target_lines += [f"| {t.target} | {t.measured} | {met[t.met]} |" for t in targets]
    reps = f"median of {cfg.reps} reps"
    return "\n\n".join(
        [
            f"Ratio columns: zeal's ops/s divided by the row's, i.e. how many times faster zeal is "
            f"(below 1{TIMES}: the row is faster). Row `{ROW}`, {ROWS} rows pre-populated, one "
            f"hot key; {reps}, each rep ~{cfg.rep_seconds:g} s after a warm-up. zeal "
            "increments the row's `score` column; peers without columns increment an int key "
            "with their natural idiom. Byte stores (lmdb, Redis) include orjson encode/decode; "
            "Manager, UltraDict, shared-memory-dict and diskcache pickle internally.",
            "### get (one process)\n\n"
            + markdown_table(rows("get"), [(f"Table.get {TIMES}", zget)]),
            "### set (one process)\n\n"
            + markdown_table(rows("set"), [(f"Table.set {TIMES}", zset)]),
            f"### incr (one process)\n\n{markdown_table(rows('incr'), incr_refs)}",
            f"### incr, {cfg.procs} processes on one counter\n\n"
            f"{cfg.procs} forked processes increment the same counter at once; ops/s = all "
            "increments / wall time from the first start to the last finish, and the counter "
            "is checked after every rep.\n\n" + markdown_table(rows("incr2"), incr2_refs),
            "### Targets\n\n" + "\n".join(target_lines),
        ]
    )


def run(cfg: Config) -> SuiteReport:
    """Run the suite: every peer set up, measured and torn down in turn."""
    date = now_utc()
    tools = {}
    if (version := redis_server_version()) is not None:
        tools["redis-server"] = version
    machine = machine_info(PACKAGES, tools)
    watch = CpuWatch.start()
    results: list[Result] = []
    with shm_tempdir() as tmp:
        for peer in PEERS:
            results += _run_peer(peer, cfg, tmp)
    machine["background"] = watch.stop()
    during = [r.background for r in results if r.background is not None]
    if during:
        machine["background"]["during_rows"] = statistics.median(during)
        machine["background"]["during_rows_max"] = max(during)
    targets = _targets(results)
    return SuiteReport(
        name=NAME,
        title=TITLE,
        date=date,
        machine=machine,
        config=cfg,
        results=results,
        body=_body(results, targets, cfg),
        extra={"targets": [dataclasses.asdict(t) for t in targets]},
    )
