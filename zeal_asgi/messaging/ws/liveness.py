"""Worker liveness for :class:`~zeal_asgi.ws.WSRouter`: rows of dead workers do not linger.

A worker that is SIGKILLed (or whose node vanishes) never runs ``release``: its clients' owner
rows and room memberships stay in the registry, and every broadcast to those rooms would keep
publishing to a channel nobody reads.  Two mechanisms clean that up:

* **Heartbeat** (Redis): every worker renews a mark that expires after ``worker_ttl``.  When a
  renewal finds the mark gone (Redis restarted without its data, failed over to a replica that
  never saw it, or this worker was paused past ``worker_ttl`` and was reaped), the worker
  registers its sockets and rooms again, but only where no newer row exists: a client that
  reconnected elsewhere keeps its new row.
* **Reaping**: a publish to a worker that nobody received is a hint, never a verdict (on a
  Cluster, PUBLISH counts only the receivers of one node; a subscriber may be reconnecting).
  The worker's liveness is then checked (its mark on Redis, its pid on one host); a dead
  worker's members of that room are purged in one step, with a presence ``leave`` for each, and
  its owner row is released if it still names the same connection.  A worker seen alive is not
  checked again for a third of ``worker_ttl``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import KW_ONLY, dataclass, field
from typing import TYPE_CHECKING, Any

from zeal_asgi.messaging.ws.conn import count

if TYPE_CHECKING:
    from zeal_asgi.messaging.ws.rooms import Registry

log = logging.getLogger("zeal_asgi.ws")

_ALIVE_CACHE_MAX = 4096


@dataclass(eq=False)
class Liveness:
    """One worker's heartbeat and its reaping of other workers' rows."""

    registry: Registry
    worker: str
    ttl: float
    _: KW_ONLY
    spawn: Callable[[Coroutine[Any, Any, Any]], asyncio.Task[Any]]
    reregister: Callable[[], Awaitable[int]]
    left: Callable[[str, str], Awaitable[None]]
    _alive_until: dict[str, float] = field(default_factory=dict, init=False)
    _pending: set[tuple[str, ...]] = field(default_factory=set, init=False)

    async def start(self) -> None:
        """Mark this worker alive and start renewing the mark (Redis only).

        Redis down at startup does not stop the worker: the renewal loop keeps trying.
        """
        if self.registry.beats:
            await self._beat()
            self.spawn(self._heartbeat())

    async def stop(self) -> None:
        """Drop this worker's mark (its rows were released just before; none on one host)."""
        await self.registry.forget_worker(self.worker)

    async def _heartbeat(self) -> None:
        lost = False
        while True:
            await asyncio.sleep(self.ttl / 3)
            lost = await self._beat() is False or lost
            if not lost:
                continue
            try:
                n = await self.reregister()
            except Exception as exc:  # tried again after the next beat
                count("heartbeat_errors")
                log.warning("zeal_asgi ws: registering this worker again failed: %s", exc)
                continue
            lost = False
            count("reregistrations")
            log.warning(
                "zeal_asgi ws: this worker's registration had expired or was lost "
                "(Redis restarted or failed over, or the worker was paused past "
                "worker_ttl=%s s); registered %d socket(s) again",
                self.ttl,
                n,
            )

    async def _beat(self) -> bool | None:
        """Renew the mark: whether it was current, ``None`` when Redis did not answer."""
        try:
            return await self.registry.beat(self.worker, self.ttl)
        except Exception as exc:  # the next beat retries; outages must not stop the worker
            count("heartbeat_errors")
            log.warning("zeal_asgi ws: heartbeat failed: %s", exc)
            return None

    # -- reaping -------------------------------------------------------------------------------

    def unreached(
        self, worker: str, room: str | None = None, owner: tuple[str, str] = ("", "")
    ) -> None:
        """A publish to ``worker`` reached nobody: check it (in the background) and reap its
        members of ``room`` and/or the owner row ``(client_id, conn_id)`` if it is dead."""
        if worker == self.worker or self._alive_until.get(worker, 0.0) > time.monotonic():
            return
        job = (worker, room or "", *owner)
        if job in self._pending:
            return
        self._pending.add(job)
        self.spawn(self._reap(job, worker, room, owner))

    async def _reap(
        self, job: tuple[str, ...], worker: str, room: str | None, owner: tuple[str, str]
    ) -> None:
        try:
            if await self.registry.worker_alive(worker):
                if len(self._alive_until) >= _ALIVE_CACHE_MAX:
                    self._alive_until.clear()
                self._alive_until[worker] = time.monotonic() + self.ttl / 3
                return
            if room is not None:
                gone = await self.registry.purge(room, worker)
                if gone:
                    count("reaped_members", len(gone))
                    log.info(
                        "zeal_asgi ws: worker %s is gone; removed its %d member(s) of %r",
                        worker,
                        len(gone),
                        room,
                    )
                for client_id in gone:
                    await self.left(room, client_id)
            client_id, conn_id = owner
            if client_id and await self.registry.release_owner(client_id, conn_id):
                count("reaped_owners")
        finally:
            self._pending.discard(job)
