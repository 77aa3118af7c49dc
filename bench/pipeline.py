"""Sections of the ``store`` suite: Redis under concurrency (automatic pipelining) and the cost of
the class-level facade.

**Concurrency.** ``get``/``set``/``incr`` awaited by 1, 8 and 64 coroutines of one event loop,
each row one client: zeal's redis backend (``await Store.get(t, k)``, default options, and the
same with ``auto_pipeline=False``), redis-py asyncio with its default pool and with one
connection, coredis and valkey-glide (their ``hgetall``/``hset``/``hincrby`` on a hash row), and
the server's own ceilings: ``redis-benchmark -c 1 -P 1`` (one round trip at a time) and ``-P 16``
(16 commands per round trip) sending exactly the commands zeal sends (``HGETALL``, and the
``EVALSHA`` of zeal's set and incr scripts with their KEYS and ARGV).  A second run of zeal at 64
coroutines samples Redis ``CLIENT LIST``: the connections one worker holds.

**Facade.** ``await Store.get(t, k)`` on the class against ``await store.get(t, k)`` on the
instance (table backend), and ``await Cache.get(k)`` against ``await cache.get(k)``.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import dataclasses
import io
import itertools
import os
import shutil
import statistics
import subprocess
import tempfile
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, TypeVar

from ._harness import (
    DASH,
    TIMES,
    Config,
    Loop,
    NotInstalled,
    Result,
    RowId,
    fmt_ns,
    fmt_ops,
    log,
    need,
)
from .store import (
    KEY,
    NAME,
    ROW,
    Body,
    Env,
    Measured,
    Row,
    Target,
    _make_store,
    _redis_client,
    _table_name,
    measure_rows,
    short_error,
)

__all__ = ["CONCURRENCY", "facade_section", "pipeline_section"]

T = TypeVar("T")
CONCURRENCY = (1, 8, 64)
OPS = ("get", "set", "incr")
HKEY = b"raw:h:" + KEY.encode()
Calls = dict[str, Callable[[], Awaitable[object]]]
"""One awaitable call per operation."""


def fanout(call: Callable[[], Awaitable[object]], conc: int) -> Body:
    """A body running ``n`` calls over ``conc`` coroutines (gathered)."""

    async def body(n: int) -> None:
        per, extra = divmod(n, conc)

        async def worker(k: int) -> None:
            f = call
            for _ in itertools.repeat(None, k):
                await f()

        await asyncio.gather(*(worker(per + (i < extra)) for i in range(conc)))

    return body


# -- candidates ----------------------------------------------------------------------------------


@dataclasses.dataclass
class Counted:
    """zeal's incr calls made, to check the counter afterwards."""

    calls: int = 0


def _zeal(
    stack: contextlib.ExitStack[Any], env: Env, counted: Counted | None, auto_pipeline: bool
) -> tuple[str, Calls]:
    from zeal_asgi import Store

    table = _table_name("p" if auto_pipeline else "q")
    conn = {"url": env.redis_url, "prefix": table, "auto_pipeline": auto_pipeline}
    # the pipelined store is the process's default (class-level calls); the other one is
    # called on its instance, and the default is given back to the first
    previous = None if auto_pipeline else Store.default()
    store = _make_store(stack, env, "redis", conn, table)
    target: Any = Store if auto_pipeline else store
    if previous is not None:
        Store.set_default(previous)
    row = dict(ROW)

    async def incr() -> object:
        if counted is not None:
            counted.calls += 1
        return await target.incr(table, KEY, "score")

    calls: Calls = {
        "get": lambda: target.get(table, KEY),
        "set": lambda: target.set(table, KEY, row),
        "incr": incr,
    }
    return ("await Store.get/set/incr(t, k...)" if auto_pipeline else "await store.get/...") + (
        "" if auto_pipeline else ", auto_pipeline=False"
    ), calls


def _hash_calls(hgetall: Any, hset: Any, hincrby: Any) -> Calls:
    row = dict(ROW)
    return {
        "get": lambda: hgetall(HKEY),
        "set": lambda: hset(HKEY, mapping=row),
        "incr": lambda: hincrby(HKEY, "score", 1),
    }


