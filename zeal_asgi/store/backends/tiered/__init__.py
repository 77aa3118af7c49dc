"""The tiered backend: a shared-memory L1 on every host in front of Redis (L2), kept coherent.

``Store.default_backend("tiered", {"url": "redis://...", "l1_ttl": 2.0, "invalidation_secret":
"..."})`` (or ``ZEAL_STORE_BACKEND=tiered``).  Besides the Redis options: ``l1_ttl`` (seconds,
default 5, floats welcome), ``l1_rows`` (L1 capacity per table, default the table's
``max_rows``), ``invalidation_secret`` (else ``ZEAL_TIERED_INVALIDATION_SECRET``; a str, or
``{kid: secret}`` with ``invalidation_kid`` for rotation).

* Reads (``get``, ``exists``) are served from L1 while the row is fresh (younger than
  ``l1_ttl``), else from L2, filling L1.  ``exists_cached()`` answers from L1 alone.
  ``count``, ``iterate`` and ``mget`` read L2 (``mget`` fills L1).
* Writes go to L2 first; then L1 is updated (whole rows) or invalidated, and an invalidation is
  published on ``{prefix}:__l1_invalidate`` so every other node drops its copy.  ``incr``,
  ``compare_and_set``, ``delete``, ``mset`` and ``clear`` all invalidate.
* Every worker runs one subscriber (started by ``start()``, stopped by ``aclose()``).  Until it is
  subscribed, and from the moment its connection is found broken, the worker does not trust L1;
  after every (re)subscription it flushes L1, since messages published meanwhile were lost.  A
  message lost without a disconnect is bounded by ``l1_ttl``.
* With a secret, invalidations are HMAC-SHA256 envelopes (key id, timestamp, nonce): forged,
  unknown-key, stale, replayed, oversize and malformed messages are dropped and counted.

``publish``, ``publish_reliable``, ``eval``, counters and :meth:`TieredBackend.redis_link`
(what pub/sub, Streams and WebSockets use) are L2's.
"""

from __future__ import annotations

import functools
import logging
import os
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

from zeal_asgi._redis.link import RedisLink
from zeal_asgi._redis.subscriber import RedisFeed, Subscriber
from zeal_asgi.errors import MessageRejectedError, ZealError
from zeal_asgi.shm.segments import server_identity
from zeal_asgi.store.backends.redis import RedisBackend
from zeal_asgi.store.backends.tiered.l1 import L1Cache
from zeal_asgi.store.backends.tiered.messages import InvalidationCodec, Secret
from zeal_asgi.store.base import (
    Capability,
    CounterBackend,
    Key,
    Row,
    StoreBackend,
    StoreBackendKind,
    TableSpec,
    count,
    counters,
    positive_int,
    seconds,
)

__all__ = ["TieredBackend"]

log = logging.getLogger("zeal_asgi.tiered")
T = TypeVar("T")

OPTIONS = ("l1_ttl", "l1_rows", "invalidation_secret", "invalidation_kid", "l1_namespace")
"""Options of the tiered backend on top of the Redis backend's."""
ENV_SECRET = "ZEAL_TIERED_INVALIDATION_SECRET"
_warned_unsigned = False


