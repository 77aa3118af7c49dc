"""Suite ``cache``: ``Cache`` hits and sets on the table backend vs diskcache, cashews, aiocache.

zeal's two tiers are measured apart: a memory-tier hit (the value inline in the shared table),
a file-tier hit after a restart (a fresh memory tier over the same ``cache_dir``: every get
reads the file) and a file-tier hit of a value larger than ``memory_value_bytes`` (8 KiB by
default, so it spills to a file behind a pointer row).  Beside them, the same values in
diskcache (SQLite; files on tmpfs like zeal's), cashews and aiocache (memory and Redis).  The
rows of one table are measured rep by rep in turn; a component table shows where a hit's time
goes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os
import statistics
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any

from ._harness import (
    TIMES,
    Config,
    CpuWatch,
    Loop,
    NotInstalled,
    Result,
    SuiteReport,
    fmt_ns,
    fmt_ops,
    fmt_ratio,
    log,
    machine_info,
    need,
    now_utc,
    redis_server,
    redis_server_version,
    shm_tempdir,
)
from .store import (
    AsyncRunner,
    Row,
    Target,
    acall1,
    acall2,
    measure_rows,
    row_table,
    short_error,
    target_table,
)

__all__ = ["NAME", "TITLE", "run"]

NAME = "cache"
TITLE = "Cache hits and sets vs diskcache, cashews and aiocache"

SMALL: dict[str, Any] = {"name": "alice", "score": 100}
BIG: dict[str, Any] = {"name": "alice", "score": 100, "bio": "x" * 10_000}
"""Over the memory tier's 8 KiB: zeal keeps it in the file tier."""
KEY, BIG_KEY = "user:5", "user:5:big"
SECRET = "zeal-bench-cache-secret-0123456789abcdef"
PACKAGES = ("zeal-asgi", "diskcache", "cashews", "aiocache", "redis", "hiredis", "uvloop")