def _redis_py(single: bool) -> Callable[[contextlib.ExitStack[Any], Env], tuple[str, Calls]]:
    def setup(stack: contextlib.ExitStack[Any], env: Env) -> tuple[str, Calls]:
        r = _redis_client(stack, env, single_connection_client=single)
        env.runner.run(r.hset(HKEY, mapping=ROW))
        mode = "one connection (single_connection_client)" if single else "default pool"
        return f"{mode}: hgetall / hset / hincrby", _hash_calls(r.hgetall, r.hset, r.hincrby)

    return setup


def _coredis(stack: contextlib.ExitStack[Any], env: Env) -> tuple[str, Calls]:
    coredis = need("coredis")
    env.redis_url  # noqa: B018 - NotInstalled without a server
    c = coredis.Redis(host="127.0.0.1", port=env.redis_port)
    # coredis runs its pool in an anyio task group opened by `async with client`: entered,
    # used and left by one task
    held = HELD["coredis"] = _Held(env, c)
    stack.callback(held.close)
    held.run(c.hset(HKEY, dict(ROW)))
    row = dict(ROW)
    calls: Calls = {
        "get": lambda: c.hgetall(HKEY),
        "set": lambda: c.hset(HKEY, row),
        "incr": lambda: c.hincrby(HKEY, "score", 1),
    }
    return "default pool: hgetall / hset / hincrby", calls


def _glide(stack: contextlib.ExitStack[Any], env: Env) -> tuple[str, Calls]:
    glide = need("glide", "valkey-glide")
    env.redis_url  # noqa: B018 - NotInstalled without a server
    conf = glide.GlideClientConfiguration([glide.NodeAddress("127.0.0.1", env.redis_port)])
    g = env.runner.run(glide.GlideClient.create(conf))
    stack.callback(lambda: env.runner.run(g.close()))
    row = {k: str(v) for k, v in ROW.items()}
    env.runner.run(g.hset(HKEY, row))
    calls: Calls = {
        "get": lambda: g.hgetall(HKEY),
        "set": lambda: g.hset(HKEY, row),
        "incr": lambda: g.hincrby(HKEY, "score", 1),
    }
    return "one multiplexed connection: hgetall / hset / hincrby", calls


class _Held:
    """A client entered, used and left by one task (coredis: anyio task groups and context
    variables); every coroutine given to :meth:`run` is awaited by that task."""

    def __init__(self, env: Env, client: Any) -> None:
        self.loop = env.runner.loop
        self.jobs: asyncio.Queue[tuple[Awaitable[Any], asyncio.Future[Any]] | None]
        self.jobs = asyncio.Queue()
        self.task = self.loop.create_task(self._hold(client))

    async def _hold(self, client: Any) -> None:
        async with client:
            while (job := await self.jobs.get()) is not None:
                coro, fut = job
                try:
                    fut.set_result(await coro)
                except Exception as exc:
                    fut.set_exception(exc)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await ``coro`` in the holding task."""
        fut: asyncio.Future[T] = self.loop.create_future()
        self.jobs.put_nowait((coro, fut))
        either: list[asyncio.Future[Any]] = [fut, self.task]
        self.loop.run_until_complete(asyncio.wait(either, return_when="FIRST_COMPLETED"))
        if not fut.done():
            coro.close()
            self.task.result()  # the client failed to start: its error
        return fut.result()

    def loop_of(self, body: Body) -> Loop:
        """A harness loop running ``body(n)`` in the holding task."""
        return lambda n: self.run(body(n))

    def close(self) -> None:
        """Leave the client's context (in the holding task) and end the task."""
        self.jobs.put_nowait(None)
        self.loop.run_until_complete(self.task)


HELD: dict[str, _Held] = {}
"""The peers whose rows run in a holding task, by peer id."""


# -- the server's ceilings -------------------------------------------------------------------------


