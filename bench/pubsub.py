"""Suite ``pubsub``: publish -> handler across processes, and WebSocket fan-out to 1,000 sockets.

Across workers: the handler runs in a separate process started like a uvicorn worker
(``multiprocessing`` spawn: a fresh interpreter; on the table backend it attaches to the
benchmark's shared memory as a worker does), and the benchmark process publishes, each
library with its own calls: ``await Store.publish`` + ``zeal.subscribe`` (Redis, and the host
bus of the table backend), raw redis-py ``PUBLISH`` + ``pubsub().listen()``, and broadcaster,
all on one private redis-server.  Payloads carry the publisher's ``CLOCK_MONOTONIC`` time, so
the handler measures publish -> handler latency (the clock is shared by every process of the
host).  Latency: one message at a time, paced so the handler is idle when it arrives.
Throughput: eight publishing tasks flat out for a few seconds; messages handled per second.

WebSocket fan-out: ``zeal-asgi run bench.pubsub:app --workers 2`` (uvicorn, uvloop, httptools)
serves a ``WSRouter`` room; two client processes (websockets library) hold 1,000 connections in
the room; one ``POST /bench/broadcast`` sends N room messages and the clients count what they
receive.  broadcaster's README chat pattern (one ``subscribe`` per socket, Redis backend) is
the peer.  The module's ``app`` is built from ``BENCH_WS_KIND`` on first access.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import multiprocessing
import os
import statistics
import time
import traceback
import urllib.request
from collections.abc import Awaitable, Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Generic, Protocol, TypeVar

from tests._harness.apps import AppServer

from ._harness import (
    DASH,
    TIMES,
    Config,
    CpuWatch,
    NotInstalled,
    Result,
    RowId,
    SuiteReport,
    dist_version,
    fmt_ops,
    log,
    machine_info,
    need,
    now_utc,
    redis_server,
    redis_server_version,
    wait_quiet,
)
from .store import AsyncRunner, Target, short_error, target_table

__all__ = ["NAME", "TITLE", "PubSubConfig", "run"]

NAME = "pubsub"
TITLE = "Pub/sub across workers and WebSocket fan-out vs redis-py and broadcaster"

PACKAGES = ("zeal-asgi", "redis", "hiredis", "broadcaster", "websockets", "uvicorn", "uvloop")
PAD = "x" * 40
"""Payload padding: ``L:<seq>:<ns>:`` plus this is ~70 bytes, a typical small event."""
PUBLISHERS = 8
"""Concurrent publishing tasks of the throughput phase (zeal's default pool size)."""
ROOM = "bench"
IDLE = 3.0
"""Seconds without a delivery after which a WebSocket client stops waiting for more."""
# broadcaster 0.3.1 with redis-py 8 loses its first subscription: its listener task wakes on
# the first subscribe() and checks ``PubSub.subscribed`` while SUBSCRIBE is still being sent
# (redis-py records the channel only afterwards), finds nothing, clears its ready event and
# waits on it for good.  A second subscribe sets the event again once a channel is recorded, so
# every broadcaster subscriber here first holds a subscription to PRIMER.
PRIMER = "bench-primer"
_SPAWN = multiprocessing.get_context("spawn")


@dataclasses.dataclass(frozen=True)
class PubSubConfig:
    """Sizes of one run."""

    rounds: int
    """Every flow is measured this many times, the flows in turn (drift hits them alike)."""
    latency_messages: int
    latency_interval: float
    """Seconds between two latency messages (the handler is idle when the next one comes)."""
    flood_seconds: float
    ws_clients: int
    ws_messages: int

    @classmethod
    def from_config(cls, cfg: Config) -> PubSubConfig:
        """The publishable sizes, or a few seconds in all with ``--quick``."""
        if cfg.quick:
            return cls(1, 100, 0.002, 0.5, 100, 20)
        return cls(3, 1000, 0.002, 1.5, 1000, 100)


def _now() -> int:
    return time.perf_counter_ns()


# -- the subscriber process --------------------------------------------------------------------


class _Recorder:
    """The handler's work, identical for every library: timestamp, keep, answer markers."""

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        self.records: list[tuple[int, str]] = []
        self.warm = False
        self.finished = asyncio.Event()

    def on_message(self, payload: str | bytes) -> None:
        t = _now()
        text = payload.decode() if isinstance(payload, bytes) else payload
        kind = text[0]
        if kind in "LT":
            self.records.append((t, text))
        elif kind == "w":
            if not self.warm:
                self.warm = True
                self.conn.send(("warm",))
        elif kind == "E":
            phase = text[2:]
            recs, self.records = self.records, []
            sent = [(t_recv, int(p.split(":", 3)[2])) for t_recv, p in recs]
            self.conn.send(("done", phase, sent))
            if phase == "thr":
                self.finished.set()


async def _sub_zeal(kind: str, url: str, channel: str, rec: _Recorder) -> None:
    from zeal_asgi import Store
    from zeal_asgi.messaging.pubsub import PubSub

    store = Store(kind, {"url": url} if kind == "redis" else None)
    await store.start()
    pubsub = PubSub(store)
    pubsub.subscribe(channel, lambda payload, ch: rec.on_message(payload))
    try:
        await pubsub.start()
        if not await pubsub.wait_ready(10.0):
            raise RuntimeError(f"zeal pub/sub not subscribed: {pubsub.stats()}")
        rec.conn.send(("ready",))
        await rec.finished.wait()
    finally:
        await pubsub.stop()
        await store.aclose()


async def _sub_redis_py(url: str, channel: str, rec: _Recorder) -> None:
    import redis.asyncio as aioredis

    r = aioredis.Redis.from_url(url)
    ps: Any = r.pubsub()
    try:
        await ps.subscribe(channel)
        rec.conn.send(("ready",))
        async for msg in ps.listen():
            if msg["type"] == "message":
                rec.on_message(msg["data"])
                if rec.finished.is_set():
                    break
    finally:
        await ps.aclose()
        await r.aclose()


async def _sub_broadcaster(url: str, channel: str, rec: _Recorder) -> None:
    from broadcaster import Broadcast

    # PRIMER first (see its comment)
    async with Broadcast(url) as bc, bc.subscribe(PRIMER), bc.subscribe(channel) as subscriber:
        rec.conn.send(("ready",))
        sub: Any = subscriber  # its __aiter__ is annotated as possibly None
        async for event in sub:
            if event is not None:
                rec.on_message(event.message)
                if rec.finished.is_set():
                    break


def _sub_main(kind: str, url: str, channel: str, conn: Connection) -> None:
    """Entry point of the subscriber process (spawned, like a uvicorn worker)."""
    rec = _Recorder(conn)
    if kind in ("zeal-redis", "zeal-table"):
        coro = _sub_zeal(kind.split("-")[1], url, channel, rec)
    elif kind == "redis-py":
        coro = _sub_redis_py(url, channel, rec)
    else:
        coro = _sub_broadcaster(url, channel, rec)
    try:
        _run_fast(coro)
    except BaseException:
        conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


def _run_fast(coro: Any) -> None:
    """Run ``coro`` on uvloop when installed (what the servers' workers use)."""
    if importlib.util.find_spec("uvloop") is None:
        asyncio.run(coro)
        return
    import uvloop

    uvloop.run(coro)


# -- the publishing side -----------------------------------------------------------------------


async def _recv(conn: Connection, within: float) -> Any:
    """The next message from a child, without blocking the event loop."""
    loop = asyncio.get_running_loop()
    if not conn.poll():
        ready: asyncio.Future[None] = loop.create_future()

        def readable() -> None:
            if not ready.done():
                ready.set_result(None)

        loop.add_reader(conn.fileno(), readable)
        try:
            await asyncio.wait_for(ready, within)
        except TimeoutError:
            raise RuntimeError(f"no answer from another process in {within} s") from None
        finally:
            loop.remove_reader(conn.fileno())
            # the loop made the pipe non-blocking; a large message is read in several chunks
            os.set_blocking(conn.fileno(), True)
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"subscriber process failed:\n{msg[1]}")
    return msg


