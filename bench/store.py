"""Suite ``store``: ``await Store.get/set/incr`` on every backend, beside what users call instead.

The same row, key and calls through the class-level facade (``await Store.get(table, key)``)
on the table, redis, tiered and memcached backends; beside them, on the same servers: raw
redis-py (hash and string commands, and the very Lua scripts the facade sends), aiocache and
cashews on the same Redis, raw aiomcache on the same memcached, and aiocache / cashews memory
caches next to the table backend.  Every async row runs in one event loop (uvloop when
installed) and awaits one call at a time, as a request handler does.  Rows compared with each
other are measured in one group, rep by rep in turn, so drift of a shared machine hits them
alike.  A layer-by-layer breakdown of the redis backend's ``get`` shows where its time goes.

The async and reporting helpers at the top are shared with the ``cache`` and ``pubsub`` suites.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import itertools
import os
import shutil
import statistics
import subprocess
import time
import traceback
from collections.abc import Awaitable, Callable, Coroutine, Iterator, Sequence
from typing import Any, TypeVar

from tests._harness.servers import Memcached

from ._harness import (
    BUSY,
    DASH,
    TIMES,
    Config,
    CpuWatch,
    Loop,
    NotInstalled,
    Result,
    RowId,
    SuiteReport,
    Timing,
    calibrate,
    dist_version,
    fmt_iters,
    fmt_ns,
    fmt_ops,
    fmt_ratio,
    log,
    machine_info,
    need,
    now_utc,
    redis_server,
    redis_server_version,
    wait_quiet,
)

__all__ = [
    "NAME",
    "TITLE",
    "AsyncRunner",
    "Row",
    "Target",
    "acall1",
    "acall2",
    "acall3",
    "measure_rows",
    "memcached_version",
    "row_table",
    "run",
    "short_error",
    "target_table",
]

NAME = "store"
TITLE = "Store facade on every backend vs redis-py, aiocache, cashews, aiomcache"

ROW: dict[str, Any] = {"name": "alice", "score": 100}
KEY = "user:5"
COUNTER = "counter"
"""Peers without row columns increment this int key (their natural counter)."""
ROWS = 100
SECRET = "zeal-bench-invalidation-secret-0123456789"
PACKAGES = ("zeal-asgi", "redis", "hiredis", "aiocache", "cashews", "aiomcache", "uvloop")

T = TypeVar("T")
Body = Callable[[int], Coroutine[Any, Any, None]]
"""An async loop body: awaits one operation ``n`` times."""


# -- helpers shared with the cache and pubsub suites --------------------------------------------


class AsyncRunner:
    """The one event loop every async row of a suite runs on: uvloop when installed.

    ``loop_of(body)`` turns an async body into a harness :data:`Loop` (one
    ``run_until_complete`` per rep: microseconds against reps of ~0.4 s).
    """

    def __init__(self) -> None:
        if importlib.util.find_spec("uvloop") is not None:
            import uvloop

            self.loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
            self.kind = f"uvloop {dist_version('uvloop')}"
        else:
            self.loop = asyncio.new_event_loop()
            self.kind = "asyncio (uvloop not installed)"
        # some peers look the loop up when they are built, outside any coroutine
        asyncio.set_event_loop(self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` to completion on this loop."""
        return self.loop.run_until_complete(coro)

    def loop_of(self, body: Body) -> Loop:
        """A harness loop that runs ``body(n)`` on this event loop."""

        def loop(n: int) -> None:
            self.loop.run_until_complete(body(n))

        return loop

    def close(self) -> None:
        """Cancel what is left, then close the loop (async generators and executor too)."""
        loop = self.loop
        pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.run_until_complete(loop.shutdown_default_executor())
        loop.close()
        asyncio.set_event_loop(None)


def acall1(fn: Callable[[Any], Awaitable[object]], a: Any) -> Body:
    """Body awaiting ``fn(a)``."""

    async def body(n: int) -> None:
        f, x = fn, a
        for _ in itertools.repeat(None, n):
            await f(x)

    return body


def acall2(fn: Callable[[Any, Any], Awaitable[object]], a: Any, b: Any) -> Body:
    """Body awaiting ``fn(a, b)``."""

    async def body(n: int) -> None:
        f, x, y = fn, a, b
        for _ in itertools.repeat(None, n):
            await f(x, y)

    return body


def acall3(fn: Callable[[Any, Any, Any], Awaitable[object]], a: Any, b: Any, c: Any) -> Body:
    """Body awaiting ``fn(a, b, c)``."""

    async def body(n: int) -> None:
        f, x, y, z = fn, a, b, c
        for _ in itertools.repeat(None, n):
            await f(x, y, z)

    return body


def short_error(exc: BaseException) -> str:
    """``failed: Type: first line`` for a row that could not be measured."""
    first = str(exc).strip().splitlines()
    return f"failed: {type(exc).__name__}" + (f": {first[0][:100]}" if first else "")