def _zeal_commands(store: Any, table: str) -> dict[str, list[str]]:
    """The commands zeal sends for get, set and incr of ``KEY`` (what RedisRows builds)."""
    from zeal_asgi.store.backends.redis.rows import INCR_INT, SET

    backend = store.backend
    spec = store.spec(table)
    t = backend._table(spec)
    raw, row_key = t.key(KEY)
    keys, head = [row_key, t.members], [*t.head, raw]
    codec = t  # the table's record is its RowCodec
    fields = codec.encode(ROW)
    flat = [x for kv in fields.items() for x in kv]
    set_argv = [*head, 0, *flat]  # every column given: no zeros
    lo, hi = spec.schema.column("score", table).int_range
    incr_argv = [*head, "score", 1, lo, hi, b"1", *t.others["score"]]

    def words(args: Sequence[Any]) -> list[str]:
        return [a.decode() if isinstance(a, bytes) else str(a) for a in args]

    return {
        "get": words(["HGETALL", row_key]),
        "set": words(["EVALSHA", SET.sha, len(keys), *keys, *set_argv]),
        "incr": words(["EVALSHA", INCR_INT.sha, len(keys), *keys, *incr_argv]),
    }


def _redis_benchmark(port: int, pipeline: int, command: list[str], n: int) -> float:
    """Requests per second of ``redis-benchmark -c 1 -P pipeline`` running ``command``."""
    exe = shutil.which("redis-benchmark")
    if exe is None:
        raise NotInstalled("not installed (redis-benchmark)")
    argv = [exe, "-h", "127.0.0.1", "-p", str(port), "-c", "1", "-P", str(pipeline)]
    argv += ["-n", str(n), "--csv", *command]
    out = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True).stdout
    rows = list(csv.reader(io.StringIO(out)))
    return float(rows[1][1])


def _ceilings(env: Env, cfg: Config, store: Any, table: str) -> list[Result]:
    commands = _zeal_commands(store, table)
    out = []
    for pipeline in (1, 16):
        n = (20_000 if pipeline == 1 else 200_000) * (1 if cfg.quick else 5)
        for op in OPS:
            base = RowId(
                suite=NAME,
                op=op,
                candidate_id=f"redis-benchmark:P{pipeline}",
                candidate=f"redis-benchmark -c 1 -P {pipeline}",
                mode="c1 zeal's own commands (HGETALL, EVALSHA of its set and incr scripts)",
            )
            try:
                reps = [
                    _redis_benchmark(env.redis_port or 0, pipeline, commands[op], n)
                    for _ in range(1 if cfg.quick else 3)
                ]
            except (NotInstalled, OSError, subprocess.SubprocessError, ValueError) as exc:
                out.append(Result(**base, status=short_error(exc)))
                continue
            ops = statistics.median(reps)
            out.append(Result(**base, ops_per_s=ops, ns_per_op=1e9 / ops, iters=n, reps_ops=reps))
            log(f"[{NAME}] redis-benchmark -P {pipeline} {op}: {fmt_ops(ops)} ops/s")
    return out


async def _connections_at_64(env: Env, store: Any, table: str, seconds: float) -> int:
    """Most Redis connections other than the sampler's while 64 coroutines call zeal."""
    aioredis = need("redis.asyncio", "redis")
    sampler = aioredis.Redis(host="127.0.0.1", port=env.redis_port)
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    peak = 0
    row = dict(ROW)

    async def caller(i: int) -> None:
        while loop.time() < stop:
            match i % 3:
                case 0:
                    await store.get(table, KEY)
                case 1:
                    await store.set(table, KEY, row)
                case _:
                    await store.incr(table, KEY, "score")

    async def sample() -> None:
        nonlocal peak
        while loop.time() < stop:
            peak = max(peak, len(await sampler.client_list()) - 1)
            await asyncio.sleep(0.02)

    try:
        await asyncio.gather(sample(), *(caller(i) for i in range(64)))
    finally:
        await sampler.aclose()
    return peak


# -- the section -----------------------------------------------------------------------------------


@dataclasses.dataclass
class PipelineRun:
    """What the concurrency section measured."""

    results: list[Result]
    connections: int | None
    exact: str