Publish = Callable[[str], Awaitable[object]]


@contextlib.asynccontextmanager
async def _publisher(kind: str, url: str, channel: str) -> Any:
    """Yields ``publish(payload)`` of ``kind``, with the library's own publish call."""
    if kind in ("zeal-redis", "zeal-table"):
        from zeal_asgi import Store
        from zeal_asgi.messaging.pubsub import PubSub

        backend = kind.split("-")[1]
        store = Store(backend, {"url": url} if backend == "redis" else None)
        PubSub(store).prepare()  # the host bus exists before the subscriber attaches
        Store.set_default(store)
        await store.start()
        try:
            yield lambda payload: Store.publish(channel, payload)
        finally:
            await store.aclose()
            Store.set_default(None)
    elif kind == "redis-py":
        import redis.asyncio as aioredis

        r = aioredis.Redis.from_url(url)
        try:
            yield lambda payload: r.publish(channel, payload)
        finally:
            await r.aclose()
    else:
        from broadcaster import Broadcast

        async with Broadcast(url) as bc:
            yield lambda payload: bc.publish(channel, payload)


@dataclasses.dataclass
class Flow:
    """What one candidate achieved across processes."""

    latencies_us: list[float]
    sent: int
    received: int
    seconds: float

    @property
    def rate(self) -> float:
        """Messages handled per second in the throughput phase."""
        return self.received / self.seconds if self.seconds > 0 else 0.0


