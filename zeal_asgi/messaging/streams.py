"""Reliable messaging over Redis Streams: consumer groups, at-least-once, reclaim, dead letters.

``await Store.publish_reliable(stream, payload)`` appends an entry (``XADD``);
``zeal.subscribe_reliable(stream, handler)`` runs ``handler(payload, entry)`` for every entry,
once per consumer group, in whichever worker of whichever node reads it first:

* the group is created at id ``0`` with ``MKSTREAM``, so entries published before the first
  consumer started are delivered too;
* a consumer reads its own pending entries (``0``) first, then new ones (``>``); several
  handler tasks per worker (``concurrency``) run at once, fed by a bounded queue, and the reader
  only asks for as many entries as there is room for;
* the handler returning ``True`` acknowledges (``XACK``); ``False`` or an exception leaves the
  entry pending;
* a reaper in every worker claims entries idle for more than ``min_idle_ms`` (``XAUTOCLAIM``,
  following the cursor to the end) from any consumer, dead or slow, and runs them again;
  ``min_idle_ms`` must exceed the slowest handler, or a live consumer's entry runs twice;
* an entry delivered ``max_deliveries`` times without success goes to the dead-letter stream
  ``<stream>:dead`` (with its id, group and delivery count), then is acknowledged.

Handlers must be idempotent: an entry may run again after a crash.  :func:`apply_once` makes a
Redis-side effect exactly-once (claim and effect in one Lua script); :func:`idempotent` claims a
key for effects outside Redis.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from operator import methodcaller
from typing import TYPE_CHECKING, Any

from zeal_asgi._redis.errors import translate
from zeal_asgi._redis.scripts import APPLY_ONCE, IDEM_CLAIM, text
from zeal_asgi.errors import (
    BackendTimeoutError,
    ConfigError,
    InvalidKeyError,
    InvalidTTLError,
    ZealError,
)
from zeal_asgi.messaging.stats import RUNNERS, Counters, call, cancel_tasks
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Store
from zeal_asgi.store.base import Capability, positive_int, seconds, unsupported
from zeal_asgi.store.channels import validate_channel

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink

log = logging.getLogger("zeal_asgi.streams")

_COUNTERS = "received acked failed reclaimed dead_lettered lost reconnects"


@dataclass(frozen=True)
class StreamEntry:
    """What a reliable handler gets besides the payload."""

    stream: str
    id: str
    group: str
    consumer: str
    deliveries: int
    """How many times this entry was delivered, this time included."""
    fields: dict[str, bytes] = field(repr=False)


StreamHandler = Callable[[Any, StreamEntry], "bool | Awaitable[bool]"]
"""``handler(payload, entry) -> bool`` (sync or async): ``True`` acknowledges."""


@dataclass(eq=False)
class ReliableSubscription:
    """One handler on one stream and group, with its options."""

    stream: str
    handler: StreamHandler
    group: str
    consumer: str
    batch: int = 16
    block_ms: int = 1000
    concurrency: int = 4
    min_idle_ms: int = 30_000
    reclaim_interval: float = 5.0
    max_deliveries: int = 5
    dead_letter: str | None = None
    raw: bool = False
    fixed_consumer: bool = False
    """The consumer name was given; otherwise each worker takes its own at start."""

    def __post_init__(self) -> None:
        validate_channel(self.stream, "stream")
        for name in ("batch", "block_ms", "concurrency", "min_idle_ms", "max_deliveries"):
            positive_int(name, getattr(self, name))
        self.reclaim_interval = seconds("reclaim_interval", self.reclaim_interval, 86400)
        for name in ("group", "consumer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 200:
                raise InvalidKeyError(f"{name} must be a non-empty str of <= 200 chars")
        if self.dead_letter is None:
            self.dead_letter = f"{self.stream}:dead"
        validate_channel(self.dead_letter, "dead-letter stream")


def default_consumer() -> str:
    """``host:pid:nonce``: unique per process, so two workers never share a pending list."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _default_group(handler: Callable[..., Any]) -> str:
    # Stable on every node and worker running the same code, distinct per handler: each
    # handler sees every entry once, and the workers running it share the work.
    name = f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', '?')}"
    return name[-200:]