def _measure(cfg: Config, env: Env, out: Measured) -> PipelineRun:
    counted = Counted()
    peers: list[tuple[str, str, Callable[..., tuple[str, Calls]]]] = [
        ("zeal-redis", "zeal Store, redis backend", lambda s, e: _zeal(s, e, counted, True)),
        ("zeal-nopipe", "zeal Store, redis backend", lambda s, e: _zeal(s, e, None, False)),
        ("redis-py", "redis-py asyncio (hiredis)", _redis_py(False)),
        ("redis-py-1", "redis-py asyncio (hiredis)", _redis_py(True)),
        ("coredis", "coredis", _coredis),
        ("glide", "valkey-glide", _glide),
    ]
    results: list[Result] = []
    exact = "not measured"
    HELD.clear()
    with contextlib.ExitStack() as stack:
        rows: list[Row] = []
        zeal_store: Any = None
        for cid, name, setup in peers:
            try:
                mode, calls = setup(stack, env)
            except Exception as exc:
                log(f"[{NAME}] {name} ({cid}): {exc}")
                for op, conc in itertools.product(OPS, CONCURRENCY):
                    status = str(exc) if isinstance(exc, NotInstalled) else short_error(exc)
                    results.append(Result(NAME, op, f"{cid}:c{conc}", name, DASH, status=status))
                continue
            if cid == "zeal-redis":
                from zeal_asgi import Store

                zeal_store = Store.default()
            looper = HELD[cid].loop_of if cid in HELD else env.runner.loop_of
            for op, conc in itertools.product(OPS, CONCURRENCY):
                loop = looper(fanout(calls[op], conc))
                rows.append(Row(f"{cid}:c{conc}", name, op, f"c{conc} {mode}", loop))
        table = zeal_store.names()[0] if zeal_store is not None else None
        before = env.runner.run(zeal_store.get_strict(table, KEY, "score")) if table else None
        for op in OPS:
            for conc in CONCURRENCY:
                todo = [r for r in rows if r.op == op and r.mode.startswith(f"c{conc} ")]
                for res, cpu in measure_rows(NAME, todo, cfg):
                    results.append(res)
                    out.add(res, "pipeline", cpu)
        if table is not None:
            now = env.runner.run(zeal_store.get_strict(table, KEY, "score"))
            ok = now - before == counted.calls
            exact = (
                f"{now - before:,} = {counted.calls:,} increments"
                if ok
                else (f"{now - before:,} vs {counted.calls:,} increments")
            )
            for r in results:
                if r.candidate_id.startswith("zeal") and r.op == "incr":
                    r.exact = ok
            results += _ceilings(env, cfg, zeal_store, table)
    connections: int | None = None
    with contextlib.ExitStack() as stack:
        table = _table_name("conn")
        store = _make_store(stack, env, "redis", {"url": env.redis_url, "prefix": table}, table)
        seconds = 0.3 if cfg.quick else 2.0
        connections = env.runner.run(_connections_at_64(env, store, table, seconds))
        log(f"[{NAME}] CLIENT LIST at 64 coroutines: {connections}")
    return PipelineRun(results, connections, exact)


def _find(results: Sequence[Result], cid: str, op: str) -> float | None:
    for r in results:
        if r.candidate_id == cid and r.op == op and r.status == "ok":
            return r.ops_per_s
    return None