class _Run(Protocol):
    latencies_us: list[float]

    @property
    def rate(self) -> float: ...


R = TypeVar("R", bound=_Run)


@dataclasses.dataclass
class Runs(Generic[R]):
    """Every run of one candidate (the candidates in turn): latencies pooled, the rate as the
    median run."""

    runs: list[R] = dataclasses.field(default_factory=list)

    @property
    def latencies_us(self) -> list[float]:
        """Every latency sample of every run."""
        return [x for r in self.runs for x in r.latencies_us]

    @property
    def rate(self) -> float:
        """Median rate over the runs."""
        return statistics.median(r.rate for r in self.runs)

    def per_run(self) -> str:
        """``13.2 k / 12.9 k / 13.5 k``."""
        return " / ".join(fmt_ops(r.rate) for r in self.runs)


async def _flow(kind: str, url: str, pc: PubSubConfig) -> Flow:
    channel = f"zb-{kind}-{os.getpid()}"
    parent, child = _SPAWN.Pipe()
    async with _publisher(kind, url, channel) as publish:
        proc = _SPAWN.Process(target=_sub_main, args=(kind, url, channel, child), daemon=True)
        proc.start()
        child.close()
        try:
            await _recv(parent, 60)  # ready
            warm = asyncio.ensure_future(_recv(parent, 20))
            while not warm.done():
                await publish("w")
                await asyncio.sleep(0.02)
            await warm
            for seq in range(pc.latency_messages):
                await publish(f"L:{seq}:{_now()}:{PAD}")
                await asyncio.sleep(pc.latency_interval)
            await publish("E:lat")
            _, _, lat = await _recv(parent, 60)
            latencies = [(t_recv - t_pub) / 1000 for t_recv, t_pub in lat]
            start = _now()
            sent = await _flood(publish, pc.flood_seconds)
            await publish("E:thr")
            _, _, thr = await _recv(parent, 120)
            last = max((t for t, _ in thr), default=start)
            return Flow(latencies, sent, len(thr), (last - start) / 1e9)
        finally:
            proc.join(10)
            if proc.is_alive():
                proc.kill()
                proc.join()
            parent.close()


async def _flood(publish: Publish, seconds: float) -> int:
    """``PUBLISHERS`` tasks publishing back to back for ``seconds``; how many were sent."""
    loop = asyncio.get_running_loop()
    stop = loop.time() + seconds
    sent = 0

    async def worker(first: int) -> None:
        nonlocal sent
        seq = first
        while loop.time() < stop:
            await publish(f"T:{seq}:{_now()}:{PAD}")
            seq += PUBLISHERS
            sent += 1

    await asyncio.gather(*(worker(i) for i in range(PUBLISHERS)))
    return sent


FLOWS = (
    ("zeal-redis", "zeal, redis backend", "Store.publish / zeal.subscribe"),
    ("zeal-table", "zeal, table backend", "Store.publish / zeal.subscribe (host bus, no Redis)"),
    ("redis-py", "redis-py asyncio (hiredis)", "r.publish / r.pubsub().listen()"),
    ("broadcaster", "broadcaster", "bc.publish / async with bc.subscribe(...)"),
)


# -- the WebSocket app ---------------------------------------------------------------------------