@dataclasses.dataclass
class Row:
    """One row to measure: candidate, operation, idiom and its loop."""

    cid: str
    """Candidate id (``zeal-redis``, ``redis-py:string``, ...)."""
    name: str
    op: str
    mode: str
    loop: Loop


def measure_rows(suite: str, rows: Sequence[Row], cfg: Config) -> list[tuple[Result, float]]:
    """Measure ``rows`` rep by rep in turn, so drift of a shared machine hits them alike.

    Each row is calibrated (the warm-up) first; then every rep runs each row once.  Returns
    each row's :class:`Result` and its median CPU time per operation in this process (ns): the
    client's own cost, whatever the servers and other processes do.  A row that raises is
    reported as failed and left out of the following reps.
    """
    wait_quiet(cfg.wait_quiet)
    iters: list[int] = []
    errors: dict[int, str] = {}
    for i, row in enumerate(rows):
        try:
            iters.append(cfg.iters_for(calibrate(row.loop, cfg)))
        except Exception as exc:
            log(traceback.format_exc())
            errors[i] = short_error(exc)
            iters.append(0)
    wall: list[list[float]] = [[] for _ in rows]
    cpu: list[list[float]] = [[] for _ in rows]
    watch = CpuWatch.start()
    for _ in range(cfg.reps):
        for i, row in enumerate(rows):
            if i in errors:
                continue
            n = iters[i]
            c0, t0 = time.process_time(), time.perf_counter()
            try:
                row.loop(n)
            except Exception as exc:
                log(traceback.format_exc())
                errors[i] = short_error(exc)
                continue
            wall[i].append((time.perf_counter() - t0) * 1e9 / n)
            cpu[i].append((time.process_time() - c0) * 1e9 / n)
    background = watch.stop()["other_processes"]
    out: list[tuple[Result, float]] = []
    for i, row in enumerate(rows):
        base = RowId(
            suite=suite, op=row.op, candidate_id=row.cid, candidate=row.name, mode=row.mode
        )
        if i in errors:
            out.append((Result(**base, status=errors[i]), 0.0))
        else:
            timing = Timing(iters[i], wall[i], background)
            out.append((Result.from_timing(base, timing), statistics.median(cpu[i])))
    return out


@dataclasses.dataclass
class Target:
    """One target of the issue, checked against this run."""

    target: str
    measured: str
    met: bool | None


def target_table(targets: Sequence[Target]) -> str:
    """Markdown table of the targets."""
    met = {True: "**yes**", False: "**NO**", None: DASH}
    lines = ["| Target (issue) | Measured | Met |", "|---|---|---|"]
    lines += [f"| {t.target} | {t.measured} | {met[t.met]} |" for t in targets]
    return "\n".join(lines)


def row_table(
    rows: Sequence[Result],
    ref: Callable[[Result], float | None],
    ref_label: str,
    cpu: Callable[[Result], float | None] | None = None,
) -> str:
    """Markdown table of ``rows``; the ratio column is ``ref(row)`` ops/s over the row's, and
    ``cpu(row)`` (when given) the client's CPU time per operation.

    Rows measured while other processes used more than a quarter of the CPUs are flagged.
    """
    head = ["Candidate", "Mode / idiom", "ops/s", "ns/op"]
    head += ["client CPU ns/op"] if cpu else []
    head += [ref_label, "iters"]
    lines = ["| " + " | ".join(head) + " |", "|---|---|" + "---:|" * (len(head) - 2)]
    flagged = False
    for r in rows:
        if r.status != "ok" or not r.ops_per_s:
            cells = [r.candidate, r.mode, r.status] + [DASH] * (len(head) - 3)
        else:
            ops = fmt_ops(r.ops_per_s)
            if r.background is not None and r.background > BUSY:
                ops += " \u2020"
                flagged = True
            base = ref(r)
            cells = [r.candidate, r.mode, ops, fmt_ns(r.ns_per_op)]
            cells += [fmt_ns(cpu(r))] if cpu else []
            cells += [fmt_ratio(base / r.ops_per_s if base else None), fmt_iters(r.iters)]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    if flagged:
        lines.append(
            f"\n\u2020 other processes used more than {BUSY:.0%} of the CPUs while this row "
            "was measured: expect it to be slower than on an idle machine."
        )
    return "\n".join(lines)


