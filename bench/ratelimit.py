"""Suite ``ratelimit``: exact rate limiting against what users pick instead.

HTTP, with ``wrk`` against 2 workers of ``zeal-asgi run`` (the module's ``app``): one route per
candidate, every request admitted (a limit of a billion per minute), for throughput; and one
route per candidate with a limit of ``LIMIT`` per minute on a fresh key, hammered for a few
seconds, for exactness (how many requests got a 200 against the limit).  Candidates: the same
route unlimited (the ceiling), zeal on the table backend and on the redis backend (a second
server with ``ZEAL_STORE_BACKEND=redis``), slowapi with its memory storage (one count per
worker) and with Redis, fastapi-limiter (pyrate-limiter's Redis bucket) and ``limits``' async
Redis storage used directly.

In one process: ``await limiter.hit(key)`` on the table and redis backends, and ``limits``'
fixed-window ``hit`` on ``zeal://`` (this host's shared memory), ``memory://`` and Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import statistics
import subprocess
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

# FastAPI reads the endpoints' annotations (strings here) in this module's namespace.
from starlette.requests import Request
from starlette.responses import Response

from tests._harness.apps import AppServer
from tests._harness.servers import stop_all

from ._harness import (
    TIMES,
    Config,
    NotInstalled,
    Result,
    RowId,
    SuiteReport,
    calibrate,
    fmt_ops,
    log,
    machine_info,
    measure,
    now_utc,
    others_cpu_share,
    redis_server,
    redis_server_version,
    shm_tempdir,
    wait_quiet,
)

__all__ = ["NAME", "TITLE", "run"]

NAME = "ratelimit"
TITLE = "Rate limiting vs slowapi, fastapi-limiter and limits"

PACKAGES = ("zeal-asgi", "slowapi", "limits", "fastapi-limiter", "pyrate-limiter", "fastapi")
WORKERS = 2
LIMIT = 500
"""Requests per minute of the exactness routes (one fresh key per run)."""
HUGE = 1_000_000_000
"""Requests per minute of the throughput routes: every request is admitted."""
BUSY = 0.1
"""A run is *disturbed* when other processes used this share of the CPUs just before it."""

DEPENDENCY_NOTE = (
    "A FastAPI dependency costs before it does anything: the no-op dependency row is the same "
    "route behind `Depends` of a function that does nothing. Timed in one process (an ASGI "
    "loop, no server, the thread's CPU time, interleaved runs), that no-op dependency adds "
    "about 9 \u00b5s to the route and zeal's dependency about 1.6 \u00b5s more than it: on "
    "the table backend an admitted request is one compiled call that reads the key, decides "
    "the hit with the table's atomic step and appends the two headers (about 4,700 "
    "instructions, 1,800 of them the shared-memory update; the dependency as a whole costs "
    "about 5,000 to 8,000 more than the no-op one, counted with valgrind), the rest is "
    "FastAPI solving the dependency, injecting the connection and the sub-response and "
    "merging its headers into the response. The zeal row is best read against the no-op one. "
    "`RateLimitMiddleware` pays none of this: in one process it adds about 1.5 \u00b5s to the "
    "mounted app (the same compiled call, and passing the response start on with the "
    "headers). Under the server the same code takes more of the workers' CPU per request, the "
    "cost of running it on cold caches between the server's own work: not contention between "
    "the workers (a key per worker, no row shared between the processes, costs the same as "
    "one key for both) and not the header bytes (two constant headers of the same size cost "
    "nothing measurable). Every ceiling and its zeal twin are routed at the same cost: each "
    "sits alone behind one mount that picks it by its path in a dict (a router tries its "
    "routes in order, and each failed match costs about 0.7 \u00b5s). The peers' routes "
    "follow in order, so each of them pays a few failed matches more than the ceiling."
)

_WRK_LUA = r"""
function done(summary, latency, requests)
  io.write(string.format('WRKJSON {"requests":%d,"duration_us":%d,"errors":%d,"non2xx":%d,' ..
    '"p50_us":%d,"p99_us":%d}\n', summary.requests, summary.duration,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    summary.errors.status, latency:percentile(50), latency:percentile(99)))