def _build_app() -> Any:
    """The benchmarked ASGI app (``BENCH_WS_KIND``: ``zeal`` or ``broadcaster``)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket

    pad = PAD

    async def pid(request: Request) -> JSONResponse:
        return JSONResponse({"pid": os.getpid()})

    if os.environ.get("BENCH_WS_KIND") == "broadcaster":
        return _broadcaster_app(pid)
    from zeal_asgi import Zeal
    from zeal_asgi.ws import WSRouter

    zeal = Zeal()
    router = WSRouter(zeal)

    async def ws(websocket: WebSocket) -> None:
        cid = websocket.path_params["cid"]

        async def on_message(data: str | bytes) -> None:
            if data == "ping":  # answered after the join: the client is in the room now
                await router.send_to_client(cid, f"ready:{os.getpid()}")

        await router.serve(cid, websocket, on_message, rooms=[ROOM])

    async def broadcast(request: Request) -> JSONResponse:
        n = int(request.query_params["n"])
        t0 = time.perf_counter()
        for seq in range(n):
            await router.broadcast(ROOM, f"{seq}:{_now()}:{pad}")
        return JSONResponse({"sent": n, "seconds": time.perf_counter() - t0})

    routes = [
        Route("/bench/pid", pid),
        Route("/bench/broadcast", broadcast, methods=["POST"]),
        WebSocketRoute("/ws/{cid}", ws),
    ]
    return Starlette(routes=routes, lifespan=zeal.lifespan)


def _broadcaster_app(pid: Callable[..., Awaitable[Any]]) -> Any:
    """broadcaster's README chat pattern: one ``subscribe`` per socket, Redis backend."""
    from broadcaster import Broadcast
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.websockets import WebSocket

    bc = Broadcast(os.environ["BENCH_REDIS_URL"])
    pad = PAD

    @contextlib.asynccontextmanager
    async def lifespan(app: Any) -> Any:
        async with bc, bc.subscribe(PRIMER):  # see PRIMER
            yield

    async def ws(websocket: WebSocket) -> None:
        await websocket.accept()
        async with bc.subscribe(ROOM) as subscriber:
            sub: Any = subscriber

            async def sender() -> None:
                async for event in sub:
                    if event is not None:
                        await websocket.send_text(event.message)

            task = asyncio.get_running_loop().create_task(sender())
            try:
                while True:
                    msg = await websocket.receive()
                    if msg["type"] == "websocket.disconnect":
                        break
                    if msg.get("text") == "ping":
                        await websocket.send_text(f"ready:{os.getpid()}")
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task

    async def broadcast(request: Request) -> JSONResponse:
        n = int(request.query_params["n"])
        t0 = time.perf_counter()
        for seq in range(n):
            await bc.publish(ROOM, f"{seq}:{_now()}:{pad}")
        return JSONResponse({"sent": n, "seconds": time.perf_counter() - t0})

    routes = [
        Route("/bench/pid", pid),
        Route("/bench/broadcast", broadcast, methods=["POST"]),
        WebSocketRoute("/ws/{cid}", ws),
    ]
    return Starlette(routes=routes, lifespan=lifespan)


def __getattr__(name: str) -> Any:
    # Lazily, so importing the suite allocates nothing; the launcher's ``bench.pubsub:app``
    # lookup builds it in the master before the workers start.
    if name == "app":
        app = _build_app()
        globals()["app"] = app
        return app
    raise AttributeError(name)


# -- the WebSocket clients -----------------------------------------------------------------------


async def _ws_clients(port: int, ids: list[str], expect: int, conn: Connection) -> None:
    from websockets.asyncio.client import connect

    socks: list[Any] = []
    split: dict[str, int] = {}
    gate = asyncio.Semaphore(50)

    async def open_one(cid: str) -> None:
        async with gate:
            ws = await connect(f"ws://127.0.0.1:{port}/ws/{cid}", max_queue=None)
            socks.append(ws)
            await ws.send("ping")
            reply = await ws.recv()
            split[str(reply)] = split.get(str(reply), 0) + 1

    got: list[int] = []
    lat: list[int] = []
    last = [0]

    async def read(ws: Any) -> None:
        n = 0
        async for msg in ws:
            t = _now()
            lat.append(t - int(str(msg).split(":", 2)[1]))
            last[0] = max(last[0], t)
            n += 1
            if n == expect:
                break
        got.append(n)

    try:
        await asyncio.gather(*(open_one(c) for c in ids))
        conn.send(("ready", split))
        readers = [asyncio.ensure_future(read(ws)) for ws in socks]
        go = await _recv(conn, 60)
        assert go[0] == "go"
        pending = await _drain(readers, go[1], last)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        conn.send(("done", sum(got), last[0], lat))
    finally:
        await asyncio.gather(*(ws.close() for ws in socks), return_exceptions=True)


