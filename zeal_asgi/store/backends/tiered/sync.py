"""Keeping the L1 of every node coherent: announcing writes, applying others' invalidations.

One :class:`L1Sync` per tiered backend and worker.  It owns the worker's subscriber and decides
when L1 may be trusted: only while subscribed, and only after the flush that follows every
(re)subscription (messages published meanwhile were lost).  Messages from this server itself
are ignored: its L1 is shared by all its workers and the writer already updated it.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Mapping, Sequence
from typing import Any

from zeal_asgi._redis.subscriber import RedisFeed, Subscriber
from zeal_asgi.errors import MessageRejectedError, ZealError
from zeal_asgi.shm.segments import server_identity
from zeal_asgi.store.backends.redis import RedisBackend
from zeal_asgi.store.backends.tiered.l1 import L1Cache
from zeal_asgi.store.backends.tiered.messages import InvalidationCodec
from zeal_asgi.store.base import TableSpec, count

__all__ = ["L1Sync"]

log = logging.getLogger("zeal_asgi.tiered")


class L1Sync:
    """Invalidation traffic of one tiered backend in this worker."""

    def __init__(
        self,
        l2: RedisBackend,
        l1: L1Cache,
        codec: InvalidationCodec,
        specs: Mapping[str, TableSpec],
    ) -> None:
        self.l1 = l1
        self.codec = codec
        self.channel = l2.key("__l1_invalidate")
        self.synced = False
        """Whether this worker trusts L1 (subscribed, and L1 flushed since)."""
        self.sent = 0
        """Invalidation messages published by this worker."""
        self._l2 = l2
        self._specs = specs
        self._origin: str | None = None
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

    @property
    def origin(self) -> str:
        """This server's id in invalidations (host, server id and L1 namespace)."""
        if self._origin is None:  # computed in the worker: the server id is known there
            ident = f"{socket.gethostname()}:{server_identity().server_id}:{self.l1.namespace}"
            self._origin = ident[:256]
        return self._origin

    async def start(self) -> None:
        """Start the subscriber (L1 is trusted once it has subscribed and flushed)."""
        await self.subscriber.start()

    async def stop(self) -> None:
        """Stop the subscriber; L1 is not trusted any more in this worker."""
        await self.subscriber.stop()

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
        if inv.table not in self._specs:
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

    async def announce(self, table: str, op: str, keys: Sequence[bytes] = ()) -> None:
        """Tell the other nodes to drop ``keys`` (or, with ``op="clear"``, all) of ``table``."""
        for message in self.codec.encode(self.origin, table, op, keys):
            try:
                # Idempotent: dropping a key twice is harmless, a duplicate nonce is refused.
                await self._l2.run(
                    lambda c, m=message: c.publish(self.channel, m),
                    what="publish tiered invalidation",
                    idempotent=True,
                )
            except ZealError as exc:
                # The write itself succeeded: report, don't fail it.  Peers that lost the
                # message keep a copy for at most l1_ttl (or flush when their link drops).
                count("tiered", "invalidation_publish_failures")
                log.warning("tiered: invalidation of %s not published: %s", table, exc)
                return
            self.sent += 1
            count("tiered", "invalidations_sent")

    def stats(self) -> dict[str, Any]:
        """Origin, channel, trust, subscriber and message counters of this worker."""
        return {
            "origin": self.origin,
            "channel": self.channel,
            "synced": self.synced,
            "signed": self.codec.signer is not None,
            "subscriber": self.subscriber.stats(),
            "invalidation": self.codec.stats(),
        }
