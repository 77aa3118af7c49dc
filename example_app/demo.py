"""The ``/demo`` routes: Store, Counter, Cache and pub/sub examples, one button each.

Tables and counters are declared here, at import, so the launcher allocates them in the master
before any worker starts (every worker then sees the same rows and the same counter).
"""

from __future__ import annotations

import os
import secrets
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Response

from zeal_asgi import Counter, Store, Zeal
from zeal_asgi.errors import ZealError
from zeal_asgi.fastapi import CacheDep, StoreDep, get_counter
from zeal_asgi.store import StoreBackendKind
from zeal_asgi.streams import StreamEntry

from .models import (
    BackendInfo,
    CacheResult,
    CounterResult,
    DemoError,
    DemoRow,
    IncrResult,
    PublishReliableResult,
    PublishResult,
    PubSubLog,
    PubSubLogEntry,
    RoundtripResult,
    SetGetResult,
)

__all__ = ["LOG_TABLE", "TABLE", "counter_increment", "install", "request_counter", "router"]

TABLE = "demo_table"
LOG_TABLE = "demo_pubsub_log"
CHANNEL = "demo:pubsub"
PATTERN = "demo:pubsub:*"
STREAM = "demo:reliable"
CACHE_TTL = 30

# Before the workers start: allocated once, in the master, and shared by every worker.
Store.make(TABLE, 128, {"name": (Store.TYPE_STRING, 64), "score": (Store.TYPE_INT, 4)})
Store.make(
    LOG_TABLE,
    256,
    {
        "channel": (Store.TYPE_STRING, 128),
        "payload": (Store.TYPE_STRING, 1024),
        "pattern": (Store.TYPE_STRING, 64),  # the matching pattern, or a stream entry's id
        "ts": (Store.TYPE_FLOAT,),
        "pid": (Store.TYPE_INT, 4),
    },
)
request_counter = Counter(0, name="requests")
"""The request counter: one integer shared by every worker."""

router = APIRouter(prefix="/demo", tags=["demo"])

RequestCounter = Annotated[Counter, Depends(get_counter("requests"))]
Channel = Annotated[str, Query(max_length=64, pattern=r"^demo:[A-Za-z0-9:_.-]{0,59}$")]
Message = Annotated[str, Query(min_length=1, max_length=200)]


def _error(exc: ZealError, store: Store) -> DemoError:
    return DemoError(error=str(exc), error_type=type(exc).__name__, backend=str(store.kind))


async def counter_increment() -> CounterResult:
    """The request counter: every worker increments the same integer.

    The hot path of the demo, so the counter is used straight from module scope (a ``Depends``
    would cost more than the increment itself; ``/demo/counter`` shows that spelling), and
    ``main`` registers it on the app itself, before the routers (see there).
    """
    return CounterResult(total_requests=await request_counter.increment(), pid=os.getpid())


@router.get("/workers/hit", response_model=CounterResult)
async def workers_hit(response: Response) -> CounterResult:
    """The request counter, answered with ``Connection: close``.

    A browser sends its requests on one keep-alive connection, which one worker holds, so every
    click would show the same pid. Closing the connection after each answer makes the next
    request a new connection, accepted by whichever worker gets it: the page's "hit every
    worker" control uses this route to show the pid changing while the count stays one sequence.
    """
    response.headers["Connection"] = "close"
    return CounterResult(total_requests=await request_counter.increment(), pid=os.getpid())


@router.get("/backend", response_model=BackendInfo)
async def backend(store: StoreDep) -> BackendInfo:
    """Which Store backend serves this app (the page's badge)."""
    return BackendInfo(backend=str(store.kind), worker_pid=os.getpid())


@router.get("/store/set-get", response_model=SetGetResult)
async def store_set_get(store: StoreDep) -> SetGetResult:
    """``Store.set`` two rows, read one back, count the table (rows of every worker)."""
    await store.set(TABLE, "user_1", {"name": "alice", "score": 100})
    await store.set(TABLE, "user_2", {"name": "bob", "score": 80})
    row = await store.get_strict(TABLE, "user_1")
    return SetGetResult(
        alice=DemoRow(**row) if row is not None else None,
        total_rows=await store.count(TABLE),
        worker_pid=os.getpid(),
    )


@router.get("/store/incr", response_model=IncrResult)
async def store_incr(store: StoreDep) -> IncrResult:
    """``page_hits``: reset, then three atomic ``Store.incr`` calls (1, 1, then 5)."""
    await store.set(TABLE, "page_hits", {"score": 0})
    one = await store.incr(TABLE, "page_hits", "score")
    two = await store.incr(TABLE, "page_hits", "score")
    seven = await store.incr(TABLE, "page_hits", "score", 5)
    return IncrResult(
        after_incr_1=int(one),
        after_incr_2=int(two),
        after_incr_5=int(seven),
        worker_pid=os.getpid(),
    )


@router.get("/store-roundtrip", response_model=RoundtripResult)
async def store_roundtrip(store: StoreDep) -> RoundtripResult:
    """A fresh key through set, get, incr, get, exists, delete, get."""
    key = f"rt_{secrets.token_hex(4)}"
    await store.set(TABLE, key, {"name": "roundtrip", "score": 42})
    after_set = await store.get(TABLE, key)
    await store.incr(TABLE, key, "score", 8)
    after_incr = await store.get(TABLE, key)
    existed = await store.exists(TABLE, key)
    await store.delete(TABLE, key)
    after_del = await store.get(TABLE, key)
    return RoundtripResult(
        backend=str(store.kind),
        key=key,
        set=DemoRow(**after_set),
        incr=DemoRow(**after_incr),
        existed=existed,
        after_del=after_del,
        worker_pid=os.getpid(),
    )