async def _drain(readers: list[Any], budget: float, last: list[int]) -> set[Any]:
    """Wait for the readers until all are done, nothing arrived for ``IDLE`` seconds (a socket
    that lost its subscription would be waited for in vain), or ``budget`` runs out."""
    start = _now()
    pending: set[Any] = set(readers)
    while pending:
        _, pending = await asyncio.wait(pending, timeout=0.25)
        now = _now()
        if (now - max(last[0], start)) / 1e9 > IDLE or (now - start) / 1e9 > budget:
            break
    return pending


def _ws_client_main(port: int, ids: list[str], expect: int, conn: Connection) -> None:
    """Entry point of a WebSocket client process."""
    try:
        _run_fast(_ws_clients(port, ids, expect, conn))
    except BaseException:
        with contextlib.suppress(OSError):
            conn.send(("error", traceback.format_exc()))
        raise
    finally:
        conn.close()


@dataclasses.dataclass
class FanOut:
    """One WebSocket fan-out run."""

    sockets: int
    messages: int
    delivered: int
    seconds: float
    latencies_us: list[float]
    split: dict[str, int]
    broadcast_seconds: float

    @property
    def rate(self) -> float:
        """Messages delivered to sockets per second."""
        return self.delivered / self.seconds if self.seconds > 0 else 0.0


def _wait(conn: Connection, timeout: float) -> Any:
    if not conn.poll(timeout):
        raise RuntimeError(f"no answer from a WebSocket client process in {timeout} s")
    msg = conn.recv()
    if msg[0] == "error":
        raise RuntimeError(f"WebSocket client process failed:\n{msg[1]}")
    return msg


def _fan_out(env: dict[str, str], pc: PubSubConfig) -> FanOut:
    need("websockets")
    server = AppServer("bench.pubsub:app", workers=2, env=env, ready="/bench/pid")
    procs: list[Any] = []
    conns: list[Connection] = []
    try:
        server.start()
        half = pc.ws_clients // 2
        groups = [range(0, half), range(half, pc.ws_clients)]
        for g in groups:
            ids = [f"c{i}" for i in g]
            parent, child = _SPAWN.Pipe()
            p = _SPAWN.Process(
                target=_ws_client_main, args=(server.port, ids, pc.ws_messages, child), daemon=True
            )
            p.start()
            child.close()
            procs.append(p)
            conns.append(parent)
        split: dict[str, int] = {}
        for c in conns:
            for k, v in _wait(c, 120)[1].items():
                split[k] = split.get(k, 0) + v
        time.sleep(0.2)
        budget = max(20.0, pc.ws_clients * pc.ws_messages / 2000)
        for c in conns:
            c.send(("go", budget))
        start = _now()
        url = f"http://127.0.0.1:{server.port}/bench/broadcast?n={pc.ws_messages}"
        req = urllib.request.Request(url, method="POST")
        with urllib.request.urlopen(req, timeout=budget) as r:
            sent = json.load(r)
        delivered, last, lat = 0, start, []
        for c in conns:
            _, n, t_last, lats = _wait(c, budget + 30)
            delivered += n
            last = max(last, t_last)
            lat += lats
        return FanOut(
            pc.ws_clients,
            pc.ws_messages,
            delivered,
            (last - start) / 1e9,
            [x / 1000 for x in lat],
            split,
            float(sent["seconds"]),
        )
    finally:
        for p in procs:
            p.join(10)
            if p.is_alive():
                p.kill()
                p.join()
        for c in conns:
            c.close()
        server.stop()


FANOUTS = (
    ("ws-zeal-table", "zeal WSRouter, table backend", {"BENCH_WS_KIND": "zeal"}),
    (
        "ws-zeal-redis",
        "zeal WSRouter, redis backend",
        {"BENCH_WS_KIND": "zeal", "ZEAL_STORE_BACKEND": "redis"},
    ),
    (
        "ws-broadcaster",
        "broadcaster (Redis), one subscribe per socket",
        {"BENCH_WS_KIND": "broadcaster"},
    ),
)