class Streams:
    """The per-worker reliable consumers of a :class:`~zeal_asgi.Zeal` app (a ``Zeal`` service).

    Args:
        store: the Store whose backend holds the streams (default: ``Store.default()``).
        max_attempts: consecutive failures of a reader or reaper before it gives up; 0 = never.
            One that gave up makes ``state`` (and ``Store.stats()["streams"]["state"]``)
            ``failed``.
        backoff_base: first step of the full-jitter backoff ``uniform(0, min(cap, base * 2**n))``.
        backoff_cap: its longest wait.
        liveness_timeout: seconds past ``block_ms`` a blocking read may go unanswered.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        max_attempts: int = 0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        liveness_timeout: float = 5.0,
    ) -> None:
        self._store = store
        self.max_attempts = positive_int("max_attempts", max_attempts, 0)
        self.backoff_base = seconds("Streams backoff_base", backoff_base, 86400, zero=True)
        self.backoff_cap = seconds("Streams backoff_cap", backoff_cap, 86400, zero=True)
        self.liveness_timeout = seconds("Streams liveness_timeout", liveness_timeout, 86400)
        self.subscriptions: list[ReliableSubscription] = []
        self._consumers: list[Consumer] = []
        self.counters = Counters("streams", _COUNTERS)
        self.state = "stopped"
        RUNNERS.add(self)

    @property
    def store(self) -> Store:
        """The Store whose backend holds the streams."""
        return Store.default() if self._store is None else self._store

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``stop()`` in this worker."""
        return bool(self._consumers)

    def subscribe(
        self,
        stream: str,
        handler: StreamHandler | None = None,
        *,
        group: str | None = None,
        consumer: str | None = None,
        **options: Any,
    ) -> Any:
        """Run ``handler(payload, entry)`` at least once per entry of ``stream`` for ``group``.

        ``group`` defaults to the handler's qualified name; ``consumer`` (unique per process!)
        to ``host:pid:nonce``.  ``options`` are the other fields of :class:`ReliableSubscription`
        (``batch``, ``block_ms``, ``concurrency``, ``min_idle_ms``, ``reclaim_interval``,
        ``max_deliveries``, ``dead_letter``, ``raw``), with its defaults.  Without ``handler``
        it is a decorator.
        """

        def register(fn: StreamHandler) -> StreamHandler:
            if not callable(fn):
                raise ConfigError(f"a stream handler must be callable, got {fn!r}")
            sub = ReliableSubscription(
                stream,
                fn,
                group if group is not None else _default_group(fn),
                consumer if consumer is not None else default_consumer(),
                fixed_consumer=consumer is not None,
                **options,
            )
            self.subscriptions.append(sub)
            host_stats()  # allocated now, in the process that declares (before workers start)
            return fn

        return register if handler is None else register(handler)

    async def start(self) -> None:
        """Create the groups and start every consumer in this worker."""
        if self._consumers or not self.subscriptions:
            return
        backend = self.store.backend
        redis = backend.redis_link()
        if redis is None:
            raise unsupported(backend, "reliable messaging", Capability.STREAMS)
        for sub in self.subscriptions:
            if not sub.fixed_consumer:
                sub.consumer = default_consumer()  # declared before a fork: take our own pid
            consumer = Consumer(sub, redis, self)
            self._consumers.append(consumer)
            await consumer.start()
        self.state = "running"

    async def stop(self) -> None:
        """Stop every consumer (tasks cancelled and awaited; unacked entries stay pending)."""
        consumers, self._consumers = self._consumers, []
        for c in consumers:
            await c.stop()
        self.state = "stopped"

    def stats(self) -> dict[str, Any]:
        """This worker's state and counters."""
        out = {"state": self.state, "subscriptions": len(self.subscriptions)}
        return out | self.counters.values


# -- the consumer of one subscription in one worker ---------------------------------------------

_Job = tuple[str, dict[str, bytes], int]
"""An entry for a handler task: its id, its fields, and how many times it was delivered."""

_XAUTOCLAIM_PAGES = 100
"""Pages followed per reaper pass (each page scans up to 10 x count PEL entries)."""


def _fields(raw: dict[Any, Any]) -> dict[str, bytes]:
    return {text(k): v if isinstance(v, bytes) else str(v).encode() for k, v in raw.items()}