def memcached_version() -> str | None:
    """``1.6.18``, or ``None`` when memcached is not on PATH."""
    exe = shutil.which("memcached")
    if exe is None:
        return None
    try:
        out = subprocess.run([exe, "-V"], capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    return out.split()[-1] if out.split() else "unknown"


# -- candidates --------------------------------------------------------------------------------


@dataclasses.dataclass
class Env:
    """What every candidate's setup may use: the loop and the one server of each kind."""

    runner: AsyncRunner
    redis_port: int | None
    memcached_port: int | None

    @property
    def redis_url(self) -> str:
        """``redis://127.0.0.1:PORT/0`` (NotInstalled without a redis-server)."""
        if self.redis_port is None:
            raise NotInstalled("not installed (redis-server)")
        return f"redis://127.0.0.1:{self.redis_port}/0"

    @property
    def memcached(self) -> str:
        """``127.0.0.1:PORT`` (NotInstalled without memcached)."""
        if self.memcached_port is None:
            raise NotInstalled("not installed (memcached)")
        return f"127.0.0.1:{self.memcached_port}"


Spec = tuple[str, str, Loop, str]
"""``(op, mode, loop, variant)`` of one row of a peer."""
Factory = Callable[[contextlib.ExitStack[Any], Env], list[Spec]]


@dataclasses.dataclass(frozen=True)
class Peer:
    """A candidate: its rows, set up by ``factory`` (resources go on the exit stack)."""

    id: str
    name: str
    ops: tuple[str, ...]
    factory: Factory


@dataclasses.dataclass(frozen=True)
class Group:
    """Candidates measured together, each operation interleaved rep by rep."""

    family: str
    """``table``, ``redis``, ``tiered``, ``memcached`` or ``breakdown``."""
    peers: tuple[Peer, ...]


def _table_name(tag: str) -> str:
    return f"bench_{tag}_{os.getpid()}"


def _make_store(
    stack: contextlib.ExitStack[Any], env: Env, kind: str, conn: Any, table: str
) -> Any:
    """A started Store serving ``table`` (rows written), set as the process's default."""
    from zeal_asgi import Store

    store = Store(kind, conn)
    store.make(table, 1024, {"name": (Store.TYPE_STRING, 32), "score": (Store.TYPE_INT, 8)})
    stack.callback(Store.set_default, None)
    env.runner.run(store.start())
    stack.callback(lambda: env.runner.run(store.aclose()))
    Store.set_default(store)
    for i in range(ROWS):
        env.runner.run(store.set(table, f"user:{i}", dict(ROW)))
    return store


def _store_specs(runner: AsyncRunner, table: str, what: str) -> list[Spec]:
    """get / set / incr through the class-level facade, as application code writes them."""
    from zeal_asgi import Store

    row = dict(ROW)

    async def get(n: int) -> None:
        s, t, k = Store, table, KEY
        for _ in itertools.repeat(None, n):
            await s.get(t, k)

    async def set_(n: int) -> None:
        s, t, k, r = Store, table, KEY, row
        for _ in itertools.repeat(None, n):
            await s.set(t, k, r)

    async def incr(n: int) -> None:
        s, t, k = Store, table, KEY
        for _ in itertools.repeat(None, n):
            await s.incr(t, k, "score")

    return [
        ("get", f"await Store.get(t, k){what}", runner.loop_of(get), ""),
        ("set", "await Store.set(t, k, row)", runner.loop_of(set_), ""),
        ("incr", "await Store.incr(t, k, 'score')", runner.loop_of(incr), ""),
    ]


def _zeal_table(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    from zeal_asgi.shm.segments import destroy

    table = _table_name("t")
    store = _make_store(stack, env, "table", None, table)
    stack.callback(destroy, store.table(table))
    specs = _store_specs(env.runner, table, " -> dict")
    instance = env.runner.loop_of(acall2(store.get, table, KEY))
    specs.insert(1, ("get", "await store.get(t, k): the instance (get_store)", instance, "inst"))
    return specs


def _raw_table(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    from zeal_asgi import Table
    from zeal_asgi.shm.segments import destroy

    t = Table(1024, {"name": ("string", 32), "score": ("int", 8)}, name=_table_name("raw"))
    stack.callback(destroy, t)
    for i in range(ROWS):
        t.set(f"user:{i}", dict(ROW))
    row = dict(ROW)

    def get(n: int) -> None:
        f, k = t.get, KEY
        for _ in itertools.repeat(None, n):
            f(k)

    def set_(n: int) -> None:
        f, k, r = t.set, KEY, row
        for _ in itertools.repeat(None, n):
            f(k, r)

    def incr(n: int) -> None:
        f, k = t.incr, KEY
        for _ in itertools.repeat(None, n):
            f(k, "score")

    return [
        ("get", "t.get(k): the shared Table itself, sync, no await", get, ""),
        ("set", "t.set(k, row), sync", set_, ""),
        ("incr", "t.incr(k, 'score'), sync", incr, ""),
    ]


def _aiocache(redis: bool) -> Factory:
    def factory(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
        aiocache = need("aiocache")
        if redis:
            env.redis_url  # noqa: B018 - NotInstalled without a server
            cache = aiocache.RedisCache(endpoint="127.0.0.1", port=env.redis_port, namespace="a")
        else:
            cache = aiocache.SimpleMemoryCache()
        stack.callback(lambda: env.runner.run(cache.close()))
        env.runner.run(cache.set(KEY, dict(ROW)))
        env.runner.run(cache.set(COUNTER, 0))
        loop = env.runner.loop_of
        note = " (JSON)" if redis else " (per process, the stored object)"
        return [
            ("get", f"await cache.get(k){note}", loop(acall1(cache.get, KEY)), ""),
            ("set", "await cache.set(k, row)", loop(acall2(cache.set, KEY, dict(ROW))), ""),
            ("incr", "await cache.increment(c)", loop(acall1(cache.increment, COUNTER)), ""),
        ]

    return factory


def _cashews(redis: bool) -> Factory:
    def factory(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
        cashews = need("cashews")
        cache = cashews.Cache()
        cache.setup(env.redis_url if redis else "mem://")
        stack.callback(lambda: env.runner.run(cache.close()))
        env.runner.run(cache.init())
        env.runner.run(cache.set(KEY, dict(ROW)))
        env.runner.run(cache.set(COUNTER, 0))
        loop = env.runner.loop_of
        note = " (pickle)" if redis else " (per process)"
        return [
            ("get", f"await cache.get(k){note}", loop(acall1(cache.get, KEY)), ""),
            ("set", "await cache.set(k, row)", loop(acall2(cache.set, KEY, dict(ROW))), ""),
            ("incr", "await cache.incr(c)", loop(acall1(cache.incr, COUNTER)), ""),
        ]

    return factory


def _zeal_redis(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    table = _table_name("r")
    _make_store(stack, env, "redis", {"url": env.redis_url}, table)
    return _store_specs(env.runner, table, " -> dict (HGETALL, decoded)")


def _redis_client(stack: contextlib.ExitStack[Any], env: Env, **kw: Any) -> Any:
    aioredis = need("redis.asyncio", "redis")
    env.redis_url  # noqa: B018 - NotInstalled without a server
    r = aioredis.Redis(host="127.0.0.1", port=env.redis_port, **kw)
    stack.callback(lambda: env.runner.run(r.aclose()))
    return r


def _redis_py(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    orjson = need("orjson")
    r = _redis_client(stack, env)
    hkey, skey = b"raw:h:" + KEY.encode(), b"raw:s:" + KEY.encode()
    blob = orjson.dumps(ROW)
    env.runner.run(r.hset(hkey, mapping=ROW))
    env.runner.run(r.set(skey, blob))
    env.runner.run(r.set(COUNTER, 0))
    loop = env.runner.loop_of

    async def hset(n: int) -> None:
        f, k, row = r.hset, hkey, dict(ROW)
        for _ in itertools.repeat(None, n):
            await f(k, mapping=row)

    return [
        ("get", "await r.hgetall(k): bytes fields, not decoded", loop(acall1(r.hgetall, hkey)), ""),
        ("set", "await r.hset(k, mapping=row)", loop(hset), ""),
        ("incr", "await r.hincrby(k, 'score', 1)", loop(acall3(r.hincrby, hkey, "score", 1)), ""),
        ("get", "await r.get(k): a Redis GET, bytes", loop(acall1(r.get, skey)), "string"),
        ("set", "await r.set(k, blob): orjson blob", loop(acall2(r.set, skey, blob)), "string"),
        ("incr", "await r.incr(c)", loop(acall1(r.incr, COUNTER)), "string"),
    ]


def _redis_scripts(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    """redis-py running the facade's own Lua scripts with the facade's KEYS and ARGV: the
    difference to the facade is its Python side alone."""
    from zeal_asgi import Store
    from zeal_asgi.store.backends.redis.rows import INCR_INT, SET

    r = _redis_client(stack, env)
    store = Store("redis", {"url": env.redis_url, "prefix": "zscript"})  # never connects
    table = _table_name("s")
    store.make(table, 1024, {"name": (Store.TYPE_STRING, 32), "score": (Store.TYPE_INT, 8)})
    backend: Any = store.backend
    spec = store.spec(table)
    # what RedisRows.set / RedisRows.incr send for this row (zeal_asgi/store/backends/redis/rows.py)
    t = backend._table(spec)
    codec = t  # the table's record is its RowCodec
    raw, row_key = t.key(KEY)
    keys, head = [row_key, t.members], [*t.head, raw]
    fields = codec.encode(ROW)
    zeros = codec.zero_fields(fields)
    set_argv = [*head, len(zeros), *zeros, *(x for kv in fields.items() for x in kv)]
    lo, hi = spec.schema.column("score", table).int_range
    incr_argv = [*head, "score", 1, lo, hi, b"1", *t.others["score"]]
    env.runner.run(SET(r, keys, set_argv))  # loads the scripts
    env.runner.run(INCR_INT(r, keys, incr_argv))

    def evalsha(sha: str, argv: list[Any]) -> Loop:
        async def body(n: int) -> None:
            f, ks, nk = r.evalsha, keys, len(keys)
            for _ in itertools.repeat(None, n):
                await f(sha, nk, *ks, *argv)

        return env.runner.loop_of(body)

    what = "script, same KEYS/ARGV as the facade"
    return [
        ("set", f"await r.evalsha(zeal's SET {what})", evalsha(SET.sha, set_argv), ""),
        ("incr", f"await r.evalsha(zeal's INCR {what})", evalsha(INCR_INT.sha, incr_argv), ""),
    ]


def _zeal_tiered(ttl: float, what: str, prefix: str) -> Factory:
    def factory(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
        conn = {"url": env.redis_url, "prefix": prefix, "l1_ttl": ttl}
        conn["invalidation_secret"] = SECRET
        table = _table_name(prefix)
        store = _make_store(stack, env, "tiered", conn, table)
        stack.callback(store.backend.close_shared)
        env.runner.run(_wait_synced(store.backend))
        env.runner.run(store.set(table, KEY, dict(ROW)))  # a whole row: L1 holds it now
        specs = _store_specs(env.runner, table, what)
        return specs if ttl > 1 else specs[:1]

    return factory


async def _wait_synced(backend: Any, within: float = 10.0) -> None:
    """Until the tiered backend's subscriber is up (L1 is not trusted before)."""
    deadline = asyncio.get_running_loop().time() + within
    while not backend.synced:
        if asyncio.get_running_loop().time() > deadline:
            raise RuntimeError(f"tiered backend: invalidation subscriber not ready in {within} s")
        await asyncio.sleep(0.01)


def _zeal_memcached(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    need("aiomcache")
    table = _table_name("m")
    _make_store(stack, env, "memcached", env.memcached, table)
    return _store_specs(env.runner, table, " -> dict (one blob per row)")


def _aiomcache(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    aiomcache = need("aiomcache")
    orjson = need("orjson")
    env.memcached  # noqa: B018 - NotInstalled without a server
    mc = aiomcache.Client("127.0.0.1", env.memcached_port)
    stack.callback(lambda: env.runner.run(mc.close()))
    key, ctr, blob = b"raw:" + KEY.encode(), COUNTER.encode(), orjson.dumps(ROW)
    env.runner.run(mc.set(key, blob))
    env.runner.run(mc.set(ctr, b"0"))
    loop = env.runner.loop_of
    return [
        ("get", "await mc.get(k): bytes, not decoded", loop(acall1(mc.get, key)), ""),
        ("set", "await mc.set(k, blob): orjson blob", loop(acall2(mc.set, key, blob)), ""),
        ("incr", "await mc.incr(c) (native)", loop(acall1(mc.incr, ctr)), ""),
    ]


def _breakdown(stack: contextlib.ExitStack[Any], env: Env) -> list[Spec]:
    """The layers of ``await Store.get`` on the redis backend, each measured on its own."""
    from zeal_asgi import Store

    aioredis = need("redis.asyncio", "redis")
    table = _table_name("b")
    store = _make_store(stack, env, "redis", {"url": env.redis_url, "prefix": "zb"}, table)
    backend: Any = store.backend
    spec = store.spec(table)
    key = backend.row_key(table, KEY)
    conn = backend._conn
    raw = _redis_client(stack, env)
    pool = aioredis.BlockingConnectionPool(
        host="127.0.0.1", port=env.redis_port, max_connections=conn.cfg.pool_size, timeout=0.1
    )
    # a client handed a pool does not close it: the pool's own disconnect runs after its aclose
    stack.callback(lambda: env.runner.run(pool.disconnect()))
    blocking = _redis_client(stack, env, connection_pool=pool)
    pooled = env.runner.run(backend.client())

    async def call_hgetall(n: int) -> None:
        call, args = conn.call, ("HGETALL", key)
        for _ in itertools.repeat(None, n):
            await call(args, "get", idempotent=True)

    async def facade(n: int) -> None:
        s, t, k = Store, table, KEY
        for _ in itertools.repeat(None, n):
            await s.get(t, k)

    loop = env.runner.loop_of
    layers = [
        ("redis-py, default pool: `await r.hgetall(k)`", acall1(raw.hgetall, key)),
        ("redis-py, BlockingConnectionPool", acall1(blocking.hgetall, key)),
        ("the backend's pooled client (pipelines; not on this path)", acall1(pooled.hgetall, key)),
        ("RedisConnector.call: slot, pipelined connection, time limit, counters", call_hgetall),
        ("+ RedisRows.get: key check, row decode", acall2(backend.get, spec, KEY)),
        ("+ Store instance: `await store.get(t, k)`", acall2(store.get, table, KEY)),
        ("+ class-level facade: `await Store.get(t, k)`", facade),
    ]
    return [("get", label, loop(body), str(i)) for i, (label, body) in enumerate(layers)]


GSI = ("get", "set", "incr")

GROUPS: tuple[Group, ...] = (
    Group(
        "table",
        (
            Peer("zeal-table", "zeal Store, table backend", GSI, _zeal_table),
            Peer("raw-table", "zeal Table (the floor)", GSI, _raw_table),
            Peer("aiocache-mem", "aiocache SimpleMemoryCache", GSI, _aiocache(False)),
            Peer("cashews-mem", "cashews mem://", GSI, _cashews(False)),
        ),
    ),
    Group(
        "redis",
        (
            Peer("zeal-redis", "zeal Store, redis backend", GSI, _zeal_redis),
            Peer("redis-py", "redis-py asyncio (hiredis)", GSI, _redis_py),
            Peer("redis-lua", "redis-py asyncio (hiredis)", ("set", "incr"), _redis_scripts),
            Peer("aiocache-redis", "aiocache RedisCache", GSI, _aiocache(True)),
            Peer("cashews-redis", "cashews redis://", GSI, _cashews(True)),
        ),
    ),
    Group(
        "tiered",
        (
            Peer(
                "zeal-tiered",
                "zeal Store, tiered backend",
                GSI,
                _zeal_tiered(3600.0, ": L1 hit (shared memory)", "ztier"),
            ),
        ),
    ),
    Group(
        "tiered",
        (
            Peer(
                "zeal-tiered-miss",
                "zeal Store, tiered backend",
                ("get",),
                _zeal_tiered(1e-9, ": L1 stale, read through L2 + refill", "zmiss"),
            ),
        ),
    ),
    Group(
        "memcached",
        (
            Peer("zeal-memcached", "zeal Store, memcached backend", GSI, _zeal_memcached),
            Peer("aiomcache", "aiomcache", GSI, _aiomcache),
        ),
    ),
    Group("breakdown", (Peer("layer", "redis backend get", ("get",), _breakdown),)),
)
"""Measured in this order; the report shows the rows grouped by operation."""


# -- running -----------------------------------------------------------------------------------


@dataclasses.dataclass
class Measured:
    """Every row of the run with the client CPU time per operation and its family."""

    results: list[Result] = dataclasses.field(default_factory=list)
    cpu: dict[int, float] = dataclasses.field(default_factory=dict)
    """``id(result)`` -> client CPU ns per operation."""
    family: dict[int, str] = dataclasses.field(default_factory=dict)

    def add(self, r: Result, family: str, cpu: float | None = None) -> None:
        """Record one row."""
        self.results.append(r)
        self.family[id(r)] = family
        if cpu:
            self.cpu[id(r)] = cpu


def _not_run(peer: Peer, status: str) -> list[Result]:
    return [
        Result(
            suite=NAME, op=op, candidate_id=peer.id, candidate=peer.name, mode=DASH, status=status
        )
        for op in peer.ops
    ]


def _run_group(group: Group, cfg: Config, env: Env, out: Measured) -> None:
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        for peer in group.peers:
            try:
                specs = peer.factory(stack, env)
            except NotInstalled as exc:
                log(f"[{NAME}] {peer.name} ({peer.id}): {exc}")
                for r in _not_run(peer, str(exc)):
                    out.add(r, group.family)
                continue
            except Exception as exc:  # setup failed: say so in its rows, go on
                log(traceback.format_exc())
                for r in _not_run(peer, short_error(exc)):
                    out.add(r, group.family)
                continue
            for op, mode, loop, variant in specs:
                cid = f"{peer.id}:{variant}" if variant else peer.id
                rows.append(Row(cid, peer.name, op, mode, loop))
        for op in GSI:
            todo = [r for r in rows if r.op == op]
            if not todo:
                continue
            # the layers differ by a few microseconds in ~100: more reps for a stabler median
            rcfg = (
                dataclasses.replace(cfg, reps=2 * cfg.reps - 1)
                if group.family == "breakdown"
                else cfg
            )
            for res, cpu in measure_rows(NAME, todo, rcfg):
                out.add(res, group.family, cpu)
                text = (
                    f"{fmt_ops(res.ops_per_s)} ops/s, {fmt_ns(res.ns_per_op)} ns, cpu {fmt_ns(cpu)}"
                    if res.status == "ok"
                    else res.status
                )
                log(f"[{NAME}] {res.candidate_id} {op}: {text}")


def _find(results: Sequence[Result], cid: str, op: str) -> Result | None:
    for r in results:
        if r.candidate_id == cid and r.op == op and r.status == "ok":
            return r
    return None


def _ops(r: Result | None) -> float | None:
    return r.ops_per_s if r is not None else None


_ZEAL_OF = {"table": "zeal-table", "redis": "zeal-redis", "tiered": "zeal-redis"}
_ZEAL_OF["memcached"] = "zeal-memcached"


def _overhead(
    results: Sequence[Result], baseline: str, ops: Sequence[tuple[str, str]], label: str
) -> Target:
    """How much the redis facade adds over ``baseline`` for each of ``ops``, as one target."""
    ratios: list[str] = []
    extras: list[float] = []
    for op, cmd in ops:
        zeal, raw = _find(results, "zeal-redis", op), _find(results, baseline, op)
        if zeal is None or raw is None or not zeal.ns_per_op or not raw.ns_per_op:
            ratios.append(f"{op}: not measured")
            continue
        extra = zeal.ns_per_op / raw.ns_per_op - 1
        extras.append(extra)
        zn, rn = fmt_ns(zeal.ns_per_op), fmt_ns(raw.ns_per_op)
        ratios.append(f"{op} {extra:+.0%} ({zn} vs {rn} ns {cmd})")
    met = max(extras) <= 0.15 if len(extras) == len(ops) else None
    return Target(label, "; ".join(ratios), met)


def _targets(results: Sequence[Result]) -> list[Target]:
    out = [
        _overhead(
            results,
            "redis-py",
            (("get", "HGETALL"), ("set", "HSET"), ("incr", "HINCRBY")),
            "redis backend: the facade adds \u2264 15% over raw redis-py (get, set, incr)",
        ),
        # set/incr are atomic Lua scripts (merge + membership, range check): the same comparison
        # against raw redis-py sending those very scripts (EVALSHA) isolates the facade's own cost
        _overhead(
            results,
            "redis-lua",
            (("set", "EVALSHA set"), ("incr", "EVALSHA incr")),
            "redis backend: set/incr add \u2264 15% over raw redis-py running the same Lua "
            "scripts (EVALSHA)",
        ),
    ]
    l1 = _find(results, "zeal-tiered", "get")
    rget = _find(results, "redis-py:string", "get")
    label = f"tiered: L1 hits \u2265 20{TIMES} faster than a Redis GET (redis-py, bytes)"
    if l1 is None or rget is None or not l1.ops_per_s or not rget.ops_per_s:
        out.append(Target(label, "not measured", None))
    else:
        x = l1.ops_per_s / rget.ops_per_s
        text = f"{fmt_ratio(x)} ({fmt_ns(l1.ns_per_op)} ns vs {fmt_ns(rget.ns_per_op)} ns)"
        if zget := _ops(_find(results, "zeal-redis", "get")):
            text += f"; vs the redis backend's Store.get: {fmt_ratio(l1.ops_per_s / zget)}"
        out.append(Target(label, text, x >= 20))
    tget = _find(results, "zeal-table", "get")
    label = "table backend: await Store.get \u2265 1,000,000 ops/s"
    if tget is None or tget.ops_per_s is None:
        out.append(Target(label, "not measured", None))
    else:
        text = f"{fmt_ops(tget.ops_per_s)} ops/s ({fmt_ns(tget.ns_per_op)} ns)"
        out.append(Target(label, text, tget.ops_per_s >= 1e6))
    return out


def _breakdown_table(m: Measured) -> str:
    lines = [
        "| Layer | ns/op | added | client CPU ns/op | added |",
        "|---|---:|---:|---:|---:|",
    ]
    prev: tuple[float, float] | None = None
    for r in m.results:
        if m.family[id(r)] != "breakdown":
            continue
        if r.status != "ok" or not r.ns_per_op:
            lines.append(f"| {r.mode} | {r.status} | {DASH} | {DASH} | {DASH} |")
            prev = None
            continue
        cpu = m.cpu.get(id(r), 0.0)
        if prev is None:
            dw = dc = DASH
        else:
            dw, dc = f"{r.ns_per_op - prev[0]:+,.0f}", f"{cpu - prev[1]:+,.0f}"
        lines.append(f"| {r.mode} | {fmt_ns(r.ns_per_op)} | {dw} | {fmt_ns(cpu)} | {dc} |")
        prev = (r.ns_per_op, cpu)
    return "\n".join(lines)


def _body(
    m: Measured, targets: Sequence[Target], cfg: Config, loop: str, extra: Sequence[str]
) -> str:
    zeal = {
        (fam, op): _ops(_find(m.results, cid, op)) for fam, cid in _ZEAL_OF.items() for op in GSI
    }

    def ref(r: Result) -> float | None:
        return zeal.get((m.family[id(r)], r.op))

    def cpu(r: Result) -> float | None:
        return m.cpu.get(id(r))

    sections = [
        "Reproduce: `python -m bench store` (~3 min; `--quick`: seconds). It starts its own "
        "redis-server and memcached on free loopback ports (rows say *not installed* when one "
        "is missing) and needs the `bench`, `redis` and `memcached` extras (aiocache, cashews, "
        "redis-py with hiredis, aiomcache).",
        f"Every row awaits one call at a time in one event loop ({loop}), as a request "
        f"handler does; median of {cfg.reps} reps of ~{cfg.rep_seconds:g} s after a warm-up, "
        "the rows of one backend measured rep by rep in turn. Row "
        f"`{ROW}` in a table `name STRING(32), score INT(8)`, one hot key, {ROWS} rows written "
        "first; zeal is called through the class-level facade (`await Store.get(t, k)` on the "
        "process's default store), as application code writes it. One redis-server (no "
        "persistence) serves every Redis row and one memcached every memcached row, on loopback, "
        "sharing the 2 cores with the benchmark. *client CPU* is this process's CPU time per "
        "operation (the client's own cost, kernel included). The ratio column is zeal's ops/s "
        "on the same backend (redis for the tiered rows, the table backend for the in-process "
        "peers) divided by the row's: how many times faster zeal is (below 1\u00d7: the row "
        "is faster).",
        "Peers return what their library returns: raw redis-py and aiomcache hand back "
        "undecoded bytes (the most favourable reading for them), aiocache's RedisCache JSON-"
        "decodes, cashews unpickles, the memory caches return the stored object itself; zeal "
        "returns a fresh typed dict. zeal's `set` merges the row and records its membership in "
        "one Lua script and `incr` range-checks in Lua; the `evalsha` rows run those very "
        "scripts from redis-py, so their difference to the facade is its Python side alone. On "
        "memcached a row is one blob, and `incr` on a 2-column row is a `gets`/`cas` pair (two "
        "round trips) where aiomcache increments a bare counter natively. The tiered backend's "
        "`set`/`incr` write to Redis, then publish an invalidation (two round trips).",
    ]
    for op in GSI:
        rows = [
            r
            for r in m.results
            if r.op == op and m.family[id(r)] not in ("breakdown", "pipeline", "facade")
        ]
        table = row_table(rows, ref, f"zeal (same backend) {TIMES}", cpu)
        sections.append(f"### {op}\n\n{table}")
    sections.append(
        "### Where the time goes: `await Store.get` on the redis backend\n\n"
        "Each layer measured on its own in this run, rep by rep in turn, from a raw client up to "
        "the class-level facade (same server, key and loop), median of "
        f"{2 * cfg.reps - 1} reps. On this VM one run moves a ~100 \u00b5s round trip by "
        "\u00b110-15 \u00b5s, so a single layer's *added* column is indicative; the sum over "
        "the layers (raw client to facade) is the robust figure:\n\n" + _breakdown_table(m)
    )
    sections += extra
    sections.append("### Targets\n\n" + target_table(targets))
    return "\n\n".join(sections)


@contextlib.contextmanager
def _servers() -> Iterator[tuple[int | None, int | None]]:
    """One redis-server and one memcached for the whole suite (``None``: not installed)."""
    with contextlib.ExitStack() as stack:
        redis_port: int | None = None
        try:
            redis_port = stack.enter_context(redis_server()).port
        except NotInstalled as exc:
            log(f"[{NAME}] {exc}: Redis rows are skipped")
        mc_port: int | None = None
        if shutil.which("memcached") is None:
            log(f"[{NAME}] memcached not installed: memcached rows are skipped")
        else:
            mc_port = stack.enter_context(Memcached()).port
        yield redis_port, mc_port


def run(cfg: Config) -> SuiteReport:
    """Run the suite: one server of each kind, then each group set up, measured, torn down."""
    date = now_utc()
    tools: dict[str, str] = {}
    if (version := redis_server_version()) is not None:
        tools["redis-server"] = version
    if (mc := memcached_version()) is not None:
        tools["memcached"] = mc
    machine = machine_info(PACKAGES, tools)
    watch = CpuWatch.start()
    measured = Measured()
    runner = AsyncRunner()
    from .pipeline import facade_section, pipeline_section

    extra: list[tuple[str, list[Target]]] = []
    try:
        with _servers() as (redis_port, mc_port):
            env = Env(runner, redis_port, mc_port)
            for group in GROUPS:
                _run_group(group, cfg, env, measured)
            extra.append(facade_section(cfg, env, measured))
            extra.append(pipeline_section(cfg, env, measured))
    finally:
        runner.close()
    machine["background"] = watch.stop()
    machine["event_loop"] = runner.kind
    during = [r.background for r in measured.results if r.background is not None]
    if during:
        machine["background"]["during_rows"] = statistics.median(during)
        machine["background"]["during_rows_max"] = max(during)
    targets = _targets(measured.results) + [t for _, ts in extra for t in ts]
    cpu = {
        f"{r.candidate_id} {r.op}": measured.cpu[id(r)]
        for r in measured.results
        if id(r) in measured.cpu
    }
    return SuiteReport(
        name=NAME,
        title=TITLE,
        date=date,
        machine=machine,
        config=cfg,
        results=measured.results,
        body=_body(measured, targets, cfg, runner.kind, [text for text, _ in extra]),
        extra={"targets": [dataclasses.asdict(t) for t in targets], "client_cpu_ns": cpu},
    )