class TieredBackend(StoreBackend):
    """L1 shared table per host + L2 Redis (``Store.BACKEND_TIERED``)."""

    kind = StoreBackendKind.TIERED
    capabilities = frozenset(Capability)

    def __init__(
        self,
        l2: RedisBackend,
        *,
        l1_ttl: float = 5.0,
        l1_rows: int | None = None,
        invalidation_secret: Secret | None = None,
        invalidation_kid: str | None = None,
        l1_namespace: str | None = None,
    ) -> None:
        if l1_rows is not None:
            positive_int("tiered option l1_rows", l1_rows)
        self.l1_ttl = seconds("tiered option l1_ttl", l1_ttl, 86400)
        self.l2 = l2
        """The Redis backend behind L1."""
        self.l1 = L1Cache(l1_namespace or f"tiered:{l2.prefix}", self.l1_ttl, l1_rows)
        """The shared L1 tables."""
        if not invalidation_secret:
            global _warned_unsigned
            if not _warned_unsigned:
                _warned_unsigned = True
                log.warning(
                    "tiered backend: invalidations are UNAUTHENTICATED (no invalidation_secret): "
                    "anyone who can publish on Redis can forge them; set %s",
                    ENV_SECRET,
                )
        self.codec = InvalidationCodec(invalidation_secret, invalidation_kid)
        self.channel = l2.key("__l1_invalidate")
        """The invalidation channel, ``{prefix}:__l1_invalidate``."""
        self.synced = False
        """Whether this worker trusts L1 (its subscriber is subscribed and L1 was flushed since)."""
        self.sent = 0
        """Invalidation messages published by this worker."""
        self.subscriber = Subscriber(
            RedisFeed(l2.dedicated_client, interval=1.0, timeout=1.0),
            lambda channel, pattern, raw: self._on_message(raw),
            name="tiered invalidations",
            family="tiered",
            topics=[(self.channel, False)],
            on_synced=self._on_synced,
            on_lost=self._on_lost,
            backoff_base=0.05,
            backoff_cap=2.0,
        )
        """This worker's invalidation subscriber."""

    @classmethod
    def from_config(cls, conn: str | Mapping[str, Any] | None = None) -> TieredBackend:
        """Validate ``conn`` (a Redis URL or an options dict) without any I/O."""
        opts: dict[str, Any] = {}
        if isinstance(conn, Mapping):
            opts = {k: conn[k] for k in OPTIONS if conn.get(k) is not None}
        l2 = RedisBackend.from_config(conn, extra_keys=OPTIONS)
        if not opts.get("invalidation_secret"):
            opts["invalidation_secret"] = os.environ.get(ENV_SECRET) or None
        return cls(l2, **opts)

    def __repr__(self) -> str:
        return f"<TieredBackend l1_ttl={self.l1_ttl} l2={self.l2!r}>"

    def redis_link(self) -> RedisLink:
        """L2's link: pub/sub, Streams and WebSockets work on tiered as on redis."""
        return self.l2

    @functools.cached_property  # computed in the worker: the server id is known there
    def origin(self) -> str:
        """This server's id in invalidations (its own messages are ignored: L1 is shared)."""
        return f"{socket.gethostname()}:{server_identity().server_id}:{self.l1.namespace}"[:256]

    # -- lifecycle -----------------------------------------------------------------------------

    def declare(self, spec: TableSpec) -> None:
        """Register on L2 and allocate the L1 table (call before workers start)."""
        self.l2.declare(spec)
        self.l1.declare(spec)

    async def start(self) -> None:
        """Start this worker's invalidation subscriber, then L2 (PING).

        L1 is trusted once the subscriber has subscribed and flushed it.
        """
        await self.subscriber.start()
        try:
            await self.l2.start()
        except BaseException:
            await self.subscriber.stop()
            raise

    async def aclose(self) -> None:
        """Stop the subscriber (L1 is not trusted any more) and close L2's connections."""
        await self.subscriber.stop()
        await self.l2.aclose()

    # -- invalidations ----------------------------------------------------------------------------
    # Only while subscribed, and only after the flush that follows every (re)subscription, is L1
    # trusted: messages published meanwhile were lost.  Messages from this server itself are
    # ignored: its L1 is shared by all its workers and the writer already updated it.

    def _on_synced(self) -> None:
        self.l1.clear(None)  # whatever was published while we were away is lost: start over
        count("tiered", "l1_flushes")
        self.synced = True

    def _on_lost(self) -> None:
        self.synced = False
        count("tiered", "subscriber_lost")

    def _on_message(self, raw: bytes) -> None:
        try:
            inv = self.codec.decode(raw)
        except MessageRejectedError as exc:
            log.debug("tiered: invalidation dropped (%s): %s", exc.reason, exc)
            return
        if inv.origin == self.origin:
            count("tiered", "invalidations_own")
            return
        if inv.table not in self.l1.tables:
            count("tiered", "invalidations_unknown_table")
            return
        try:
            if inv.op == "clear":
                self.l1.clear(inv.table)
            else:
                self.l1.invalidate(inv.table, inv.keys)
        except ZealError:
            self.codec.counter.reject("malformed")  # a key this table cannot even hold
            return
        count("tiered", "invalidations_applied")

    async def _announce(self, table: str, op: str, keys: Sequence[bytes] = ()) -> None:
        """Tell the other nodes to drop ``keys`` (or, with ``op="clear"``, all) of ``table``."""
        for message in self.codec.encode(self.origin, table, op, keys):
            try:
                # Idempotent: dropping a key twice is harmless, a duplicate nonce is refused.
                await self.l2.publish_raw(self.channel, message, idempotent=True)
            except ZealError as exc:
                # The write itself succeeded: report, don't fail it.  Peers that lost the
                # message keep a copy for at most l1_ttl (or flush when their link drops).
                count("tiered", "invalidation_publish_failures")
                log.warning("tiered: invalidation of %s not published: %s", table, exc)
                return
            self.sent += 1
            count("tiered", "invalidations_sent")

    # -- reads ---------------------------------------------------------------------------------

    async def get(self, spec: TableSpec, key: Key, field: str | None = None) -> Any:
        """The row or field: from L1 when fresh, else L2 (then L1 is filled)."""
        if field is not None:
            spec.schema.column(field, spec.name)
        raw = spec.check_key(key)
        if self.synced:
            row = self.l1.lookup(spec, key)
        else:
            row = None
            count("tiered", "l1_bypass")
        if row is None:
            row = await self._read_through(spec, key, raw)
        return row if row is None or field is None else row[field]

    async def _read_through(self, spec: TableSpec, key: Key, raw: bytes) -> Row | None:
        token = self.l1.snapshot(spec.name, key)
        synced = self.synced
        fetched = time.monotonic()
        row: Row | None = await self.l2.get(spec, key)
        if row is None or not synced:
            return row
        if spec.mode == "ttl":
            # L1 must not outlive L2's expiry: ask how long the row has left, and make the L1
            # copy go stale no later than that.
            ms = await self.l2.row_pttl(spec.name, raw)
            if ms == -2:
                return row
            if ms >= 0:
                fetched -= max(0.0, self.l1.ttls[spec.name] - ms / 1000)
        if self.synced:
            self.l1.fill(spec, key, row, token, fetched)
        return row

    async def exists(self, spec: TableSpec, key: Key) -> bool:
        """``True`` when the row exists: a fresh L1 copy says so, else L2 answers."""
        spec.check_key(key)
        if self.synced and self.l1.is_fresh(spec, key):
            count("tiered", "l1_hits")
            return True
        return await self.l2.exists(spec, key)

    async def exists_cached(self, spec: TableSpec, key: Key) -> bool:
        """``True`` only when L1 holds a fresh copy of the row (no network at all)."""
        spec.check_key(key)
        return self.synced and self.l1.is_fresh(spec, key)

    async def count(self, spec: TableSpec) -> int:
        """Row count, from L2."""
        return await self.l2.count(spec)

    def iterate(self, spec: TableSpec) -> AsyncIterator[tuple[Any, Row]]:
        """Every row, from L2."""
        return self.l2.iterate(spec)

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys`` from L2 in one round trip; whole rows then fill L1."""
        for k in keys:
            spec.check_key(k)  # typed errors before L1 sees a key
        tokens = [self.l1.snapshot(spec.name, k) for k in keys]
        synced = self.synced
        rows = await self.l2.mget(spec, keys)
        if synced and self.synced and spec.mode != "ttl":
            for k, r, tok in zip(keys, rows, tokens, strict=True):
                if r is not None:
                    self.l1.fill(spec, k, r, tok)
        return rows

    # -- writes ---------------------------------------------------------------------------------

    async def _write(
        self,
        spec: TableSpec,
        keys: Sequence[Key],
        op: Callable[[], Awaitable[T]],
        rows: Sequence[Mapping[str, Any]] | None = None,
        *,
        conditional: bool = False,
    ) -> T:
        """Run ``op`` on L2, then update (whole ``rows``, one per key) or drop ``keys`` in L1,
        then tell the other nodes to drop them (``conditional``: only when ``op`` returned a
        true value)."""
        raws = [spec.check_key(k) for k in keys]
        t0 = time.monotonic()
        try:
            result = await op()
        except ZealError as exc:
            self.l1.invalidate(spec.name, keys)
            if isinstance(exc, TimeoutError):  # the write may have happened after all
                await self._announce(spec.name, "keys", raws)
            raise
        if conditional and not result:
            return result
        for i, k in enumerate(keys):
            row = rows[i] if rows is not None else None
            # A partial row merges into whatever L2 holds, which L1 may not know: drop instead.
            if row is not None and self.synced and len(row) == len(spec.schema.columns):
                self.l1.put(spec, k, spec.schema.validate_row(row, spec.name), t0)
            else:
                self.l1.invalidate(spec.name, [k])
        await self._announce(spec.name, "keys", raws)
        return result

    async def set(self, spec: TableSpec, key: Key, row: Mapping[str, Any]) -> bool:
        """Write to L2, then put the row in L1 (whole rows) or drop it, then tell the others."""
        return await self._write(spec, [key], lambda: self.l2.set(spec, key, row), [row])

    async def delete(self, spec: TableSpec, key: Key) -> bool:
        """Delete in L2 and L1; the others drop their copy."""
        return await self._write(spec, [key], lambda: self.l2.delete(spec, key))

    async def incr(
        self, spec: TableSpec, key: Key, column: str, by: int | float = 1
    ) -> int | float:
        """Atomic add in L2 (the truth); L1 copies are dropped everywhere."""
        return await self._write(spec, [key], lambda: self.l2.incr(spec, key, column, by))

    async def compare_and_set(
        self, spec: TableSpec, key: Key, column: str, expected: Any, new: Any
    ) -> bool:
        """Atomic compare-and-set in L2; on success L1 copies are dropped everywhere."""
        return await self._write(
            spec,
            [key],
            lambda: self.l2.compare_and_set(spec, key, column, expected, new),
            conditional=True,
        )

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Write many rows to L2 (one round trip), update or drop them in L1, invalidate."""
        return await self._write(
            spec, list(rows), lambda: self.l2.mset(spec, rows), list(rows.values())
        )

    async def clear(self, spec: TableSpec) -> int:
        """Remove every row from L2 and L1; every node drops its L1 copy of the table."""
        try:
            n = await self.l2.clear(spec)
        finally:
            self.l1.clear(spec.name)
        await self._announce(spec.name, "clear")
        return n

    # -- the rest is Redis's ---------------------------------------------------------------------

    async def ping(self) -> bool:
        """L2's PING."""
        return await self.l2.ping()

    async def publish(self, channel: str, payload: bytes) -> int:
        """Redis PUBLISH (``Store.publish``)."""
        return await self.l2.publish(channel, payload)

    async def publish_reliable(self, stream: str, payload: bytes, max_len: int | None) -> str:
        """Redis XADD (``Store.publish_reliable``)."""
        return await self.l2.publish_reliable(stream, payload, max_len)

    async def eval(self, script: str, keys: Sequence[str], args: Sequence[Any]) -> Any:
        """Lua on L2 (``Store.eval``); it bypasses L1, so don't write rows from scripts."""
        return await self.l2.eval(script, keys, args)

    def counter(self, name: str, initial: int) -> CounterBackend:
        """A Redis counter (shared by every node)."""
        return self.l2.counter(name, initial)

    def stats(self) -> dict[str, Any]:
        """L2's stats, plus ``tiered`` (subscriber, invalidations, L1 counters) and ``l1``."""
        tiered = {
            **counters("tiered"),
            "l1_ttl": self.l1_ttl,
            "origin": self.origin,
            "channel": self.channel,
            "synced": self.synced,
            "signed": self.codec.signer is not None,
            "subscriber": self.subscriber.stats(),
            "invalidation": self.codec.counter.stats(),
        }
        return {**self.l2.stats(), "tiered": tiered, "l1": self.l1.stats()}

    def close_shared(self) -> None:
        """Unlink the L1 tables (tests and explicit teardown; workers keep their mappings)."""
        self.l1.close_all()