def _entries(reply: Any) -> list[tuple[str, Any]]:
    """``[(id, fields-or-None)]`` from an XREADGROUP reply (RESP2 list or RESP3 dict)."""
    if isinstance(reply, dict):  # RESP3 wraps each stream's entry list once more
        lists = [v[0] if v and isinstance(v[0], list) else v for v in reply.values()]
    else:
        lists = [s[1] for s in reply or ()]
    return [(text(eid), fields) for one in lists for eid, fields in one or () if eid is not None]


def _still_running() -> None:
    """Raise the cancellation of this task if a call swallowed it: redis-py finishes a command
    it was cancelled in and returns its reply (the task would go on, and ``stop()`` hang)."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


class Consumer:
    """Reader, reaper and handler tasks of one subscription in one worker."""

    def __init__(self, sub: ReliableSubscription, redis: RedisLink, owner: Streams) -> None:
        self.sub = sub
        self.redis = redis
        self.owner = owner
        self.key: str = redis.stream_key(sub.stream)
        assert sub.dead_letter is not None
        self.dead_key: str = redis.stream_key(sub.dead_letter)
        self.queue: asyncio.Queue[_Job] = asyncio.Queue(maxsize=sub.concurrency)
        self.tasks: list[asyncio.Task[None]] = []
        self.inflight: set[str] = set()
        # round trips each supervised loop finished: its failures count as consecutive only
        # while this stays put (the loops never return, so a return cannot reset the count)
        self.progress = {"reader": 0, "reaper": 0}

    async def start(self) -> None:
        """Create the group (at id 0, with the stream) and start the tasks."""
        await self._ensure_group()
        loop, name = asyncio.get_running_loop(), f"zeal-stream:{self.sub.stream}"
        loops = [self._supervise(self._read, "reader"), self._supervise(self._reap, "reaper")]
        loops += [self._work() for _ in range(self.sub.concurrency)]
        self.tasks = [loop.create_task(coro, name=name) for coro in loops]

    async def stop(self) -> None:
        """Cancel and await every task (unacknowledged entries stay pending)."""
        tasks, self.tasks = self.tasks, []
        await cancel_tasks(*tasks)

    async def _call(self, what: str, op: Callable[[Any], Awaitable[Any]]) -> Any:
        """``await op(client)`` on the pooled client, errors translated."""
        try:
            result = await op(await self.redis.client())
        except Exception as exc:
            raise translate(exc, f"{what} {self.sub.stream}") from exc
        _still_running()
        return result

    async def _ensure_group(self) -> None:
        create = methodcaller("xgroup_create", self.key, self.sub.group, id="0", mkstream=True)
        try:
            await self._call("XGROUP CREATE", create)
        except ZealError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def _supervise(self, loop_fn: Callable[[], Awaitable[None]], what: str) -> None:
        owner, attempt, progress = self.owner, 0, self.progress
        while True:
            seen = progress[what]
            try:
                await loop_fn()  # runs until cancelled or failed, never returns
            except Exception as exc:
                attempt = attempt + 1 if progress[what] == seen else 1
                where = f"zeal_asgi streams: {what} of {self.sub.stream!r}"
                if owner.max_attempts and attempt >= owner.max_attempts:
                    owner.state = "failed"
                    log.error("%s gave up after %d attempts: %s", where, attempt, exc)
                    return
                if "NOGROUP" in str(exc):
                    with contextlib.suppress(Exception):
                        await self._ensure_group()  # the stream was deleted under us
                owner.counters.incr("reconnects")
                cap, base = owner.backoff_cap, owner.backoff_base
                delay = random.uniform(0, min(cap, base * 2 ** min(attempt, 30)))
                log.warning("%s failed (%s); retrying in %.2f s", where, exc, delay)
                await asyncio.sleep(delay)

    async def _read(self) -> None:
        sub = self.sub
        # On a Cluster the blocking read must go to the node that owns the stream.
        client = await self.redis.dedicated_client(for_key=self.key)
        limit = sub.block_ms / 1000 + self.owner.liveness_timeout
        cursor = "0"  # our own pending entries first (after a restart with the same name)
        try:
            while True:
                # ask only for as many entries as the queue has room for
                while self.queue.full():  # noqa: ASYNC110 - a Queue has no "not full" event
                    await asyncio.sleep(0.001)
                count, new = self.queue.maxsize - self.queue.qsize(), cursor == ">"
                block = sub.block_ms if new else None  # our own pending entries: no wait
                read = client.xreadgroup(sub.group, sub.consumer, {self.key: cursor}, count, block)
                try:
                    got = _entries(await asyncio.wait_for(read, limit))
                except TimeoutError:
                    raise BackendTimeoutError(
                        f"XREADGROUP on {sub.stream!r} got no answer within {limit:.1f} s"
                    ) from None
                _still_running()
                self.progress["reader"] += 1
                for eid, raw in got:
                    await self._offer(eid, raw, int(new))
                if not new:
                    cursor = got[-1][0] if got else ">"
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _offer(self, eid: str, raw: Any, deliveries: int) -> None:
        if raw is None:
            # Deleted (trimmed) while pending: nothing to run; acknowledge so it leaves the PEL.
            self.owner.counters.incr("lost")
            await self._ack(eid)
        elif eid not in self.inflight:  # else our own slow handler has it (idle to Redis)
            self.owner.counters.incr("received")
            await self.queue.put((eid, _fields(raw), deliveries))

    async def _reap(self) -> None:
        while True:
            await asyncio.sleep(self.sub.reclaim_interval * random.uniform(0.8, 1.2))
            await self.reclaim_pass()
            self.progress["reaper"] += 1

    async def reclaim_pass(self) -> int:
        """Claim idle pending entries of any consumer and run them; the number claimed."""
        sub, cursor, claimed = self.sub, "0-0", 0
        for _ in range(_XAUTOCLAIM_PAGES):
            args = (self.key, sub.group, sub.consumer, sub.min_idle_ms, cursor)
            claim = methodcaller("xautoclaim", *args, count=sub.batch)
            reply = await self._call("XAUTOCLAIM", claim)
            cursor = text(reply[0])
            entries = _entries([[self.key, reply[1]]])
            if len(reply) > 2 and reply[2]:
                self.owner.counters.incr("lost", len(reply[2]))  # trimmed while pending (MAXLEN)
            if entries:
                claimed += len(entries)
                self.owner.counters.incr("reclaimed", len(entries))
                counts = await self._deliveries([e for e, _ in entries])
                for eid, raw in entries:
                    n = counts.get(eid, sub.max_deliveries + 1)
                    if raw is not None and n > sub.max_deliveries:
                        await self._dead_letter(eid, raw, n - 1)
                    else:
                        await self._offer(eid, raw, n)
            if cursor in ("0-0", "0"):
                break
        return claimed

    async def _deliveries(self, ids: list[str]) -> dict[str, int]:
        # xpending_range(stream, group, min, max, count, consumer): XAUTOCLAIM walks the pending
        # list in id order, so this page's entries lie between its first and its last id
        args = (self.key, self.sub.group, ids[0], ids[-1], len(ids) * 4 + 16, self.sub.consumer)
        rows = await self._call("XPENDING", methodcaller("xpending_range", *args))
        return {text(row["message_id"]): int(row["times_delivered"]) for row in rows}

    async def _dead_letter(self, eid: str, raw: Any, deliveries: int) -> None:
        sub = self.sub
        origin = {"origin_stream": sub.stream, "origin_id": eid, "group": sub.group}
        origin["deliveries"] = str(deliveries)
        fields = _fields(raw) | {f"zeal_{name}": value.encode() for name, value in origin.items()}

        async def move(client: Any) -> None:
            if hasattr(client, "get_node_from_key"):
                # Cluster: the two streams may live on two shards; XADD first, so a crash in
                # between leaves a duplicate dead letter rather than a lost one.
                await client.xadd(self.dead_key, fields)
                await client.xack(self.key, sub.group, eid)
                return
            async with client.pipeline(transaction=True) as pipe:
                pipe.xadd(self.dead_key, fields)
                pipe.xack(self.key, sub.group, eid)
                await pipe.execute()

        await self._call("dead-letter", move)
        self.owner.counters.incr("dead_lettered")
        log.warning(
            "zeal_asgi streams: entry %s of %r moved to %r after %d deliveries",
            eid,
            sub.stream,
            sub.dead_letter,
            deliveries,
        )

    async def _ack(self, eid: str) -> None:
        await self._call("XACK", lambda c: c.xack(self.key, self.sub.group, eid))

    async def _work(self) -> None:
        while True:
            eid, fields, deliveries = await self.queue.get()
            self.inflight.add(eid)
            try:
                await self._handle(eid, fields, deliveries)
            finally:
                self.inflight.discard(eid)

    async def _handle(self, eid: str, fields: dict[str, bytes], deliveries: int) -> None:
        sub = self.sub
        payload: Any = fields.get("payload", b"")
        if not sub.raw:
            with contextlib.suppress(UnicodeDecodeError):
                payload = payload.decode("utf-8")
        entry = StreamEntry(sub.stream, eid, sub.group, sub.consumer, max(deliveries, 1), fields)
        try:
            res = await call(sub.handler, payload, entry)
        except Exception:
            log.exception("zeal_asgi streams: handler failed on %s of %r", eid, sub.stream)
            res = False
        if res is not True:
            self.owner.counters.incr("failed")
            return
        for attempt in range(3):
            try:
                await self._ack(eid)
                self.owner.counters.incr("acked")
                return
            except ZealError as exc:
                # A lost XACK only means one more (idempotent) run after the reclaim.
                if attempt == 2:
                    log.warning("zeal_asgi streams: XACK of %s failed: %s", eid, exc)
                await asyncio.sleep(0.05 * (attempt + 1))


# -- idempotency helpers -------------------------------------------------------------------------

_WRITES = (
    "SET INCR INCRBY INCRBYFLOAT DECR DECRBY HSET HINCRBY HINCRBYFLOAT HDEL SADD SREM ZADD "
    "ZINCRBY ZREM RPUSH LPUSH DEL UNLINK EXPIRE PEXPIRE XADD APPEND SETBIT PFADD"
)
_ALLOWED = frozenset(_WRITES.split())


def _ttl_ms(ttl: float) -> int:
    return max(1, int(seconds("idempotency ttl", ttl, 365 * 86400, error=InvalidTTLError) * 1000))


def _idem_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key.encode("utf-8", "surrogatepass")) > 512:
        raise InvalidKeyError(f"idempotency key must be a non-empty str of <= 512 bytes: {key!r}")
    return f"idem:{key}"


async def idempotent(key: str, ttl: float = 86400.0, *, store: Store | None = None) -> bool:
    """``True`` the first time ``key`` is claimed within ``ttl`` seconds (``SET NX PX``).

    Claim-then-act: a crash between the claim and the effect loses that effect (at most once).
    For effects in Redis use :func:`apply_once`, which applies them with the claim atomically.
    """
    st = store if store is not None else Store.default()
    return bool(await st.eval(IDEM_CLAIM.source, [_idem_key(key)], [_ttl_ms(ttl)]))


async def apply_once(
    key: str,
    commands: Sequence[Sequence[str | bytes | int | float]],
    ttl: float = 86400.0,
    *,
    store: Store | None = None,
) -> bool:
    """Run Redis write ``commands`` exactly once per ``key`` (claim and effect in one script).

    Each command is ``(NAME, key, *args)``; keys are prefixed like every Store key.  Returns
    ``False`` (and changes nothing) when ``key`` was already applied within ``ttl`` seconds.
    A command that fails (e.g. WRONGTYPE) aborts the script after its earlier commands; the key
    is then not marked, so keep commands simple.

    Example::

        await apply_once(f"order:{entry.id}", [("HINCRBY", "totals", "eur", 12)])
    """
    st = store if store is not None else Store.default()
    keys = [_idem_key(key)]
    args: list[Any] = [_ttl_ms(ttl)]
    for cmd in commands:
        if len(cmd) < 2:
            raise ConfigError(f"a command is (NAME, key, *args), got {cmd!r}")
        name = str(cmd[0]).upper()
        if name not in _ALLOWED:
            raise ConfigError(f"apply_once: {name} is not an allowed write command")
        key_arg = cmd[1]
        if not isinstance(key_arg, str) or not key_arg:
            raise InvalidKeyError(f"apply_once: the key of {name} must be a non-empty str")
        keys.append(key_arg)
        args += [name, len(cmd) - 2, *cmd[2:]]
    return bool(await st.eval(APPLY_ONCE.source, keys, args))