end
"""


# -- the benchmarked app -----------------------------------------------------------------------


class _ByPath:
    """An ASGI app routing each path below its mount to its own app by one dict lookup."""

    def __init__(self, apps: dict[str, Any]) -> None:
        self.apps = apps

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        app = self.apps.get(scope["path"][len(scope.get("root_path", "")) :])
        if app is None:
            await Response(status_code=404)(scope, receive, send)
            return
        await app(scope, receive, send)


def _build_app() -> Any:
    """Every candidate's routes on one FastAPI app (built in the launcher's master)."""
    import limits
    import limits.aio.strategies
    import redis.asyncio as aioredis
    from fastapi import APIRouter, Depends, FastAPI, HTTPException
    from fastapi.responses import JSONResponse
    from fastapi_limiter.depends import RateLimiter as FLRateLimiter
    from pyrate_limiter import Duration, Limiter, Rate, RedisBucket
    from slowapi import Limiter as SlowLimiter
    from slowapi.errors import RateLimitExceeded
    from slowapi.util import get_remote_address
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse as StarletteJSON
    from starlette.routing import Route

    from zeal_asgi import Zeal
    from zeal_asgi.ratelimit import RateLimiter, RateLimitMiddleware, client_ip

    redis_url = os.environ["BENCH_REDIS_URL"]
    zeal = Zeal()

    def by_k(request: Any) -> str:
        return str(request.query_params.get("k", "none"))

    async def by_k_async(request: Any) -> str:
        return by_k(request)

    zeal_fast = RateLimiter(f"{HUGE}/minute", name="bench_fast", zeal=zeal)
    zeal_exact = RateLimiter(f"{LIMIT}/minute", name="bench_exact", zeal=zeal)
    zeal_mw_fast = RateLimiter(f"{HUGE}/minute", name="bench_mw_fast", zeal=zeal)
    zeal_mw_exact = RateLimiter(f"{LIMIT}/minute", name="bench_mw_exact", zeal=zeal)
    slow_memory = SlowLimiter(key_func=get_remote_address, storage_uri="memory://")
    slow_redis = SlowLimiter(key_func=get_remote_address, storage_uri=redis_url)
    limits_storage = limits.storage.storage_from_string(
        "async+" + redis_url, implementation="redispy"
    )
    limits_hit = limits.aio.strategies.FixedWindowRateLimiter(limits_storage).hit
    limits_items = {
        "fast": limits.parse(f"{HUGE}/minute"),
        "exact": limits.parse(f"{LIMIT}/minute"),
    }

    buckets: dict[str, Any] = {}

    class PyrateBuckets:
        """pyrate-limiter's Redis buckets need a loop: made at worker start."""

        async def start(self) -> None:
            client = aioredis.Redis.from_url(redis_url)
            for name, amount in (("fast", HUGE), ("exact", LIMIT)):
                rates = [Rate(amount, Duration.MINUTE)]
                buckets[name] = await RedisBucket.init(rates, client, f"bench:pyrate:{name}")

        async def stop(self) -> None:
            buckets.clear()

    zeal.add_service(PyrateBuckets())

    def fastapi_limiter(name: str) -> Any:
        class Lazy(FLRateLimiter):
            async def __call__(self, request: Request, response: Response) -> Any:
                if self.limiter is None:
                    self.limiter = Limiter(buckets[name])
                return await super().__call__(request, response)

        return Lazy(limiter=None, identifier=by_k_async if name == "exact" else _ip)  # type: ignore[arg-type]

    async def _ip(request: Any) -> str:
        return str(request.client.host)

    def limits_direct(name: str, key: Callable[[Any], str]) -> Any:
        async def dep(request: Request) -> None:
            if not await limits_hit(limits_items[name], key(request)):
                raise HTTPException(429, "Too Many Requests")

        return dep

    app = FastAPI(lifespan=zeal.lifespan)
    app.state.limiter = slow_memory  # slowapi's decorator finds its limiter on each route anyway

    async def refused(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse({"detail": "Too Many Requests"}, status_code=429)

    app.add_exception_handler(RateLimitExceeded, refused)
    ok = {"ok": True}

    async def unlimited() -> dict[str, bool]:
        return ok

    async def no_op() -> None:
        """A dependency doing nothing: what FastAPI itself spends on any dependency."""

    def api(path: str, *deps: Any) -> APIRouter:
        router = APIRouter()
        router.add_api_route(path, unlimited, dependencies=list(deps))
        return router

    # The mounted pair: the same small Starlette app, bare and behind the middleware (a
    # RateLimitMiddleware limits every path of the app it wraps).
    async def plain_ok(request: Request) -> StarletteJSON:
        return StarletteJSON(ok)

    def inner(path: str) -> Starlette:
        return Starlette(routes=[Route(path, plain_ok)])

    # The router tries routes in order, each failed match costing about a microsecond: the
    # throughput routes sit behind one mount that picks each by its path in a dict, so a
    # limited route and its ceiling are routed at the same cost, whatever the order.
    app.mount(
        "/p",
        _ByPath(
            {
                "/unlimited": api("/unlimited"),
                "/no-op-dependency": api("/no-op-dependency", Depends(no_op)),
                "/zeal": api("/zeal", Depends(zeal_fast.depends(key=client_ip))),
                "/mw-unlimited/": inner("/mw-unlimited/"),
                "/mw-zeal/": RateLimitMiddleware(
                    inner("/mw-zeal/"), limiter=zeal_mw_fast, key=client_ip
                ),
            }
        ),
    )
    app.add_api_route("/rl/unlimited", unlimited)  # the servers' readiness probe
    app.mount("/mw/exact/zeal", RateLimitMiddleware(inner("/"), limiter=zeal_mw_exact, key=by_k))

    app.add_api_route(
        "/rl/exact/zeal", unlimited, dependencies=[Depends(zeal_exact.depends(key=by_k))]
    )
    for kind in ("fast", "exact"):
        amount = HUGE if kind == "fast" else LIMIT
        key_func = get_remote_address if kind == "fast" else by_k
        for sl, label in ((slow_memory, "slowapi-memory"), (slow_redis, "slowapi-redis")):

            async def endpoint(request: Request) -> dict[str, bool]:
                return ok

            endpoint.__name__ = f"{label}_{kind}"  # slowapi keys its limits by function name
            app.add_api_route(
                f"/rl/{kind}/{label}",
                sl.limit(f"{amount}/minute", key_func=key_func)(endpoint),
            )
        app.add_api_route(
            f"/rl/{kind}/fastapi-limiter", unlimited, dependencies=[Depends(fastapi_limiter(kind))]
        )
        app.add_api_route(
            f"/rl/{kind}/limits-redis",
            unlimited,
            dependencies=[Depends(limits_direct(kind, by_k if kind == "exact" else _ip_sync))],
        )
    return app


def _ip_sync(request: Any) -> str:
    return str(request.client.host)


def __getattr__(name: str) -> Any:
    # Lazily, so importing the suite allocates nothing; ``zeal-asgi run bench.ratelimit:app``
    # builds it in the master before the workers start.
    if name == "app":
        app = _build_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


# -- candidates and runs -----------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Candidate:
    """One way of limiting the route."""

    id: str
    label: str
    server: str
    """``table`` or ``redis``: which server serves it (the zeal backend; peers use either)."""
    exact_route: bool = True


CANDIDATES = (
    Candidate("unlimited", "the same route unlimited (ceiling)", "table", exact_route=False),
    Candidate(
        "no-op-dependency",
        "the same route behind a no-op FastAPI dependency",
        "table",
        exact_route=False,
    ),
    Candidate("zeal", "zeal, table backend", "table"),
    Candidate("mw-unlimited", "ASGI app mounted, unlimited (ceiling)", "table", exact_route=False),
    Candidate("zeal-mw", "zeal RateLimitMiddleware on it, table backend", "table"),
    Candidate("zeal-redis", "zeal, redis backend", "redis"),
    Candidate("slowapi-memory", "slowapi, memory storage", "table"),
    Candidate("slowapi-redis", "slowapi, Redis storage", "table"),
    Candidate("fastapi-limiter", "fastapi-limiter (pyrate-limiter Redis bucket)", "table"),
    Candidate("limits-redis", "limits, async Redis storage (redis-py)", "table"),
)


_PAIRED = {
    "unlimited": "/p/unlimited",
    "no-op-dependency": "/p/no-op-dependency",
    "zeal": "/p/zeal",
    "zeal-redis": "/p/zeal",
    "mw-unlimited": "/p/mw-unlimited/",
    "zeal-mw": "/p/mw-zeal/",
}
"""The throughput routes of zeal and its ceilings (see ``_ByPath``)."""


def _path(c: Candidate, kind: str) -> str:
    if kind == "fast" and c.id in _PAIRED:
        return _PAIRED[c.id]
    if c.id == "zeal-mw":
        return f"/mw/{kind}/zeal/"
    return f"/rl/{kind}/{'zeal' if c.id == 'zeal-redis' else c.id}"


@dataclasses.dataclass
class Run:
    """One wrk run."""

    requests: int
    seconds: float
    non_2xx: int
    errors: int
    p50_ms: float
    p99_ms: float
    others_cpu: float

    @property
    def rps(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds else 0.0

    @property
    def admitted(self) -> int:
        """Requests answered 2xx."""
        return self.requests - self.non_2xx


@dataclasses.dataclass(frozen=True)
class WrkConfig:
    """Durations of the wrk runs."""

    duration: int
    exact_duration: int
    warmup: int
    reps: int
    threads: int = 2
    connections: int = 64

    @classmethod
    def from_config(cls, cfg: Config) -> WrkConfig:
        """10 s throughput runs x 3 reps; a couple of seconds each with ``--quick``."""
        if cfg.quick:
            return cls(duration=2, exact_duration=2, warmup=1, reps=1)
        return cls(duration=10, exact_duration=3, warmup=2, reps=3)


def wrk(url: str, seconds: int, wc: WrkConfig, lua: Path) -> Run:
    """One wrk run."""
    busy = others_cpu_share()
    argv = ["wrk", f"-t{wc.threads}", f"-c{wc.connections}", f"-d{seconds}s", "--timeout", "5s"]
    proc = subprocess.run([*argv, "-s", str(lua), url], capture_output=True, text=True, timeout=300)
    m = re.search(r"^WRKJSON (\{.*\})$", proc.stdout, re.MULTILINE)
    if proc.returncode != 0 or m is None:
        raise RuntimeError(f"wrk failed ({proc.returncode}): {' '.join(proc.stdout.split())[:300]}")
    s = json.loads(m.group(1))
    return Run(
        s["requests"],
        s["duration_us"] / 1e6,
        s["non2xx"],
        s["errors"],
        s["p50_us"] / 1000,
        s["p99_us"] / 1000,
        busy,
    )


@contextlib.contextmanager
def _servers(redis_url: str) -> Iterator[dict[str, AppServer]]:
    envs = {
        "table": {"BENCH_REDIS_URL": redis_url},
        "redis": {
            "BENCH_REDIS_URL": redis_url,
            "ZEAL_STORE_BACKEND": "redis",
            "ZEAL_REDIS_URL": redis_url,
            "ZEAL_REDIS_POOL_SIZE": "64",
        },
    }
    started = {
        kind: AppServer("bench.ratelimit:app", workers=WORKERS, env=env, ready="/rl/unlimited")
        for kind, env in envs.items()
    }
    try:
        for s in started.values():
            s.launch()
        for s in started.values():
            s.wait_ready()
        yield started
    finally:
        stop_all(started.values())


def _away_from_minute_end(margin: float) -> None:
    """The exactness runs must stay inside one aligned minute (zeal's windows are aligned)."""
    left = 60.0 - time.time() % 60.0
    if left < margin:
        time.sleep(left + 0.05)


# -- micro: one process ------------------------------------------------------------------------


def _micro(cfg: Config, redis_url: str) -> list[Result]:
    import limits
    import limits.aio.strategies

    from zeal_asgi.ratelimit import LimitsStorage, RateLimiter
    from zeal_asgi.shm.segments import destroy
    from zeal_asgi.store import Store
    from zeal_asgi.store.backends.table import TableBackend

    loop = asyncio.new_event_loop()
    results: list[Result] = []
    tag = uuid.uuid4().hex[:8]
    table_store = Store(backend=TableBackend(namespace=f"bench{tag}"))
    redis_store = Store("redis", {"url": redis_url, "prefix": f"bench{tag}"})
    item = limits.parse(f"{HUGE}/minute")

    def awaiting(hit: Callable[[str], Any]) -> Callable[[int], None]:
        async def many(n: int) -> None:
            for _ in range(n):
                await hit("user:1")

        return lambda n: loop.run_until_complete(many(n))

    def sync_hit(strategy: Any) -> Callable[[int], None]:
        def many(n: int) -> None:
            hit = strategy.hit
            for _ in range(n):
                hit(item, "user:1")

        return many

    zeal_storage = LimitsStorage("zeal://?max_keys=1024")
    aio_storage = limits.storage.storage_from_string("async+" + redis_url, implementation="redispy")
    rows: list[tuple[str, str, str, Callable[[int], None]]] = [
        (
            "zeal-hit",
            "zeal `await limiter.hit(key)`",
            "table backend",
            awaiting(RateLimiter(f"{HUGE}/minute", name=f"m{tag}", store=table_store).hit),
        ),
        (
            "zeal-hit-redis",
            "zeal `await limiter.hit(key)`",
            "redis backend (one Lua script)",
            awaiting(RateLimiter(f"{HUGE}/minute", name=f"r{tag}", store=redis_store).hit),
        ),
        (
            "limits-zeal",
            "limits FixedWindowRateLimiter.hit",
            "zeal:// (shared memory)",
            sync_hit(limits.strategies.FixedWindowRateLimiter(zeal_storage)),
        ),
        (
            "limits-memory",
            "limits FixedWindowRateLimiter.hit",
            "memory:// (this process only)",
            sync_hit(limits.strategies.FixedWindowRateLimiter(limits.storage.MemoryStorage())),
        ),
    ]

    async def aio_many(n: int) -> None:
        hit = limits.aio.strategies.FixedWindowRateLimiter(aio_storage).hit
        for _ in range(n):
            await hit(item, "user:1")

    rows.append(
        (
            "limits-aio-redis",
            "limits.aio FixedWindowRateLimiter.hit",
            "async Redis storage (redis-py)",
            lambda n: loop.run_until_complete(aio_many(n)),
        )
    )
    try:
        loop.run_until_complete(redis_store.start())
        for cid, label, mode, fn in rows:
            base = RowId(suite=NAME, op="hit", candidate_id=cid, candidate=label, mode=mode)
            try:
                calibrate(fn, cfg)
                results.append(Result.from_timing(base, measure(fn, cfg)))
                log(f"[{NAME}] micro {cid}: {fmt_ops(results[-1].ops_per_s)}/s")
            except Exception as exc:  # one broken candidate must not hide the others
                results.append(Result(**base, status=f"failed: {type(exc).__name__}: {exc}"[:200]))
    finally:
        loop.run_until_complete(redis_store.aclose())
        client = getattr(getattr(aio_storage, "bridge", None), "storage", None)
        if client is not None:  # limits' async storage has no close of its own
            loop.run_until_complete(client.aclose())
        loop.close()
        table_store.backend.close_all()  # type: ignore[attr-defined]
        destroy(zeal_storage.table)
    return results


# -- the suite ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One target of the issue, checked against this run."""

    target: str
    measured: str
    met: bool | None


def _targets(
    fast: dict[str, list[Run]], exact: dict[str, list[Run]], micro: Sequence[Result]
) -> list[Target]:
    out = []
    for limited, ceiling, what in (
        ("zeal", "unlimited", "FastAPI dependency"),
        ("zeal-mw", "mw-unlimited", "ASGI middleware"),
    ):
        pairs = [
            (a.rps / b.rps, max(a.others_cpu, b.others_cpu) >= BUSY)
            for a, b in zip(fast.get(limited, []), fast.get(ceiling, []), strict=False)
            if b.rps
        ]
        label = f"table backend, {what}: limited route \u2265 90% of the same route unlimited"
        if not pairs:
            out.append(Target(label, "not measured", None))
            continue
        quiet = [r for r, busy in pairs if not busy]
        med = statistics.median(quiet or [r for r, _ in pairs])
        per = " / ".join(f"{r:.0%}" + (" (busy)" if busy else "") for r, busy in pairs)
        which = "the undisturbed reps" if quiet else "all reps (the machine was busy in each)"
        out.append(Target(label, f"{med:.0%}, median of {which}: {per}", med >= 0.9))
    hit = next((r for r in micro if r.candidate_id == "zeal-hit" and r.ops_per_s), None)
    busy = ""
    if hit is not None and hit.background is not None and hit.background > BUSY:
        busy = f" (other processes used {hit.background:.0%} of the CPUs meanwhile)"
    out.append(
        Target(
            "`await limiter.hit()` on the table backend \u2265 1,000,000/s in one process",
            f"{fmt_ops(hit.ops_per_s)}/s{busy}" if hit else "not measured",
            None if hit is None else (hit.ops_per_s or 0) >= 1_000_000,
        )
    )
    for cid in ("zeal", "zeal-mw", "zeal-redis"):
        runs = exact.get(cid, [])
        admitted = [r.admitted for r in runs]
        out.append(
            Target(
                f"{cid}: exactly {LIMIT} of the hammered requests admitted (every run)",
                ", ".join(map(str, admitted)) or "not measured",
                None if not runs else all(a == LIMIT for a in admitted),
            )
        )
    return out


def _exactness(runs: Sequence[Run]) -> str:
    if not runs:
        return "\u2014"
    cells = []
    for r in runs:
        note = "" if r.requests >= 2 * LIMIT else " (not saturated)"
        cells.append(f"{r.admitted:,} / {LIMIT}{note}")
    return " · ".join(cells)


def _body(
    fast: dict[str, list[Run]],
    exact: dict[str, list[Run]],
    errors: dict[str, str],
    micro: Sequence[Result],
    ts: Sequence[Target],
    wc: WrkConfig,
) -> str:
    def median_rps(cid: str) -> float | None:
        return statistics.median(r.rps for r in fast[cid]) if fast.get(cid) else None

    ceilings = {"app": median_rps("unlimited"), "mw": median_rps("mw-unlimited")}
    head = "| Candidate | req/s median | vs unlimited | p99 ms | admitted / limit (exactness) "
    head += "| others' CPU before each run |"
    rows = [head, "|---|---:|---:|---:|---|---|"]
    for c in CANDIDATES:
        rs = fast.get(c.id, [])
        if not rs:
            rows.append(f"| {c.label} | {errors.get(c.id, 'not run')} | | | | |")
            continue
        rps = statistics.median(r.rps for r in rs)
        ceiling = ceilings["mw" if "mw" in c.id else "app"]
        ratio = f"{rps / ceiling:.0%}" if ceiling else "\u2014"
        p99 = statistics.median(r.p99_ms for r in rs)
        ex = _exactness(exact.get(c.id, [])) if c.exact_route else "n/a"
        busy = " / ".join(f"{r.others_cpu:.0%}" for r in rs)
        rows.append(f"| {c.label} | {fmt_ops(rps)} | {ratio} | {p99:.1f} | {ex} | {busy} |")
    met = {True: "**yes**", False: "**NO**", None: "\u2014"}
    target_lines = ["| Target (issue) | Measured | Met |", "|---|---|---|"]
    target_lines += [f"| {t.target} | {t.measured} | {met[t.met]} |" for t in ts]
    micro_lines = ["| Candidate | Storage | hits/s | ns/hit |", "|---|---|---:|---:|"]
    for r in micro:
        ops = fmt_ops(r.ops_per_s) if r.status == "ok" else r.status
        ns = f"{r.ns_per_op:,.0f}" if r.ns_per_op else "\u2014"
        micro_lines.append(f"| {r.candidate} | {r.mode} | {ops} | {ns} |")
    return "\n\n".join(
        [
            f"`wrk -t{wc.threads} -c{wc.connections}` against `zeal-asgi run --workers "
            f"{WORKERS}`: {wc.reps} rep(s) of {wc.duration} s per candidate on a route that "
            f"admits every request (throughput), then {wc.exact_duration} s on a route limited "
            f"to {LIMIT} per minute for one fresh key (exactness: how many requests got a 2xx; "
            f"a per-worker memory storage admits up to {WORKERS}{TIMES} the limit).  Every other "
            "rep runs the candidates in reverse order.  wrk, both workers and redis-server share "
            "the machine's cores; the last column is the share of the CPUs other processes used "
            "just before each run (a busy machine, not the code, is the usual reason runs "
            "disagree).",
            "\n".join(rows),
            DEPENDENCY_NOTE,
            "### One process: a hit\n\n" + "\n".join(micro_lines),
            "### Targets\n\n" + "\n".join(target_lines),
        ]
    )


def run(cfg: Config) -> SuiteReport:
    """Start redis-server and two 2-worker servers (table, redis), wrk every candidate, then the
    one-process hits."""
    date = now_utc()
    wc = WrkConfig.from_config(cfg)
    if shutil.which("wrk") is None:
        raise NotInstalled("not installed (wrk: apt-get install wrk)")
    import redis

    fast: dict[str, list[Run]] = {}
    exact: dict[str, list[Run]] = {}
    errors: dict[str, str] = {}
    with shm_tempdir() as tmp, redis_server() as rs:
        redis_url = rs.url
        lua = Path(tmp) / "report.lua"
        lua.write_text(_WRK_LUA)
        plain = redis.Redis.from_url(redis_url)
        try:
            with _servers(redis_url) as servers:
                for rep in range(wc.reps):
                    # Every other rep runs the candidates in reverse, so a machine that gets
                    # busier or quieter during a rep does not always favour the same side of
                    # the unlimited / zeal pair the target compares.
                    for c in CANDIDATES if rep % 2 == 0 else CANDIDATES[::-1]:
                        if c.id in errors:
                            continue
                        url = servers[c.server].url + _path(c, "fast")
                        try:
                            wait_quiet(cfg.wait_quiet)
                            wrk(url, wc.warmup, wc, lua)
                            r = wrk(url, wc.duration, wc, lua)
                            if r.non_2xx or r.errors:
                                raise RuntimeError(f"{r.non_2xx} non-2xx, {r.errors} errors")
                        except Exception as exc:  # one broken candidate must not hide the rest
                            errors[c.id] = f"failed: {type(exc).__name__}: {exc}"[:200]
                            log(f"[{NAME}] {c.id}: {errors[c.id]}")
                            continue
                        fast.setdefault(c.id, []).append(r)
                        log(f"[{NAME}] rep {rep + 1} {c.id}: {r.rps:,.0f} req/s")
                        if not c.exact_route:
                            continue
                        plain.flushdb()  # fastapi-limiter's bucket is one key per route
                        _away_from_minute_end(wc.exact_duration + 5)
                        key = uuid.uuid4().hex
                        e = wrk(
                            servers[c.server].url + _path(c, "exact") + f"?k={key}",
                            wc.exact_duration,
                            wc,
                            lua,
                        )
                        exact.setdefault(c.id, []).append(e)
                        log(f"[{NAME}] rep {rep + 1} {c.id}: admitted {e.admitted} / {LIMIT}")
        finally:
            plain.close()
        micro = _micro(cfg, redis_url)
    ts = _targets(fast, exact, micro)
    results = []
    for c in CANDIDATES:
        base = RowId(
            suite=NAME, op="GET", candidate_id=c.id, candidate=c.label, mode="2 workers, wrk"
        )
        rs_ = fast.get(c.id, [])
        if not rs_:
            results.append(Result(**base, status=errors.get(c.id, "not run")))
            continue
        rps = statistics.median(r.rps for r in rs_)
        ex = exact.get(c.id, [])
        results.append(
            Result(
                **base,
                ops_per_s=rps,
                ns_per_op=1e9 / rps,
                reps_ops=[r.rps for r in rs_],
                correctness=_exactness(ex) if c.exact_route else None,
                exact=(all(r.admitted == LIMIT for r in ex) if ex else None)
                if c.exact_route
                else None,
            )
        )
    results += micro
    tools = {"wrk": "installed"}
    if (v := redis_server_version()) is not None:
        tools["redis-server"] = v
    return SuiteReport(
        name=NAME,
        title=TITLE,
        date=date,
        machine=machine_info(PACKAGES, tools),
        config=cfg,
        results=results,
        body=_body(fast, exact, errors, micro, ts, wc),
        extra={
            "targets": [dataclasses.asdict(t) for t in ts],
            "fast": {k: [dataclasses.asdict(r) for r in v] for k, v in fast.items()},
            "exact": {k: [dataclasses.asdict(r) for r in v] for k, v in exact.items()},
        },
    )