@router.get("/counter", response_model=CounterResult)
async def counter_value(counter: RequestCounter) -> CounterResult:
    """The request counter's value, without incrementing it (the ``Depends`` spelling)."""
    return CounterResult(total_requests=await counter.get(), pid=os.getpid())


@router.get("/cache", response_model=CacheResult)
async def cache_compute(cache: CacheDep) -> CacheResult:
    """``Cache.get_or_compute``: computed once (by one worker of the host), then served."""
    key = "demo:answer"

    def compute() -> dict[str, int | str]:
        return {"answer": 42, "computed_by": os.getpid(), "at": time.strftime("%H:%M:%S")}

    value = await cache.get_or_compute(key, compute, ttl=CACHE_TTL)
    return CacheResult(
        key=key,
        value=value,
        computed_by_pid=int(value["computed_by"]),
        worker_pid=os.getpid(),
        cache_count=await cache.count(),
    )


@router.get("/pubsub/publish", response_model=PublishResult | DemoError)
async def pubsub_publish(
    store: StoreDep, channel: Channel = CHANNEL, msg: Message = "hello"
) -> PublishResult | DemoError:
    """``Store.publish``: every subscribed worker logs the message (see ``/demo/pubsub/log``)."""
    try:
        receivers = await store.publish(channel, msg)
    except ZealError as exc:
        return _error(exc, store)
    return PublishResult(channel=channel, msg=msg, receivers=receivers)


@router.get("/pubsub/publish-reliable", response_model=PublishReliableResult | DemoError)
async def pubsub_publish_reliable(
    store: StoreDep,
    stream: Annotated[str, Query(max_length=64, pattern=r"^demo:[A-Za-z0-9:_.-]{0,59}$")] = STREAM,
    msg: Message = "durable",
) -> PublishReliableResult | DemoError:
    """``Store.publish_reliable``: an entry in a Redis Stream, consumed at least once."""
    try:
        entry = await store.publish_reliable(stream, msg, 1000)
    except ZealError as exc:
        return _error(exc, store)
    return PublishReliableResult(stream=stream, msg=msg, message_id=entry)


@router.get("/pubsub/log", response_model=PubSubLog | DemoError)
async def pubsub_log(store: StoreDep) -> PubSubLog | DemoError:
    """What the demo subscribers (every worker) received, oldest first."""
    if not subscriptions_active():
        return DemoError(
            error="the demo subscribers are not installed on this app",
            error_type="ConfigError",
            backend=str(store.kind),
        )
    try:
        entries = [
            PubSubLogEntry(
                id=str(key),
                channel=row["channel"],
                payload=row["payload"],
                pattern=row["pattern"],
                ts=row["ts"],
                worker_pid=row["pid"],
            )
            async for key, row in store.iterate(LOG_TABLE)
        ]
    except ZealError as exc:
        return _error(exc, store)
    entries.sort(key=lambda e: e.ts)
    return PubSubLog(count=len(entries), log=entries)


# -- the demo subscribers ------------------------------------------------------------------------

_subscribed = False
_reliable = False


def subscriptions_active() -> bool:
    """True once the demo's subscribers are registered on the app's Zeal."""
    return _subscribed


def install(zeal: Zeal) -> None:
    """Register the demo subscribers on ``zeal`` (at import time, before the workers start).

    Every worker logs what it receives on ``demo:pubsub`` (exact) and ``demo:pubsub:*``
    (pattern); where Redis Streams exist, one consumer group logs ``demo:reliable`` entries.
    """
    global _subscribed, _reliable
    store = zeal.store

    async def on_exact(payload: str, channel: str) -> None:
        await log_message(store, channel, payload, "")

    async def on_pattern(payload: str, channel: str) -> None:
        await log_message(store, channel, payload, PATTERN)

    async def on_reliable(payload: str, entry: StreamEntry) -> bool:
        await log_message(store, f"stream:{entry.stream}", payload, entry.id)
        return True

    zeal.subscribe(CHANNEL, on_exact)
    zeal.subscribe(PATTERN, on_pattern)
    _subscribed = True
    if store.kind in (StoreBackendKind.REDIS, StoreBackendKind.TIERED):  # Streams need Redis
        zeal.subscribe_reliable(STREAM, on_reliable, group="demo-log")
        _reliable = True


async def log_message(store: Store, channel: str, payload: str | bytes, pattern: str) -> None:
    """Record a received message in ``demo_pubsub_log`` (cleared when it fills up)."""
    text = payload.decode("utf-8", "replace") if isinstance(payload, bytes) else payload
    size = len(text.encode("utf-8"))
    if size > 1024:
        text = f"({size} bytes: too long for the demo log)"
    row = {"channel": channel, "payload": text, "pattern": pattern, "ts": time.time()}
    row["pid"] = os.getpid()
    if await store.count(LOG_TABLE) >= 200:
        await store.clear(LOG_TABLE)
    await store.set(LOG_TABLE, f"m_{secrets.token_hex(4)}", row)