# -- report ------------------------------------------------------------------------------------


def _pct(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def _flow_table(flows: dict[str, Runs[Flow] | str]) -> str:
    lines = [
        "| Candidate | Calls | p50 \u00b5s | p99 \u00b5s | max \u00b5s | msg/s handled | "
        "per round | handled / sent |",
        "|---|---|---:|---:|---:|---:|---|---:|",
    ]
    for kind, name, calls in FLOWS:
        f = flows.get(kind, "not run")
        if isinstance(f, str):
            lines.append(f"| {name} | {calls} | {f} |" + f" {DASH} |" * 5)
            continue
        lat = f.latencies_us
        received = sum(x.received for x in f.runs)
        sent = sum(x.sent for x in f.runs)
        lines.append(
            f"| {name} | {calls} | {_pct(lat, 0.5):,.0f} | {_pct(lat, 0.99):,.0f} | "
            f"{max(lat):,.0f} | {fmt_ops(f.rate)} | {f.per_run()} | {received:,} / {sent:,} |"
        )
    return "\n".join(lines)


def _delivered(fan: Runs[FanOut]) -> int:
    return sum(r.delivered for r in fan.runs)


def _expected(fan: Runs[FanOut]) -> int:
    return sum(r.sockets * r.messages for r in fan.runs)


def _fan_table(fans: dict[str, Runs[FanOut] | str]) -> str:
    lines = [
        "| Server | sockets | messages | delivered (all runs) | msg/s delivered | runs | p50 ms | "
        "p99 ms | sockets per worker (first run) |",
        "|---|---:|---:|---:|---:|---|---:|---:|---|",
    ]
    for cid, name, _ in FANOUTS:
        f = fans.get(cid, "not run")
        if isinstance(f, str) or not f.runs:
            lines.append(f"| {name} | {f if isinstance(f, str) else 'not run'} | | | | | | | |")
            continue
        first = f.runs[0]
        per = "/".join(str(v) for v in sorted(first.split.values(), reverse=True))
        lat = f.latencies_us or [0.0]
        lines.append(
            f"| {name} | {first.sockets:,} | {first.messages:,} | {_delivered(f):,} / "
            f"{_expected(f):,} | {fmt_ops(f.rate)} | {f.per_run()} | "
            f"{_pct(lat, 0.5) / 1000:,.1f} | {_pct(lat, 0.99) / 1000:,.1f} | {per} |"
        )
    return "\n".join(lines)


def _targets(flows: dict[str, Runs[Flow] | str]) -> list[Target]:
    zeal, raw, bc = (flows.get(k) for k in ("zeal-redis", "redis-py", "broadcaster"))
    out: list[Target] = []
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        text = f"zeal (redis) publish \u2192 handler latency {label} within 10% of raw redis-py"
        if not isinstance(zeal, Runs) or not isinstance(raw, Runs):
            out.append(Target(text, "not measured", None))
            continue
        z, r = _pct(zeal.latencies_us, q), _pct(raw.latencies_us, q)
        out.append(
            Target(text, f"{z:,.0f} \u00b5s vs {r:,.0f} \u00b5s ({z / r - 1:+.0%})", z <= r * 1.1)
        )
    text = "zeal (redis) messages/s across workers \u2265 broadcaster"
    if not isinstance(zeal, Runs) or not isinstance(bc, Runs):
        out.append(Target(text, "not measured", None))
    else:
        ratio = f"{zeal.rate / bc.rate:.2f}{TIMES}"
        measured = f"{fmt_ops(zeal.rate)} vs {fmt_ops(bc.rate)} msg/s ({ratio})"
        out.append(Target(text, measured, zeal.rate >= bc.rate))
    return out


def _results(
    flows: dict[str, Runs[Flow] | str], fans: dict[str, Runs[FanOut] | str]
) -> list[Result]:
    out: list[Result] = []
    for kind, name, calls in FLOWS:
        f = flows.get(kind, "not run")
        base = RowId(suite=NAME, op="pubsub", candidate_id=kind, candidate=name, mode=calls)
        if isinstance(f, str):
            out.append(Result(**base, status=f))
        else:
            p50 = _pct(f.latencies_us, 0.5) * 1000
            rates = [x.rate for x in f.runs]
            out.append(Result(**base, ops_per_s=f.rate, ns_per_op=p50, reps_ops=rates))
    for cid, name, _ in FANOUTS:
        g = fans.get(cid, "not run")
        base = RowId(suite=NAME, op="ws_fanout", candidate_id=cid, candidate=name, mode="2 workers")
        if isinstance(g, str) or not g.runs:
            out.append(Result(**base, status=g if isinstance(g, str) else "not run"))
        else:
            rates = [r.rate for r in g.runs]
            out.append(Result(**base, ops_per_s=g.rate, reps_ops=rates))
    return out


def _body(
    flows: dict[str, Runs[Flow] | str],
    fans: dict[str, Runs[FanOut] | str],
    ts: Sequence[Target],
    pc: PubSubConfig,
    loop: str,
) -> str:
    return "\n\n".join(
        [
            "Reproduce: `python -m bench pubsub` (~2 min; `--quick`: ~15 s); needs redis-server "
            "on PATH, the `bench` extra (broadcaster), `websockets` and `uvicorn[standard]`.",
            "### Publish \u2192 handler across processes\n\n"
            "The handler runs in its own process, started with `multiprocessing` spawn like a "
            "uvicorn worker (a fresh interpreter; on the table backend it attaches to the "
            "benchmark's shared memory as a worker does); the benchmark process publishes. "
            f"Both run {loop}. {pc.rounds} round(s), the candidates in turn in each round; "
            f"latency percentiles pool the rounds, msg/s is the median round. "
            f"Latency: {pc.latency_messages:,} messages of ~70 bytes, one "
            f"every {pc.latency_interval * 1000:g} ms, from the publisher's clock reading just "
            "before its publish call to the handler's call (`CLOCK_MONOTONIC`, shared by the "
            f"processes). Throughput: {PUBLISHERS} publishing tasks flat out for "
            f"{pc.flood_seconds:g} s; messages handled per second, from the first publish to "
            "the last message handled. One redis-server serves every Redis row; publisher, "
            "handler and redis-server share the 2 cores.\n\n" + _flow_table(flows),
            "### WebSocket fan-out to local connections\n\n"
            "`zeal-asgi run bench.pubsub:app --workers 2` (uvicorn, uvloop + httptools); two "
            "client processes (websockets library) hold the connections, each joined to one "
            "room; one `POST /bench/broadcast` sends the messages "
            "(`await router.broadcast(room, msg)` each, or broadcaster's `publish`) and the "
            "clients count what arrives. msg/s = messages delivered to sockets / time from the "
            "request to the last delivery, the median of "
            f"{pc.rounds} run(s) with the servers in turn (runs differ by up to ~15% on this "
            "machine: the broadcasting worker also delivers, so its loop paces the messages); "
            "latency from the broadcast call to the client's receive, pooled over the runs. "
            "Server workers, clients and redis-server share the 2 cores.\n\n" + _fan_table(fans),
            _notes(flows, fans),
            "### Targets\n\n" + target_table(ts),
        ]
    )


def _notes(flows: dict[str, Runs[Flow] | str], fans: dict[str, Runs[FanOut] | str]) -> str:
    notes = [
        "broadcaster 0.3.1 with redis-py 8 never delivers on a `Broadcast`'s first "
        "subscription (its listener checks `PubSub.subscribed` while SUBSCRIBE is still being "
        "sent, then waits for good on an event that was already consumed); every broadcaster "
        "subscriber here first holds a subscription to another channel, which avoids it."
    ]
    table = flows.get("zeal-table")
    if isinstance(table, Runs) and any(f.received < f.sent for f in table.runs):
        notes.append(
            "zeal's table backend handled fewer messages than were sent in the throughput "
            "phase: the handler process fell behind the publisher and the bounded buffers "
            "dropped the oldest messages (the host bus's ring and the subscription queue both "
            "drop the oldest and count it in `Store.stats()`); publishers never block."
        )
    bc = fans.get("ws-broadcaster")
    if isinstance(bc, Runs) and _delivered(bc) < _expected(bc):
        notes.append(
            f"broadcaster's fan-out reached {_delivered(bc):,} of {_expected(bc):,} "
            "deliveries: `Broadcast.subscribe` is racy when sockets of one worker subscribe to "
            "the same channel at once (each sees no subscriber yet, awaits SUBSCRIBE, then "
            "replaces the channel's queue set), so a few sockets never receive anything. Its "
            "msg/s counts only what was delivered."
        )
    return "Notes:\n\n" + "\n".join(f"- {n}" for n in notes)


def run(cfg: Config) -> SuiteReport:
    """Run the suite: the four pub/sub flows, then the WebSocket fan-outs."""
    date = now_utc()
    pc = PubSubConfig.from_config(cfg)
    tools = {}
    if (version := redis_server_version()) is not None:
        tools["redis-server"] = version
    machine = machine_info(PACKAGES, tools)
    watch = CpuWatch.start()
    flows: dict[str, Runs[Flow] | str] = {}
    fans: dict[str, Runs[FanOut] | str] = {}
    runner = AsyncRunner()
    try:
        with contextlib.ExitStack() as servers:
            try:
                url = f"redis://127.0.0.1:{servers.enter_context(redis_server()).port}/0"
            except NotInstalled as exc:
                log(f"[{NAME}] {exc}")
                url = ""
            for kind, _, _ in FLOWS:
                if not url and kind != "zeal-table":
                    flows[kind] = "not installed (redis-server)"
                elif kind == "broadcaster" and not _installed("broadcaster"):
                    flows[kind] = "not installed (broadcaster)"
                else:
                    flows[kind] = Runs()
            for rnd in range(pc.rounds):
                for kind, _, _ in FLOWS:
                    rounds = flows[kind]
                    if not isinstance(rounds, Runs):
                        continue
                    wait_quiet(cfg.wait_quiet)
                    try:
                        f = runner.run(_flow(kind, url, pc))
                    except Exception as exc:
                        log(traceback.format_exc())
                        flows[kind] = short_error(exc)
                        continue
                    rounds.runs.append(f)
                    log(
                        f"[{NAME}] round {rnd + 1}/{pc.rounds} {kind}: p50 "
                        f"{_pct(f.latencies_us, 0.5):,.0f} us, p99 "
                        f"{_pct(f.latencies_us, 0.99):,.0f} us, {fmt_ops(f.rate)} msg/s "
                        f"({f.received}/{f.sent})"
                    )
            for cid, _, _ in FANOUTS:
                if not url and cid != "ws-zeal-table":
                    fans[cid] = "not installed (redis-server)"
                elif cid == "ws-broadcaster" and not _installed("broadcaster"):
                    fans[cid] = "not installed (broadcaster)"
                else:
                    fans[cid] = Runs()
            for rnd in range(pc.rounds):
                for cid, _, extra in FANOUTS:
                    fan = fans[cid]
                    if not isinstance(fan, Runs):
                        continue  # not installed, or failed in an earlier run
                    wait_quiet(cfg.wait_quiet)
                    try:
                        env = {**extra, "BENCH_REDIS_URL": url, "ZEAL_REDIS_URL": url}
                        g = _fan_out(env, pc)
                    except NotInstalled as exc:
                        fans[cid] = str(exc)
                        continue
                    except Exception as exc:
                        log(traceback.format_exc())
                        fans[cid] = short_error(exc)
                        continue
                    fan.runs.append(g)
                    log(
                        f"[{NAME}] run {rnd + 1}/{pc.rounds} {cid}: "
                        f"{g.delivered}/{g.sockets * g.messages} delivered, "
                        f"{fmt_ops(g.rate)} msg/s, split {g.split}"
                    )
    finally:
        runner.close()
    machine["background"] = watch.stop()
    machine["event_loop"] = runner.kind
    ts = _targets(flows)
    return SuiteReport(
        name=NAME,
        title=TITLE,
        date=date,
        machine=machine,
        config=cfg,
        results=_results(flows, fans),
        body=_body(flows, fans, ts, pc, runner.kind),
        extra={
            "targets": [dataclasses.asdict(t) for t in ts],
            "pubsub_config": dataclasses.asdict(pc),
            "flows": {
                k: [dataclasses.asdict(f) for f in v.runs] if isinstance(v, Runs) else v
                for k, v in flows.items()
            },
            "fanouts": {
                k: [{**dataclasses.asdict(r), "latencies_us": None} for r in v.runs]
                if isinstance(v, Runs)
                else v
                for k, v in fans.items()
            },
            "versions": {p: dist_version(p) for p in PACKAGES},
        },
    )


def _installed(module: str) -> bool:
    try:
        need(module)
    except NotInstalled:
        return False
    return True
