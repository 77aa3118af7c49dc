"""The Streams consumer of one subscription in one worker: reader, reaper and handler tasks."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import random
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from zeal_asgi.errors import BackendTimeoutError, ZealError
from zeal_asgi.messaging.streams import StreamEntry

if TYPE_CHECKING:
    from zeal_asgi.messaging.streams import ReliableSubscription, Streams

__all__ = ["Consumer"]

log = logging.getLogger("zeal_asgi.streams")

_XAUTOCLAIM_PAGES = 100
"""Pages followed per reaper pass (each page scans up to 10 x count PEL entries)."""


def _fields(raw: Any) -> dict[str, bytes]:
    if not raw:
        return {}
    items: Any
    if isinstance(raw, dict):
        items = raw.items()
    else:
        it = iter(raw)
        items = zip(it, it, strict=False)
    return {
        (k.decode("utf-8", "surrogateescape") if isinstance(k, bytes) else str(k)): (
            v if isinstance(v, bytes) else str(v).encode()
        )
        for k, v in items
    }


def _entries(reply: Any) -> list[tuple[str, Any]]:
    """``[(id, fields-or-None)]`` from an XREADGROUP reply (RESP2 list or RESP3 dict)."""
    if not reply:
        return []
    groups: list[Any] = []
    if isinstance(reply, dict):
        for value in reply.values():
            # the RESP3 shape wraps each stream's entry list once more
            groups.extend(value if value and isinstance(value[0], list) else [value])
    else:
        groups = [s[1] for s in reply]
    out: list[tuple[str, Any]] = []
    for entries in groups:
        for eid, fields in entries or ():
            if eid is None:
                continue
            out.append((eid.decode() if isinstance(eid, bytes) else str(eid), fields))
    return out


class Consumer:
    """Reader, reaper and handler tasks of one subscription in one worker."""

    def __init__(self, sub: ReliableSubscription, redis: Any, owner: Streams) -> None:
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
        self.is_coro = inspect.iscoroutinefunction(sub.handler)
        self.inflight: set[str] = set()

    async def start(self) -> None:
        await self._ensure_group()
        loop = asyncio.get_running_loop()
        name = f"zeal-stream:{self.sub.stream}"
        self.tasks.append(loop.create_task(self._supervise(self._read, "reader"), name=name))
        self.tasks.append(loop.create_task(self._supervise(self._reap, "reaper"), name=name))
        for _ in range(self.sub.concurrency):
            self.tasks.append(loop.create_task(self._work(), name=name))

    async def stop(self) -> None:
        tasks, self.tasks = self.tasks, []
        for t in tasks:
            t.cancel()
        for t in tasks:
            try:
                await t
            except asyncio.CancelledError:
                pass
            except Exception:
                log.exception("zeal_asgi streams: task failed while stopping")

    async def _client(self) -> Any:
        return await self.redis.client()

    async def _ensure_group(self) -> None:
        client = await self._client()
        try:
            await client.xgroup_create(self.key, self.sub.group, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise _translate(exc, f"XGROUP CREATE {self.sub.stream}") from exc

    async def _supervise(self, loop_fn: Callable[[], Awaitable[None]], what: str) -> None:
        attempt = 0
        while True:
            try:
                await loop_fn()
                attempt = 0
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                attempt += 1
                if self.owner.max_attempts and attempt >= self.owner.max_attempts:
                    self.owner.state = "failed"
                    log.error(
                        "zeal_asgi streams: %s of %r gave up after %d attempts: %s",
                        what,
                        self.sub.stream,
                        attempt,
                        exc,
                    )
                    return
                if "NOGROUP" in str(exc):
                    with contextlib.suppress(Exception):
                        await self._ensure_group()  # the stream was deleted under us
                self.owner.count("reconnects")
                cap = min(self.owner.backoff_cap, self.owner.backoff_base * 2 ** min(attempt, 30))
                delay = random.uniform(0, cap)
                log.warning(
                    "zeal_asgi streams: %s of %r failed (%s); retrying in %.2f s",
                    what,
                    self.sub.stream,
                    exc,
                    delay,
                )
                await asyncio.sleep(delay)

    async def _room(self) -> int:
        """Wait until the queue has room; how many entries fit."""
        while True:
            free = self.queue.maxsize - self.queue.qsize()
            if free > 0:
                return free
            await asyncio.sleep(0.001)

    async def _read(self) -> None:
        sub = self.sub
        # On a Cluster the blocking read must go to the node that owns the stream.
        client = await self.redis.dedicated_client(for_key=self.key)
        limit = sub.block_ms / 1000 + self.owner.liveness_timeout
        try:
            cursor = "0"  # our own pending entries first (after a restart with the same name)
            while True:
                n = await self._room()
                reply = await asyncio.wait_for(
                    client.xreadgroup(sub.group, sub.consumer, {self.key: cursor}, count=n),
                    limit,
                )
                got = _entries(reply)
                if not got:
                    break
                for eid, raw in got:
                    await self._offer(eid, raw, 0)
                cursor = got[-1][0]
            while True:
                n = await self._room()
                try:
                    reply = await asyncio.wait_for(
                        client.xreadgroup(
                            sub.group, sub.consumer, {self.key: ">"}, count=n, block=sub.block_ms
                        ),
                        limit,
                    )
                except TimeoutError:
                    raise BackendTimeoutError(
                        f"XREADGROUP on {sub.stream!r} got no answer within {limit:.1f} s"
                    ) from None
                for eid, raw in _entries(reply):
                    await self._offer(eid, raw, 1)
        finally:
            with contextlib.suppress(Exception):
                await client.aclose()

    async def _offer(self, eid: str, raw: Any, deliveries: int) -> None:
        if raw is None:
            # Deleted (trimmed) while pending: nothing to run; acknowledge so it leaves the PEL.
            self.owner.count("lost")
            await self._ack(eid)
            return
        self.owner.count("received")
        await self.queue.put((eid, _fields(raw), deliveries))

    async def _reap(self) -> None:
        sub = self.sub
        while True:
            await asyncio.sleep(sub.reclaim_interval * random.uniform(0.8, 1.2))
            await self.reclaim_pass()

    async def reclaim_pass(self) -> int:
        """Claim idle pending entries of any consumer and run them; the number claimed."""
        sub = self.sub
        client = await self._client()
        cursor = "0-0"
        claimed_total = 0
        for _ in range(_XAUTOCLAIM_PAGES):
            try:
                reply = await client.xautoclaim(
                    self.key,
                    sub.group,
                    sub.consumer,
                    min_idle_time=sub.min_idle_ms,
                    start_id=cursor,
                    count=sub.batch,
                )
            except Exception as exc:
                raise _translate(exc, f"XAUTOCLAIM {sub.stream}") from exc
            nxt = reply[0]
            cursor = nxt.decode() if isinstance(nxt, bytes) else str(nxt)
            entries = _entries([[self.key, reply[1]]])
            deleted = reply[2] if len(reply) > 2 else []
            if deleted:
                self.owner.count("lost", len(deleted))  # trimmed while pending (MAXLEN)
            if entries:
                claimed_total += len(entries)
                self.owner.count("reclaimed", len(entries))
                counts = await self._deliveries(client, [e for e, _ in entries])
                for eid, raw in entries:
                    n = counts.get(eid, sub.max_deliveries + 1)
                    if raw is None:
                        self.owner.count("lost")
                        await self._ack(eid)
                    elif n > sub.max_deliveries:
                        await self._dead_letter(eid, raw, n - 1)
                    else:
                        await self._offer_reclaimed(eid, raw, n)
            if cursor in ("0-0", "0"):
                break
        return claimed_total

    async def _offer_reclaimed(self, eid: str, raw: Any, deliveries: int) -> None:
        if eid in self.inflight:
            return  # our own slow handler still has it; it was only idle in Redis' eyes
        self.owner.count("received")
        await self.queue.put((eid, _fields(raw), deliveries))

    async def _deliveries(self, client: Any, ids: Sequence[str]) -> dict[str, int]:
        try:
            rows = await client.xpending_range(
                self.key,
                self.sub.group,
                min=min(ids, key=_id_key),
                max=max(ids, key=_id_key),
                count=len(ids) * 4 + 16,
                consumername=self.sub.consumer,
            )
        except Exception as exc:
            raise _translate(exc, f"XPENDING {self.sub.stream}") from exc
        out: dict[str, int] = {}
        for row in rows:
            mid = row["message_id"]
            out[mid.decode() if isinstance(mid, bytes) else str(mid)] = int(row["times_delivered"])
        return out

    async def _dead_letter(self, eid: str, raw: Any, deliveries: int) -> None:
        sub = self.sub
        fields = _fields(raw)
        fields.update(
            {
                "zeal_origin_stream": sub.stream.encode(),
                "zeal_origin_id": eid.encode(),
                "zeal_group": sub.group.encode(),
                "zeal_deliveries": str(deliveries).encode(),
            }
        )
        client = await self._client()
        try:
            if hasattr(client, "get_node_from_key"):
                # Cluster: the two streams may live on two shards; XADD first, so a crash in
                # between leaves a duplicate dead letter rather than a lost one.
                await client.xadd(self.dead_key, fields)
                await client.xack(self.key, sub.group, eid)
            else:
                async with client.pipeline(transaction=True) as pipe:
                    pipe.xadd(self.dead_key, fields)
                    pipe.xack(self.key, sub.group, eid)
                    await pipe.execute()
        except Exception as exc:
            raise _translate(exc, f"dead-letter {sub.stream}") from exc
        self.owner.count("dead_lettered")
        log.warning(
            "zeal_asgi streams: entry %s of %r moved to %r after %d deliveries",
            eid,
            sub.stream,
            sub.dead_letter,
            deliveries,
        )

    async def _ack(self, eid: str) -> None:
        client = await self._client()
        try:
            await client.xack(self.key, self.sub.group, eid)
        except Exception as exc:
            raise _translate(exc, f"XACK {self.sub.stream}") from exc

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
        data = fields.get("payload", b"")
        payload: Any = data
        if not sub.raw:
            try:
                payload = data.decode("utf-8")
            except UnicodeDecodeError:
                payload = data
        entry = StreamEntry(sub.stream, eid, sub.group, sub.consumer, max(deliveries, 1), fields)
        try:
            res = sub.handler(payload, entry)
            if inspect.isawaitable(res):
                res = await res
        except asyncio.CancelledError:
            raise
        except Exception:
            self.owner.count("failed")
            log.exception("zeal_asgi streams: handler failed on %s of %r", eid, sub.stream)
            return
        if res is True:
            for attempt in range(3):
                try:
                    await self._ack(eid)
                    break
                except ZealError as exc:
                    # A lost XACK only means one more (idempotent) run after the reclaim.
                    if attempt == 2:
                        log.warning("zeal_asgi streams: XACK of %s failed: %s", eid, exc)
                    await asyncio.sleep(0.05 * (attempt + 1))
            else:
                return
            self.owner.count("acked")
        else:
            self.owner.count("failed")


def _id_key(eid: str) -> tuple[int, int]:
    ms, _, seq = eid.partition("-")
    return int(ms), int(seq or 0)


def _translate(exc: BaseException, where: str) -> BaseException:
    if isinstance(exc, ZealError):
        return exc
    from zeal_asgi._redis.errors import translate

    return translate(exc, where)
