"""Suite ``response_cache``: cache hits through the full ASGI stack, 2 workers, wrk.

The app (:mod:`bench.response_cache_app`) serves the same small JSON payload from a constant
route (the ceiling), from ``@cache_response`` and from the three peers users pick instead:
fastapi-cache2, cashews and fastapi-cachex, each on its per-worker memory backend and on its
Redis backend.  Three servers run side by side under ``zeal-asgi run --workers 2``:

- ``memory``: zeal on the table backend (one copy per host), the peers on their memory stores;
- ``redis``: zeal on the redis backend, the peers on Redis;
- ``tiered``: zeal on the tiered backend (shared-memory L1 in front of the same Redis).

wrk hammers one hot key per route (``/c/<candidate>/0``), every route of a rep in turn, with
the ``http`` suite's counting script (no request in flight at the end).  A ``304`` row sends
``If-None-Match`` with the entry's ETag.  Then, on the memory server, 200 distinct keys are each
asked 4 times on fresh connections (so both workers see them): the handler runs (misses) and
the copies kept show what per-worker memory costs.  Last, the full request cycle of one hit is
timed in one process with Starlette's ``TestClient`` (the method of fastapi-redis-sdk's
published figures, peers.md section 9).
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Sequence
from pathlib import Path

from tests._harness.apps import AppServer
from tests._harness.servers import ServerError, stop_all

from ._harness import (
    TIMES,
    Config,
    NotInstalled,
    Result,
    RowId,
    SuiteReport,
    dist_version,
    fmt_ops,
    log,
    machine_info,
    now_utc,
    others_cpu_share,
    redis_server,
    redis_server_version,
    shm_tempdir,
    wait_quiet,
)
from .http import TAIL, WRK_LUA, HttpConfig, wrk

__all__ = ["CANDIDATES", "NAME", "TITLE", "Row", "latency_main", "run"]

CANDIDATES = ("constant", "zeal", "fc2", "cashews", "cachex")

NAME = "response_cache"
TITLE = "Response cache: hits under 2 workers (wrk) beside fastapi-cache2, cashews, fastapi-cachex"

APP = "bench.response_cache_app:app"
PACKAGES = (
    "fastapi",
    "starlette",
    "uvicorn",
    "redis",
    "fastapi-cache2",
    "cashews",
    "fastapi-cachex",
)
WORKERS = 2
BUSY = 0.1
"""A run is *disturbed* when other processes used this share of the CPUs just before it."""
DASH_ = "\u2014"
NOTE = (
    "On the redis backend a zeal hit is two round trips, one after the other: the path's (and "
    "tags') invalidation token (one HGETALL), then the entry under the key that token completes "
    "(a short script); each peer makes one (and none of them can invalidate by tag across "
    "workers and nodes). The peers' Redis rows are like for like: cashews' `redis://` keeps no "
    "copy in the worker (its client-side cache is off unless `client_side=true` is set), so each "
    "of its hits is one Redis GET of the pickled value, as Redis' MONITOR shows: its Redis row "
    "is close to its memory row for what its decorator costs either way, not for skipping "
    "Redis. The two zeal reads stay: the entry's key holds the current tokens, so the token "
    "must be read first, and one script reading both would need the tag rows (shared by many "
    "paths) and the entry in one Cluster slot; a worker's own copy of the tokens saves the read "
    "only by being trusted, and could then answer from an entry that `invalidate` has already "
    "dropped. "
    "The tiered backend serves both zeal reads from its shared-memory L1, which is "
    "why it is the row to compare with the peers' Redis backends; the plain redis row is shown "
    "as it is."
)
PUBLISHED_US = {"fastapi-redis-sdk": 643, "fastapi-cache2": 662, "cashews": 696}
"""fastapi-redis-sdk docs/guide/benchmarks.md: small cache hit, TestClient, Redis, M3 Max."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One measured route."""

    id: str
    label: str
    server: str
    candidate: str
    conditional: bool = False
    """Send ``If-None-Match`` with the entry's ETag (a 304 per request)."""


