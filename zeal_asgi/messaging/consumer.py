"""The Streams consumer of one subscription in one worker: reader, reaper and handler tasks."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from zeal_asgi._redis.errors import translate
from zeal_asgi._redis.scripts import text
from zeal_asgi.errors import BackendTimeoutError, ZealError
from zeal_asgi.messaging.stats import call, cancel_tasks
from zeal_asgi.messaging.streams import StreamEntry

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink
    from zeal_asgi.messaging.streams import ReliableSubscription, Streams

log = logging.getLogger("zeal_asgi.streams")

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
        self.queue: asyncio.Queue[tuple[str, dict[str, bytes], int]] = asyncio.Queue(
            maxsize=sub.concurrency
        )
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
        try:
            await self._call(
                "XGROUP CREATE",
                lambda c: c.xgroup_create(self.key, self.sub.group, id="0", mkstream=True),
            )
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
                owner.count("reconnects")
                delay = random.uniform(
                    0, min(owner.backoff_cap, owner.backoff_base * 2 ** min(attempt, 30))
                )
                log.warning("%s failed (%s); retrying in %.2f s", where, exc, delay)
                await asyncio.sleep(delay)

    async def _room(self) -> int:
        """Wait until the queue has room; how many entries fit."""
        while self.queue.full():  # noqa: ASYNC110 - a Queue has no "not full" event to await
            await asyncio.sleep(0.001)
        return self.queue.maxsize - self.queue.qsize()

    async def _read(self) -> None:
        sub = self.sub
        # On a Cluster the blocking read must go to the node that owns the stream.
        client = await self.redis.dedicated_client(for_key=self.key)
        limit = sub.block_ms / 1000 + self.owner.liveness_timeout
        cursor = "0"  # our own pending entries first (after a restart with the same name)
        try:
            while True:
                n, new = await self._room(), cursor == ">"
                read = client.xreadgroup(
                    sub.group,
                    sub.consumer,
                    {self.key: cursor},
                    count=n,
                    block=sub.block_ms if new else None,
                )
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
            self.owner.count("lost")
            await self._ack(eid)
        elif eid not in self.inflight:  # else our own slow handler has it (idle to Redis)
            self.owner.count("received")
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

            def claim(c: Any, start: str = cursor) -> Awaitable[Any]:
                return c.xautoclaim(  # type: ignore[no-any-return]
                    self.key, sub.group, sub.consumer, sub.min_idle_ms, start, count=sub.batch
                )

            reply = await self._call("XAUTOCLAIM", claim)
            cursor = text(reply[0])
            entries = _entries([[self.key, reply[1]]])
            if len(reply) > 2 and reply[2]:
                self.owner.count("lost", len(reply[2]))  # trimmed while pending (MAXLEN)
            if entries:
                claimed += len(entries)
                self.owner.count("reclaimed", len(entries))
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
        rows = await self._call(
            "XPENDING",
            lambda c: c.xpending_range(
                self.key,
                self.sub.group,
                min=ids[0],  # XAUTOCLAIM walks the pending list in id order
                max=ids[-1],
                count=len(ids) * 4 + 16,
                consumername=self.sub.consumer,
            ),
        )
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
        self.owner.count("dead_lettered")
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
            self.owner.count("failed")
            return
        for attempt in range(3):
            try:
                await self._ack(eid)
                self.owner.count("acked")
                return
            except ZealError as exc:
                # A lost XACK only means one more (idempotent) run after the reclaim.
                if attempt == 2:
                    log.warning("zeal_asgi streams: XACK of %s failed: %s", eid, exc)
                await asyncio.sleep(0.05 * (attempt + 1))