def _ratio_targets(run: PipelineRun) -> list[Target]:
    res = run.results
    out: list[Target] = []

    def each(
        label: str, conc: int, other: Callable[[str], tuple[str, float | None]], floor: float
    ) -> None:
        texts, oks = [], []
        for op in OPS:
            zeal = _find(res, f"zeal-redis:c{conc}", op)
            who, ref = other(op)
            if zeal is None or ref is None:
                texts.append(f"{op}: not measured")
                continue
            oks.append(zeal / ref >= floor)
            texts.append(f"{op} {zeal / ref:.2f}{TIMES} ({fmt_ops(zeal)} vs {fmt_ops(ref)} {who})")
        out.append(Target(label, "; ".join(texts), all(oks) if len(oks) == len(OPS) else None))

    each(
        f"64 coroutines: \u2265 3{TIMES} redis-py asyncio (default pool)",
        64,
        lambda op: ("redis-py", _find(res, "redis-py:c64", op)),
        3.0,
    )

    def best(op: str) -> tuple[str, float | None]:
        found = [
            (name, v)
            for name in ("redis-py", "redis-py-1", "coredis", "glide")
            if (v := _find(res, f"{name}:c64", op)) is not None
        ]
        return max(found, key=lambda f: f[1]) if found else ("", None)

    each(f"64 coroutines: \u2265 1.5{TIMES} the best other client", 64, best, 1.5)
    each(
        "64 coroutines: \u2265 15% of the pipelined ceiling (redis-benchmark -c 1 -P 16)",
        64,
        lambda op: ("-P 16", _find(res, "redis-benchmark:P16", op)),
        0.15,
    )
    each(
        "1 coroutine: \u2265 50% of the one-round-trip ceiling (redis-benchmark -c 1 -P 1)",
        1,
        lambda op: ("-P 1", _find(res, "redis-benchmark:P1", op)),
        0.5,
    )
    label = "64 coroutines: Redis CLIENT LIST connections of the worker \u2264 2"
    n = run.connections
    out.append(Target(label, DASH if n is None else str(n), None if n is None else n <= 2))
    out.append(
        Target("zeal incr under concurrency: the counter ends exact", run.exact, "=" in run.exact)
    )
    return out