ROWS = (
    Row("constant", "constant route (the ceiling)", "memory", "constant"),
    Row("zeal-table", "zeal, table backend (one copy per host)", "memory", "zeal"),
    Row("zeal-304", "zeal, table backend, If-None-Match: 304", "memory", "zeal", True),
    Row("fc2-mem", "fastapi-cache2, InMemoryBackend (per worker)", "memory", "fc2"),
    Row("cashews-mem", "cashews, mem:// (per worker)", "memory", "cashews"),
    Row("cachex-mem", "fastapi-cachex, MemoryBackend (per worker)", "memory", "cachex"),
    Row("zeal-redis", "zeal, redis backend", "redis", "zeal"),
    Row("zeal-tiered", "zeal, tiered backend (shared-memory L1 + Redis)", "tiered", "zeal"),
    Row("fc2-redis", "fastapi-cache2, RedisBackend", "redis", "fc2"),
    Row("cashews-redis", "cashews, redis://", "redis", "cashews"),
    Row("cachex-redis", "fastapi-cachex, AsyncRedisCacheBackend", "redis", "cachex"),
)
MEMORY_PEERS = ("fc2-mem", "cashews-mem", "cachex-mem")
REDIS_PEERS = ("fc2-redis", "cashews-redis", "cachex-redis")