@dataclasses.dataclass
class Env:
    """The loop, a tmpfs directory and the one Redis every Redis row uses."""

    runner: AsyncRunner
    tmp: str
    redis_port: int | None

    @property
    def redis_url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (NotInstalled without a redis-server)."""
        if self.redis_port is None:
            raise NotInstalled("not installed (redis-server)")
        return f"redis://127.0.0.1:{self.redis_port}/0"


# Each candidate: (candidate id, name, setup) where setup returns {op: (mode, loop)} with ops
# get_small, get_big, set_small, set_big.
Ops = dict[str, tuple[str, Loop]]
Setup = Callable[[contextlib.ExitStack[Any], Env], Ops]


def _zeal_cache(
    stack: contextlib.ExitStack[Any], env: Env, namespace: str, serializer: str = "json"
) -> Any:
    from zeal_asgi import Cache, Store
    from zeal_asgi.shm.segments import destroy

    store = Store("table")
    cache = Cache(
        cache_dir=os.path.join(env.tmp, f"zeal-cache-{serializer}"),
        gc_interval_ms=0,
        secret=SECRET,
        serializer=serializer,
        namespace=namespace,
        store=store,
    )

    def close() -> None:
        cache.close()
        for name in store.names():
            destroy(store.table(name))

    stack.callback(close)
    return cache


def _zeal(serializer: str) -> Setup:
    def setup(stack: contextlib.ExitStack[Any], env: Env) -> Ops:
        cache = _zeal_cache(stack, env, f"z{serializer[0]}{os.getpid()}", serializer)
        return _zeal_ops(env, cache)

    return setup


def _zeal_ops(env: Env, cache: Any) -> Ops:
    run, loop = env.runner.run, env.runner.loop_of
    run(cache.set(KEY, SMALL))
    run(cache.set(BIG_KEY, BIG))
    hits = cache.stats()
    run(cache.get(KEY))
    run(cache.get(BIG_KEY))
    after = cache.stats()
    # the rows must measure what they say: the small value from memory, the big one from a file
    if after.get("hits_memory", 0) - hits.get("hits_memory", 0) != 1:
        raise RuntimeError(f"the small value was not a memory-tier hit: {after}")
    if after.get("hits_file", 0) - hits.get("hits_file", 0) != 1:
        raise RuntimeError(f"the 10 KiB value was not a file-tier hit: {after}")
    return {
        "get_small": ("await cache.get(k): memory-tier hit", loop(acall1(cache.get, KEY))),
        "get_big": (
            "await cache.get(k): file-tier hit (10 KiB spills past memory_value_bytes)",
            loop(acall1(cache.get, BIG_KEY)),
        ),
        "set_small": (
            "await cache.set(k, v): memory row + file copy",
            loop(acall2(cache.set, KEY, SMALL)),
        ),
        "set_big": (
            "await cache.set(k, v): file + pointer row",
            loop(acall2(cache.set, BIG_KEY, BIG)),
        ),
    }


def _zeal_restarted(stack: contextlib.ExitStack[Any], env: Env) -> Ops:
    """A second cache over the same directory and secret, with an empty memory tier: what a
    server sees after a restart; every get is served by the file tier."""
    first = _zeal_cache(stack, env, f"zw{os.getpid()}")
    env.runner.run(first.set(KEY, SMALL))
    cache = _zeal_cache(stack, env, f"zr{os.getpid()}")
    before = cache.stats().get("hits_file", 0)
    env.runner.run(cache.get(KEY))
    if cache.stats().get("hits_file", 0) - before != 1:
        raise RuntimeError("after the restart the value was not a file-tier hit")
    mode = "await cache.get(k): file-tier hit (memory tier empty, after a restart)"
    return {"get_small": (mode, env.runner.loop_of(acall1(cache.get, KEY)))}


def _diskcache(stack: contextlib.ExitStack[Any], env: Env) -> Ops:
    dc = need("diskcache")
    cache: Any = dc.Cache(os.path.join(env.tmp, "diskcache"))
    stack.callback(cache.close)
    cache.set(KEY, SMALL)
    cache.set(BIG_KEY, BIG)

    def call(fn: Callable[..., object], *args: Any) -> Loop:
        def loop(n: int) -> None:
            f, a = fn, args
            for _ in itertools.repeat(None, n):
                f(*a)

        return loop

    sync = "sync, in the loop's thread"
    return {
        "get_small": (f"cache.get(k) ({sync}; SQLite + pickle)", call(cache.get, KEY)),
        "get_big": ("cache.get(k) (10 KiB pickled in SQLite)", call(cache.get, BIG_KEY)),
        "set_small": ("cache.set(k, v)", call(cache.set, KEY, SMALL)),
        "set_big": ("cache.set(k, v)", call(cache.set, BIG_KEY, BIG)),
    }


def _async_ops(env: Env, cache: Any, note: str) -> Ops:
    run, loop = env.runner.run, env.runner.loop_of
    run(cache.set(KEY, SMALL))
    run(cache.set(BIG_KEY, BIG))
    return {
        "get_small": (f"await cache.get(k){note}", loop(acall1(cache.get, KEY))),
        "get_big": (f"await cache.get(k){note}", loop(acall1(cache.get, BIG_KEY))),
        "set_small": ("await cache.set(k, v)", loop(acall2(cache.set, KEY, SMALL))),
        "set_big": ("await cache.set(k, v)", loop(acall2(cache.set, BIG_KEY, BIG))),
    }


def _cashews(redis: bool) -> Setup:
    def setup(stack: contextlib.ExitStack[Any], env: Env) -> Ops:
        cashews = need("cashews")
        cache = cashews.Cache()
        cache.setup(env.redis_url if redis else "mem://")
        stack.callback(lambda: env.runner.run(cache.close()))
        env.runner.run(cache.init())
        return _async_ops(env, cache, " (Redis, pickle)" if redis else " (per process)")

    return setup


def _aiocache(redis: bool) -> Setup:
    def setup(stack: contextlib.ExitStack[Any], env: Env) -> Ops:
        aiocache = need("aiocache")
        if redis:
            env.redis_url  # noqa: B018 - NotInstalled without a server
            cache = aiocache.RedisCache(endpoint="127.0.0.1", port=env.redis_port, namespace="a")
        else:
            cache = aiocache.SimpleMemoryCache()
        stack.callback(lambda: env.runner.run(cache.close()))
        return _async_ops(env, cache, " (Redis, JSON)" if redis else " (per process)")

    return setup


CANDIDATES: tuple[tuple[str, str, Setup], ...] = (
    ("zeal", "zeal Cache, table backend", _zeal("json")),
    ("zeal-pickle", "zeal Cache, serializer='pickle' (opt-in)", _zeal("pickle")),
    ("zeal-restarted", "zeal Cache, table backend", _zeal_restarted),
    ("diskcache", "diskcache.Cache", _diskcache),
    ("cashews-mem", "cashews mem://", _cashews(False)),
    ("aiocache-mem", "aiocache SimpleMemoryCache", _aiocache(False)),
    ("cashews-redis", "cashews redis://", _cashews(True)),
    ("aiocache-redis", "aiocache RedisCache", _aiocache(True)),
)
OPS = {
    "get_small": f"get hit, small value `{SMALL}`",
    "get_big": "get hit, 10 KiB value (`bio` of 10,000 characters)",
    "set_small": "set, small value",
    "set_big": "set, 10 KiB value",
}


# -- where a hit's time goes -------------------------------------------------------------------


def _components(stack: contextlib.ExitStack[Any], env: Env) -> list[Row]:
    """Each step of a hit measured on its own (zeal's internals: may fail if they change).

    ``hit`` and ``big`` add up to the whole hit (the rest is the coroutine and glue); ``cold``
    lists what the first hit of a value in a worker costs instead (before its bytes are known).
    """
    cache = _zeal_cache(stack, env, f"zc{os.getpid()}")
    run = env.runner.run
    run(cache.set(KEY, SMALL))
    run(cache.set(BIG_KEY, BIG))
    run(cache.get(KEY))
    run(cache.get(BIG_KEY))  # this worker has now verified and decoded both once
    table = cache.store.table(cache._tiers.table)
    memo = cache._tiers.memo
    files = cache.files
    big_key = BIG_KEY.encode()
    small = cache.serializer.dumps(SMALL)
    big = cache.serializer.dumps(BIG)

    def sync(fn: Callable[..., object], *args: Any) -> Loop:
        def loop(n: int) -> None:
            f, a = fn, args
            for _ in itertools.repeat(None, n):
                f(*a)

        return loop

    def read_big() -> object:
        return files.read(big_key, time.time())

    entry = files.read(big_key, time.time())
    if entry is None:
        raise RuntimeError("the 10 KiB value is not in the file tier")
    big_payload = entry.payload

    def first_read_big() -> object:
        files._verified.pop(files.name(big_key), None)  # as if this worker never verified it
        return files.read(big_key, time.time())

    loop = env.runner.loop_of
    steps: list[tuple[str, str, Loop]] = [
        ("hit", "the whole hit: await cache.get(k)", loop(acall1(cache.get, KEY))),
        (
            "hit",
            "store check: the store's backend is the kept one",
            sync(lambda: cache._tiers.hot_backend is cache.store.backend),
        ),
        (
            "hit",
            "kept row: FieldMemo.get (row compared in place, expiry, lock-free count, dict copied)",
            sync(cache._tiers.hot[KEY].get, None),
        ),
        ("big", "the whole hit: await cache.get(k)", loop(acall1(cache.get, BIG_KEY))),
        ("big", "pointer row read: table.get(k, 'v')", sync(table.get, BIG_KEY, "v")),
        ("big", "file read: open, pread, compare with verified bytes, close", sync(read_big)),
        (
            "big",
            "decode: bytes equal to decoded ones, flat dict copied",
            sync(memo.loads, (big_key, 0), big_payload),
        ),
        (
            "cold",
            "file read, first time: open, fstat, pread, close, HMAC-SHA256",
            sync(first_read_big),
        ),
        ("cold", "decode of the small value (JSON)", sync(cache.serializer.loads, small)),
        (
            "cold",
            "decode of the 10 KiB value (JSON + the raw UTF-8 string)",
            sync(cache.serializer.loads, big),
        ),
    ]
    return [
        Row(f"step:{kind}:{i}", "zeal Cache", kind, mode, lp)
        for i, (kind, mode, lp) in enumerate(steps)
    ]


# -- running -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    """Rows of the run and the client CPU time of each (``id(result)`` -> ns/op)."""

    results: list[Result] = dataclasses.field(default_factory=list)
    cpu: dict[int, float] = dataclasses.field(default_factory=dict)


def _measure(rows: list[Row], cfg: Config, out: Measured) -> None:
    for res, cpu in measure_rows(NAME, rows, cfg):
        out.results.append(res)
        out.cpu[id(res)] = cpu
        text = (
            f"{fmt_ops(res.ops_per_s)} ops/s, {fmt_ns(res.ns_per_op)} ns"
            if res.status == "ok"
            else res.status
        )
        log(f"[{NAME}] {res.candidate_id} {res.op}: {text}")


def _run_all(cfg: Config, env: Env, out: Measured) -> None:
    with contextlib.ExitStack() as stack:
        rows: list[Row] = []
        for cid, name, setup in CANDIDATES:
            try:
                ops = setup(stack, env)
            except Exception as exc:
                status = str(exc) if isinstance(exc, NotInstalled) else short_error(exc)
                if not isinstance(exc, NotInstalled):
                    log(traceback.format_exc())
                log(f"[{NAME}] {cid}: {status}")
                wanted = ("get_small",) if cid == "zeal-restarted" else tuple(OPS)
                out.results += [
                    Result(NAME, op, cid, name, "\u2014", status=status) for op in wanted
                ]
                continue
            rows += [Row(cid, name, op, mode, loop) for op, (mode, loop) in ops.items()]
        for op in OPS:
            _measure([r for r in rows if r.op == op], cfg, out)
    with contextlib.ExitStack() as stack:
        try:
            steps = _components(stack, env)
        except Exception as exc:
            log(traceback.format_exc())
            out.results.append(
                Result(NAME, "hit", "step", "zeal Cache", "\u2014", status=short_error(exc))
            )
            return
        for kind in ("hit", "big", "cold"):
            _measure([r for r in steps if r.op == kind], cfg, out)


def _find(results: Sequence[Result], cid: str, op: str) -> Result | None:
    for r in results:
        if r.candidate_id == cid and r.op == op and r.status == "ok":
            return r
    return None


def _targets(results: Sequence[Result]) -> list[Target]:
    out: list[Target] = []

    def ratio(label: str, zeal: Result | None, peer: Result | None, minimum: float) -> None:
        if zeal is None or peer is None or not zeal.ops_per_s or not peer.ops_per_s:
            out.append(Target(label, "not measured", None))
            return
        x = zeal.ops_per_s / peer.ops_per_s
        text = f"{fmt_ratio(x)} ({fmt_ns(zeal.ns_per_op)} ns vs {fmt_ns(peer.ns_per_op)} ns)"
        out.append(Target(label, text, x >= minimum))

    dc_small, dc_big = (
        _find(results, "diskcache", "get_small"),
        _find(results, "diskcache", "get_big"),
    )
    ratio(
        f"memory-tier hits \u2265 3{TIMES} diskcache (small value)",
        _find(results, "zeal", "get_small"),
        dc_small,
        3.0,
    )
    ratio(
        "file-tier hits no slower than diskcache: after a restart (small value)",
        _find(results, "zeal-restarted", "get_small"),
        dc_small,
        1.0,
    )
    ratio(
        "file-tier hits no slower than diskcache: 10 KiB value spilled to the file tier",
        _find(results, "zeal", "get_big"),
        dc_big,
        1.0,
    )
    return out


def _component_table(m: Measured, kind: str) -> str:
    rows = [r for r in m.results if r.candidate_id.startswith(f"step:{kind}:")]
    if kind == "cold":
        lines = ["| Step | ns/op |", "|---|---:|"]
        for r in rows:
            text = fmt_ns(r.ns_per_op) if r.status == "ok" and r.ns_per_op else r.status
            lines.append(f"| {r.mode} | {text} |")
        return "\n".join(lines)
    lines = ["| Step | ns/op | share of the whole hit |", "|---|---:|---:|"]
    whole = rows[0].ns_per_op if rows and rows[0].status == "ok" else None
    for r in rows:
        if r.status != "ok" or not r.ns_per_op:
            lines.append(f"| {r.mode} | {r.status} | \u2014 |")
            continue
        share = f"{r.ns_per_op / whole:.0%}" if whole else "\u2014"
        lines.append(f"| {r.mode} | {fmt_ns(r.ns_per_op)} | {share} |")
    parts = [r.ns_per_op for r in rows[1:] if r.status == "ok" and r.ns_per_op]
    if whole and len(parts) == len(rows) - 1:
        rest = whole - sum(parts)
        what = (
            "the rest: coroutine, key type, lookup of the kept row"
            if kind == "hit"
            else "the rest: coroutine, binding check, key and head checks, counter"
        )
        lines.append(f"| {what} | {fmt_ns(rest)} | {rest / whole:.0%} |")
    return "\n".join(lines)


def _body(m: Measured, targets: Sequence[Target], cfg: Config, loop: str) -> str:
    def ref(r: Result) -> float | None:
        zeal = _find(m.results, "zeal", r.op)
        return zeal.ops_per_s if zeal else None

    def cpu(r: Result) -> float | None:
        return m.cpu.get(id(r))

    sections = [
        "Reproduce: `python -m bench cache` (~2 min; `--quick`: seconds); needs the `bench` "
        "extra (diskcache, cashews, aiocache) and a redis-server on PATH for the Redis rows.",
        f"Async rows await one call at a time in one event loop ({loop}); diskcache is called "
        "synchronously in the same thread (its fastest use: no executor hop). Median of "
        f"{cfg.reps} reps of ~{cfg.rep_seconds:g} s after a warm-up, the rows of one table "
        "measured rep by rep in turn. zeal: `Cache(secret=..., gc_interval_ms=0)` on the "
        "table backend with the default JSON serializer (the targets' configuration: rows in "
        "the owner-only shared-memory segment carry no MAC, files an HMAC-SHA256), and "
        "with the opt-in pickle serializer (HMAC-SHA256 on every row and file, checked before "
        "anything is unpickled). A memory-tier hit whose row this worker already checked and "
        "decoded compares the row in place with those bytes (no copy of the 8 KiB row, no MAC "
        "recomputed over identical bytes) and returns a fresh copy of the flat value decoded "
        "then. Every zeal file-tier hit opens and reads the file; a worker "
        "that already verified a file with its HMAC recognises identical bytes by comparing "
        "them in full, and a flat value it already decoded from identical bytes is returned as "
        "a fresh copy (the last table below shows what a value's first hit costs instead); "
        "its `cache_dir` and diskcache's "
        "directory are on tmpfs (`/dev/shm`), so no disk I/O is measured. cashews and aiocache "
        "use their default serializers (cashews pickles on Redis, aiocache JSON); their memory "
        "caches are per process and hand back the stored object itself. The Redis rows share "
        "one private redis-server. The ratio column is zeal's ops/s for the same operation "
        "(memory tier for small values, file tier for the 10 KiB value) divided by the row's.",
    ]
    for op, title in OPS.items():
        rows = [r for r in m.results if r.op == op]
        sections.append(f"### {title}\n\n" + row_table(rows, ref, f"zeal {TIMES}", cpu))
    sections.append(
        "### Where a hit's time goes\n\nEach step measured on its own (zeal's internals), "
        "memory-tier hit of the small value:\n\n"
        + _component_table(m, "hit")
        + "\n\nFile-tier hit of the 10 KiB value (the memory tier holds a pointer row):\n\n"
        + _component_table(m, "big")
        + "\n\nWhat the first hit of a value in a worker costs instead (its bytes not seen "
        "before: the file is MACed, the value decoded):\n\n" + _component_table(m, "cold")
    )
    sections.append("### Targets\n\n" + target_table(targets))
    return "\n\n".join(sections)


def run(cfg: Config) -> SuiteReport:
    """Run the suite: every candidate set up, each operation measured across them in turn."""
    date = now_utc()
    tools = {}
    if (version := redis_server_version()) is not None:
        tools["redis-server"] = version
    machine = machine_info(PACKAGES, tools)
    watch = CpuWatch.start()
    measured = Measured()
    runner = AsyncRunner()
    try:
        with shm_tempdir() as tmp, contextlib.ExitStack() as servers:
            port: int | None = None
            try:
                port = servers.enter_context(redis_server()).port
            except NotInstalled as exc:
                log(f"[{NAME}] {exc}: Redis rows are skipped")
            _run_all(cfg, Env(runner, tmp, port), measured)
    finally:
        runner.close()
    machine["background"] = watch.stop()
    machine["event_loop"] = runner.kind
    during = [r.background for r in measured.results if r.background is not None]
    if during:
        machine["background"]["during_rows"] = statistics.median(during)
        machine["background"]["during_rows_max"] = max(during)
    targets = _targets(measured.results)
    return SuiteReport(
        name=NAME,
        title=TITLE,
        date=date,
        machine=machine,
        config=cfg,
        results=measured.results,
        body=_body(measured, targets, cfg, runner.kind),
        extra={"targets": [dataclasses.asdict(t) for t in targets]},
    )