def _table(run: PipelineRun) -> str:
    head = "| Client | Mode | " + " | ".join(f"{op} c{c}" for op in OPS for c in CONCURRENCY)
    lines = [head + " |", "|---|---|" + "---:|" * (len(OPS) * len(CONCURRENCY))]
    seen: dict[str, tuple[str, str]] = {}
    for r in run.results:
        cid = r.candidate_id.rsplit(":c", 1)[0] if ":c" in r.candidate_id else r.candidate_id
        seen.setdefault(cid, (r.candidate, r.mode.split(" ", 1)[-1] if r.mode else DASH))
    for cid, (name, mode) in seen.items():
        cells = []
        for op in OPS:
            for conc in CONCURRENCY:
                rid = f"{cid}:c{conc}" if not cid.startswith("redis-benchmark") else cid
                hit = [r for r in run.results if r.candidate_id == rid and r.op == op]
                if (cid.startswith("redis-benchmark") and conc != 1) or not hit:
                    cells.append(DASH)
                elif hit[0].status != "ok":
                    cells.append(hit[0].status)
                else:
                    cells.append(fmt_ops(hit[0].ops_per_s))
        lines.append(f"| {name} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def pipeline_section(cfg: Config, env: Env, out: Measured) -> tuple[str, list[Target]]:
    """Measure the concurrency rows; their markdown section and targets."""
    run = _measure(cfg, env, out)
    targets = _ratio_targets(run)
    text = (
        "### Redis under concurrency: automatic pipelining\n\n"
        "ops/s of one event loop in one process with 1, 8 and 64 coroutines awaiting the same "
        "call (median of the reps, the rows of one operation and concurrency measured rep by rep "
        "in turn). zeal calls `await Store.get/set/incr` with the default options (one pipelined "
        "connection, `pool_size` 64); `auto_pipeline=False` sends one command at a time per "
        "connection. The peers send `HGETALL` / `HSET` / `HINCRBY` on a hash row (zeal's set and "
        "incr are Lua scripts doing more). The `redis-benchmark` rows are the server's ceilings "
        "with its C client on one connection, sending zeal's own commands, one per round trip "
        "(`-P 1`, shown under c1) or 16 per round trip (`-P 16`). Connections while 64 "
        f"coroutines call zeal: {DASH if run.connections is None else run.connections} "
        "(Redis `CLIENT LIST`, the sampling client excluded).\n\n" + _table(run) + "\n\n" + WHY
    )
    return text, targets


WHY = (
    "Reading the targets: zeal's `set` and `incr` are Lua scripts (a merge with membership, a "
    "range-checked increment) that cost Redis several times a plain `HSET`/`HINCRBY`: the "
    "server's own pipelined ceiling for them (`-P 16`) is a fraction of its `HGETALL` ceiling, "
    "while the peers' rows send the plain commands, so the ratios against the peers for these "
    "two operations compare different server work (the scripts are kept lean: on a row that "
    "exists, `set` is one `HSET` and `incr` one `HINCRBY` or `HGET`/`HSET` inside the script, "
    "zeros and membership being written only by the write that creates the row, `incr` answers "
    "with the new value as an integer reply, and the client packs each call from a per-table "
    "template, the column ranges and zero fields encoded once). Client, server and the load "
    "generator share "
    "the machine's 2 cores (rows marked \u2020 in the tables above ran while other processes "
    "kept them busy): with 64 coroutines in flight the client, Redis and everything else on the "
    "machine compete for the same CPU, and the Lua-heavy rows need the most of Redis's share."
)


# -- the facade ------------------------------------------------------------------------------------


def facade_section(cfg: Config, env: Env, out: Measured) -> tuple[str, list[Target]]:
    """``Store.get`` / ``Cache.get`` on the class against the instance (table backend)."""
    from zeal_asgi import Cache, Store
    from zeal_asgi.shm.segments import destroy

    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        table = _table_name("f")
        store = _make_store(stack, env, "table", None, table)
        stack.callback(destroy, store.table(table))
        tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix="zeal-bench-"))
        cache = Cache(cache_dir=os.path.join(tmp, "c"), gc_interval_ms=0, store=store)
        stack.callback(cache.close)
        stack.callback(Cache.set_default, None)
        Cache.set_default(cache)
        env.runner.run(cache.set(KEY, dict(ROW)))

        async def store_class(n: int) -> None:
            s, t, k = Store, table, KEY
            for _ in itertools.repeat(None, n):
                await s.get(t, k)

        async def store_inst(n: int) -> None:
            s, t, k = store, table, KEY
            for _ in itertools.repeat(None, n):
                await s.get(t, k)

        async def cache_class(n: int) -> None:
            c, k = Cache, KEY
            for _ in itertools.repeat(None, n):
                await c.get(k)

        async def cache_inst(n: int) -> None:
            c, k = cache, KEY
            for _ in itertools.repeat(None, n):
                await c.get(k)

        lp = env.runner.loop_of
        rows = [
            Row(
                "facade:store-class", "zeal Store", "get", "await Store.get(t, k)", lp(store_class)
            ),
            Row("facade:store-inst", "zeal Store", "get", "await store.get(t, k)", lp(store_inst)),
            Row("facade:cache-class", "zeal Cache", "get", "await Cache.get(k)", lp(cache_class)),
            Row("facade:cache-inst", "zeal Cache", "get", "await cache.get(k)", lp(cache_inst)),
        ]
        measured = measure_rows(NAME, rows, dataclasses.replace(cfg, reps=2 * cfg.reps - 1))
    for one, cpu in measured:
        out.add(one, "facade", cpu)
    res = [r for r, _ in measured]
    targets = []
    lines = ["| Call | ops/s | ns/op |", "|---|---:|---:|"]
    lines += [f"| `{r.mode}` | {fmt_ops(r.ops_per_s)} | {fmt_ns(r.ns_per_op)} |" for r in res]
    for what in ("store", "cache"):
        cls_ = _find(res, f"facade:{what}-class", "get")
        inst = _find(res, f"facade:{what}-inst", "get")
        name = what.capitalize()
        label = f"`await {name}.get` on the class within 1.15{TIMES} of the instance (table)"
        speed = f"`await {name}.get` on the class \u2265 3,000,000 ops/s (table backend)"
        if cls_ is None or inst is None:
            targets += [Target(label, "not measured", None), Target(speed, "not measured", None)]
            continue
        ratio = inst / cls_
        text = f"{ratio:.2f}{TIMES} the instance's time ({fmt_ops(cls_)} vs {fmt_ops(inst)} ops/s)"
        targets.append(Target(label, text, ratio <= 1.15))
        text = f"{fmt_ops(cls_)} ops/s ({fmt_ns(1e9 / cls_)} ns)"
        targets.append(Target(speed, text, cls_ >= 3e6))
    text = (
        "### The class-level facade\n\n"
        "The same call on the class (the process's default, as the seed and the README write it) "
        f"and on the instance, table backend, one coroutine, median of {2 * cfg.reps - 1} reps "
        "rep by rep in turn:\n\n" + "\n".join(lines)
    )
    return text, targets