@dataclasses.dataclass
class Run:
    """One wrk run of one row."""

    requests: int
    seconds: float
    p50_ms: float
    p99_ms: float
    errors: int
    non_2xx: int
    others_cpu: float

    @property
    def rps(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:  # a 304 is raised by urllib
        return e.code, {k.lower(): v for k, v in e.headers.items()}, b""


def _servers(redis_url: str, workdir: str) -> dict[str, AppServer]:
    common = {"BENCH_REDIS_URL": redis_url, "ZEAL_CACHE_SECRET": "b" * 32}
    redis = {"ZEAL_REDIS_URL": redis_url, "ZEAL_REDIS_POOL_SIZE": "64"}
    envs = {
        "memory": {**common, "BENCH_RC_BACKEND": "memory"},
        "redis": {
            **common,
            **redis,
            "BENCH_RC_BACKEND": "redis",
            "ZEAL_STORE_BACKEND": "redis",
            "ZEAL_KEY_PREFIX": "zr",
        },
        "tiered": {
            **common,
            **redis,
            "BENCH_RC_BACKEND": "redis",
            "ZEAL_STORE_BACKEND": "tiered",
            "ZEAL_KEY_PREFIX": "zt",
        },
    }
    out = {}
    for kind, env in envs.items():
        d = Path(workdir) / kind
        d.mkdir()
        out[kind] = AppServer(
            APP, workers=WORKERS, env={**env, "BENCH_RC_DIR": str(d)}, ready="/health/store"
        )
    return out


def _measure(row: Row, server: AppServer, hc: HttpConfig, lua: Path, wait: float) -> Run:
    url = f"{server.url}/c/{row.candidate}/0"
    status, headers, _ = _get(url)  # fills the entry
    assert status == 200, f"{url}: {status}"
    extra = [f"If-None-Match: {headers['etag']}"] if row.conditional else []
    wait_quiet(wait)
    busy = others_cpu_share()
    wrk(url, hc.warmup, hc, lua, server.port, extra)
    s, _split = wrk(url, hc.duration, hc, lua, server.port, extra)
    return Run(
        requests=s["requests"],
        seconds=s["duration_us"] / 1e6 - TAIL,
        p50_ms=s["p50_us"] / 1000,
        p99_ms=s["p99_us"] / 1000,
        errors=s["connect"] + s["read"] + s["write"] + s["timeout"],
        # the 304 row answers 304 on purpose; wrk counts every status >= 400 as non-2xx
        non_2xx=s["status"],
        others_cpu=busy,
    )


@dataclasses.dataclass
class Spread:
    """Distinct keys asked several times over both workers: what per-worker stores cost."""

    keys: int
    requests: int
    misses: dict[str, int]
    """Handler runs per candidate."""
    payload_bytes: int


def _spread(server: AppServer, keys: int, times: int) -> Spread:
    before = json.loads(_get(server.url + "/bench/misses")[2])
    payload = 0
    for cand in ("zeal", "fc2", "cashews", "cachex"):
        for _ in range(times):
            for i in range(1, keys + 1):
                status, _, body = _get(f"{server.url}/c/{cand}/{i}", {"Connection": "close"})
                assert status == 200
                payload = len(body)
    after = json.loads(_get(server.url + "/bench/misses")[2])
    return Spread(keys, keys * times, {c: after[c] - before[c] for c in after}, payload)


# -- TestClient latency (one process, as fastapi-redis-sdk measured) ---------------------------


def latency_main(kind: str, n: int) -> None:
    """Print the µs per TestClient GET of each candidate's hot key (run in a subprocess)."""
    from fastapi.testclient import TestClient

    os.environ["BENCH_RC_BACKEND"] = kind
    from bench.response_cache_app import build

    out: dict[str, list[float]] = {}
    with TestClient(build()) as client:
        for cand in CANDIDATES:
            url = f"/c/{cand}/0"
            assert client.get(url).status_code == 200
            for _ in range(max(10, n // 10)):
                client.get(url)
            reps = []
            for _ in range(5):
                t0 = time.perf_counter()
                for _ in range(n):
                    client.get(url)
                reps.append((time.perf_counter() - t0) / n * 1e6)
            out[cand] = reps
    print("LATENCY " + json.dumps(out), flush=True)


def _latency(kind: str, env: dict[str, str], n: int, workdir: str) -> dict[str, list[float]]:
    code = f"from bench.response_cache import latency_main; latency_main({kind!r}, {n})"
    root = Path(__file__).resolve().parent.parent
    base = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    base["PYTHONPATH"] = str(root)
    full = {**base, **env, "BENCH_RC_DIR": str(Path(workdir) / f"lat-{kind}")}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=root,
        env=full,
        capture_output=True,
        text=True,
        timeout=600,
    )
    line = next((x for x in proc.stdout.splitlines() if x.startswith("LATENCY ")), None)
    if proc.returncode != 0 or line is None:
        raise RuntimeError(f"latency run failed: {proc.stderr[-1500:]}")
    data: dict[str, list[float]] = json.loads(line[len("LATENCY ") :])
    return data


# -- report ------------------------------------------------------------------------------------


@dataclasses.dataclass
class Target:
    """One target of the issue, checked against this run."""

    target: str
    measured: str
    met: bool | None


def _median(runs: Sequence[Run]) -> float | None:
    return statistics.median(r.rps for r in runs) if runs else None


def _ratio(runs: dict[str, list[Run]], a: str, b: str) -> tuple[float | None, str]:
    """Median over undisturbed reps of a's req/s over b's, and the per-rep figures."""
    pairs = [(x, y) for x, y in zip(runs.get(a, []), runs.get(b, []), strict=False) if y.rps]
    if not pairs:
        return None, "not measured"
    ratios = [x.rps / y.rps for x, y in pairs]
    quiet = [
        r for r, (x, y) in zip(ratios, pairs, strict=True) if max(x.others_cpu, y.others_cpu) < BUSY
    ]
    med = statistics.median(quiet or ratios)
    per = " / ".join(f"{r:.2f}" for r in ratios)
    return med, f"{med:.2f}{TIMES} (per rep: {per})"


def targets(runs: dict[str, list[Run]]) -> list[Target]:
    """The issue's targets (ratios within each rep; see the http suite for the method)."""
    out = []
    r, text = _ratio(runs, "zeal-table", "constant")
    out.append(
        Target(
            f"cached route \u2265 0.9{TIMES} the constant route",
            text,
            None if r is None else r >= 0.9,
        )
    )
    for zeal_row in ("zeal-redis", "zeal-tiered"):
        worst: tuple[float, str] | None = None
        texts = []
        for peer in REDIS_PEERS:
            r, text = _ratio(runs, zeal_row, peer)
            texts.append(f"vs {peer}: {text}")
            if r is not None and (worst is None or r < worst[0]):
                worst = (r, peer)
        label = f"{zeal_row} \u2265 1.5{TIMES} every peer on its Redis backend"
        out.append(Target(label, "; ".join(texts), None if worst is None else worst[0] >= 1.5))
    fastest = max(MEMORY_PEERS, key=lambda p: _median(runs.get(p, [])) or 0.0)
    r, text = _ratio(runs, "zeal-table", fastest)
    out.append(
        Target(
            f"zeal (table) \u2265 the fastest per-worker memory peer ({fastest})",
            text,
            None if r is None else r >= 1.0,
        )
    )
    r, text = _ratio(runs, "zeal-304", "zeal-table")
    out.append(
        Target("304 revalidation \u2265 the hit rate", text, None if r is None else r >= 1.0)
    )
    return out


def _body(
    runs: dict[str, list[Run]],
    errors: dict[str, str],
    ts: list[Target],
    spread: Spread | None,
    latency: dict[str, dict[str, list[float]]],
    hc: HttpConfig,
) -> str:
    met = {True: "**yes**", False: "**NO**", None: "\u2014"}
    lines = [
        "| Route | req/s median | req/s per run | p50 ms | p99 ms | errors | others' CPU before |",
        "|---|---:|---|---:|---:|---:|---|",
    ]
    for row in ROWS:
        rs = runs.get(row.id, [])
        if not rs:
            lines.append(f"| {row.label} | {errors.get(row.id, 'not run')} | | | | | |")
            continue
        per = " / ".join(f"{r.rps:,.0f}" for r in rs)
        p50 = statistics.median(r.p50_ms for r in rs)
        p99 = statistics.median(r.p99_ms for r in rs)
        busy = " / ".join(f"{r.others_cpu:.0%}" for r in rs)
        lines.append(
            f"| {row.label} | {fmt_ops(_median(rs))} | {per} | {p50:.1f} | {p99:.1f} | "
            f"{sum(r.errors for r in rs)} | {busy} |"
        )
    parts = [
        f"`wrk -t{hc.threads} -c{hc.connections} -d{hc.duration:g}s` on one hot key per route "
        f"against `zeal-asgi run --workers {WORKERS}`, after a {hc.warmup:g} s warm-up; "
        f"{hc.reps} rep(s), every other one running the rows in reverse order; every route "
        "is alone in its own router, picked by name (routed at the same cost); ratios are "
        "taken within a rep, median over the reps in which other processes used under "
        f"{BUSY:.0%} of the CPUs. "
        "The payload is the same ~60-byte JSON everywhere; wrk, the workers and redis-server "
        "share the machine's cores. The peers run in the same zeal workers as zeal's routes, so "
        "the workers' frozen start-up heap (`ZEAL_GC_FREEZE`) spares them as much.",
        "\n".join(lines),
        "### Targets\n\n| Target (issue) | Measured | Met |\n|---|---|---|\n"
        + "\n".join(f"| {t.target} | {t.measured} | {met[t.met]} |" for t in ts),
        NOTE,
    ]
    if spread is not None:
        rows = [
            "| Candidate | handler runs (misses) | hit rate | copies kept | bytes kept |",
            "|---|---:|---:|---:|---:|",
        ]
        for cand, label in (
            ("zeal", "zeal (table)"),
            ("fc2", "fastapi-cache2 memory"),
            ("cashews", "cashews mem://"),
            ("cachex", "fastapi-cachex memory"),
        ):
            m = spread.misses.get(cand, 0)
            copies = spread.keys if cand == "zeal" else m  # a per-worker store keeps what it missed
            rows.append(
                f"| {label} | {m} | {1 - m / spread.requests:.0%} | {copies} | "
                f"{copies * spread.payload_bytes:,} |"
            )
        parts.append(
            f"### Misses and memory of per-worker stores\n\n{spread.keys} distinct keys, each "
            f"asked {spread.requests // spread.keys} times on fresh connections (so both workers "
            "answer some): every worker of a per-worker store misses each key once and keeps "
            "its own copy; the zeal entries are one copy per host in shared memory (plus the "
            f"file tier).\n\n" + "\n".join(rows)
        )
    if latency:
        rows = [
            "| Candidate | memory backends, \u00b5s/request | Redis backends, \u00b5s/request "
            "| published (M3 Max, Redis) |",
            "|---|---:|---:|---:|",
        ]
        published = {
            "zeal": "",
            "fc2": f"{PUBLISHED_US['fastapi-cache2']}",
            "cashews": f"{PUBLISHED_US['cashews']}",
            "cachex": "",
            "constant": "",
        }
        for cand in CANDIDATES:
            cells = [
                f"{statistics.median(latency[k][cand]):,.0f}" if k in latency else DASH_
                for k in ("memory", "redis")
            ]
            rows.append(f"| {cand} | {cells[0]} | {cells[1]} | {published[cand] or DASH_} |")
        rows.append(f"| fastapi-redis-sdk | | | {PUBLISHED_US['fastapi-redis-sdk']} |")
        parts.append(
            "### Full request cycle of one hit (TestClient, one process)\n\nThe method of "
            "fastapi-redis-sdk's published figures (its docs/guide/benchmarks.md, small payload, "
            "Redis on the same machine): `TestClient.get` in a loop, median of 5 reps. zeal's "
            "memory column is the table backend; its Redis column the redis backend. TestClient "
            "runs the app in a worker thread, so most of each figure is TestClient itself (the "
            "constant route shows it).\n\n" + "\n".join(rows)
        )
    return "\n\n".join(parts)


def _result(row: Row, rs: Sequence[Run], error: str | None) -> Result:
    base = RowId(
        suite=NAME,
        op="GET",
        candidate_id=row.id,
        candidate=row.label,
        mode=f"{WORKERS} workers, {row.server}",
    )
    if not rs:
        return Result(**base, status=error or "not run")
    rps = _median(rs) or 0.0
    return Result(
        **base, ops_per_s=rps, ns_per_op=1e9 / rps if rps else None, reps_ops=[r.rps for r in rs]
    )


def run(cfg: Config) -> SuiteReport:
    """Start redis-server and the three servers, wrk every row, then the spread and latency."""
    date = now_utc()
    hc = HttpConfig.from_config(cfg)
    if shutil.which("wrk") is None:
        raise NotInstalled("not installed (wrk: apt-get install wrk)")
    runs: dict[str, list[Run]] = {}
    errors: dict[str, str] = {}
    spread: Spread | None = None
    latency: dict[str, dict[str, list[float]]] = {}
    with shm_tempdir() as tmp, redis_server() as rs:
        redis_url = f"redis://127.0.0.1:{rs.port}/0"
        lua = Path(tmp) / "count.lua"
        lua.write_text(WRK_LUA)
        servers = _servers(redis_url, tmp)
        try:
            for s in servers.values():
                s.launch()
            for kind, s in servers.items():
                try:
                    s.wait_ready()
                except ServerError as exc:
                    for row in ROWS:
                        if row.server == kind:
                            errors[row.id] = f"server failed: {str(exc).splitlines()[-1][:160]}"
            for rep in range(hc.reps):
                # every other rep in reverse: a machine getting busier or quieter during a rep
                # does not always favour the same side of the ceiling / zeal pair
                for row in ROWS if rep % 2 == 0 else ROWS[::-1]:
                    if row.id in errors:
                        continue
                    try:
                        r = _measure(row, servers[row.server], hc, lua, cfg.wait_quiet)
                    except Exception as exc:  # one broken row must not hide the others
                        errors[row.id] = f"failed: {type(exc).__name__}: {exc}"[:200]
                        log(f"[{NAME}] {row.id}: {errors[row.id]}")
                        continue
                    runs.setdefault(row.id, []).append(r)
                    log(
                        f"[{NAME}] rep {rep + 1}/{hc.reps} {row.id}: {r.rps:,.0f} req/s, "
                        f"p99 {r.p99_ms:.1f} ms, others' CPU {r.others_cpu:.0%}"
                    )
            if "memory" in servers and "constant" not in errors:
                spread = _spread(servers["memory"], 20 if cfg.quick else 200, 4)
                log(f"[{NAME}] spread: {spread.misses}")
        finally:
            stop_all(servers.values())
        n = 200 if cfg.quick else 2000
        for kind, env in (
            ("memory", {}),
            (
                "redis",
                {
                    "ZEAL_STORE_BACKEND": "redis",
                    "ZEAL_REDIS_URL": redis_url,
                    "BENCH_REDIS_URL": redis_url,
                },
            ),
        ):
            try:
                latency[kind] = _latency(kind, env, n, tmp)
            except Exception as exc:
                errors[f"latency-{kind}"] = str(exc)[:300]
                log(f"[{NAME}] latency {kind}: {exc}")
    ts = targets(runs)
    version = subprocess.run(["wrk", "--version"], capture_output=True, text=True).stdout.split()
    tools = {"wrk": version[1] if len(version) > 1 else "?"}
    if (v := redis_server_version()) is not None:
        tools["redis-server"] = v
    return SuiteReport(
        name=NAME,
        title=TITLE,
        date=date,
        machine=machine_info(PACKAGES, tools),
        config=cfg,
        results=[_result(r, runs.get(r.id, []), errors.get(r.id)) for r in ROWS],
        body=_body(runs, errors, ts, spread, latency, hc),
        extra={
            "targets": [dataclasses.asdict(t) for t in ts],
            "runs": {k: [dataclasses.asdict(r) for r in v] for k, v in runs.items()},
            "spread": dataclasses.asdict(spread) if spread else None,
            "latency_us": latency,
            "errors": errors,
            "versions": {p: dist_version(p) for p in PACKAGES},
        },
    )
