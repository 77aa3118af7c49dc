"""``WSRouter``: reach a WebSocket client on whichever worker or node holds it.

Each worker subscribes one channel of its own, ``{prefix}:ws:w:{server}:{pid}`` (Redis; on the
table backend the same name on the host bus), and ``send_to_client`` publishes there only:
routing is targeted, never a global fan-out.  The owner row of a client names the worker and
the connection's ``conn_id`` (128 random bits), and only that connection receives: a message
is never delivered to a socket the row does not name (an older socket of the client on this
worker, or a new one that reuses the id or the file descriptor).  ``release`` deletes the
owner row only when its ``conn_id`` matches.  Empty or malformed ids never match.

Rooms: ``join``/``leave`` keep a roster and, per room, which workers hold members
(``room_servers``); ``broadcast`` publishes once per such worker.  Presence (join/leave events)
travels as its own message type, never mixed with user payloads.  With ``secret`` set, every
envelope (direct, room, presence) is HMAC-SHA256 signed with timestamp and nonce
(:mod:`zeal_asgi.signing`) and bound to the worker it is addressed to; forged, stale, replayed
and misdirected ones (a message captured on one worker's channel and republished on another's)
are dropped and counted.

Each socket gets a bounded send queue and a sender task; a client that does not keep up loses
its oldest queued messages (``overflow="drop_oldest"``, counted) or is closed with code 1013
(``overflow="close"``).  :meth:`WSRouter.serve` runs the receive loop and the sender together
and releases the client when either ends.

Worker liveness: a worker that is SIGKILLed (or whose node vanishes) never runs ``release``: its
clients' owner rows and room memberships stay in the registry, and every broadcast to those
rooms would keep publishing to a channel nobody reads.  Two mechanisms clean that up:

* **Heartbeat** (Redis): every worker renews a mark that expires after ``worker_ttl``.  When a
  renewal finds the mark gone (Redis restarted without its data, failed over to a replica that
  never saw it, or this worker was paused past ``worker_ttl`` and was reaped), the worker
  registers its sockets and rooms again within a third of ``worker_ttl``, but only where no
  newer row exists: a client that reconnected elsewhere keeps its new row.
* **Reaping**: a publish to a worker that nobody received is a hint, never a verdict (on a
  Cluster, PUBLISH counts only the receivers of one node; a subscriber may be reconnecting).
  The worker's liveness is then checked (its mark on Redis, its pid on one host); a dead
  worker's members of that room are purged in one step, with a presence ``leave`` for each, and
  its owner row is released if it still names the same connection.  A worker seen alive is not
  checked again for a third of ``worker_ttl``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
import os
import re
import socket
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any, Protocol

from zeal_asgi.errors import ConfigError, MessageRejectedError
from zeal_asgi.messaging.pubsub import PubSub
from zeal_asgi.messaging.stats import call, cancel_tasks, messaging_link, spawn
from zeal_asgi.messaging.ws.conn import (
    CONN_RE,
    MAX_MESSAGE,
    Conn,
    Message,
    check_client_id,
    check_room,
    encode_message,
)
from zeal_asgi.messaging.ws.rooms import RedisRegistry, Registry, ShmRegistry
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.segments import server_identity
from zeal_asgi.signing import Signer, parse_envelope
from zeal_asgi.store import Store
from zeal_asgi.store.base import StoreBackendKind, positive_int
from zeal_asgi.store.services import ServiceHost

log = logging.getLogger("zeal_asgi.ws")

_ALIVE_CACHE_MAX = 4096


def count(name: str, by: int = 1) -> None:
    """Add ``by`` to the host counter ``ws_<name>``."""
    host_stats().incr(f"ws_{name}", by)


async def finish(fut: asyncio.Future[None] | None) -> None:
    """Wait for a background write of an owner row; its failure is logged."""
    if fut is not None:
        try:
            await fut
        except Exception:
            log.exception("zeal_asgi ws: writing an owner row failed")


async def close_socket(websocket: Any, code: int) -> None:
    """Close ``websocket`` with ``code``; it may be gone already."""
    with contextlib.suppress(Exception):
        await websocket.close(code=code)


class PubSubHost(ServiceHost, Protocol):
    """The app object as the router sees it: store, services, and its per-worker pub/sub."""

    @property
    def pubsub(self) -> PubSub:
        """The app's pub/sub subscriber (the router adds its worker channel to it)."""


class WSRouter:
    """Route messages to WebSocket clients across workers and nodes.

    Args:
        target: a :class:`~zeal_asgi.Zeal` (the router becomes one of its services and uses its
            pub/sub) or a :class:`~zeal_asgi.Store` (call ``start()``/``stop()`` yourself).
        secret: signs every envelope (HMAC-SHA256, timestamp, nonce, destination); ``None``
            sends them plain.
        queue_size: messages queued per socket; ``overflow``: ``drop_oldest`` or ``close``.
        worker_ttl: on Redis, seconds after which a worker that stopped renewing its liveness
            mark (every ``worker_ttl / 3``) counts as dead and its rows may be reaped.

    Example::

        router = WSRouter(zeal, secret=os.environ["WS_SECRET"])

        @app.websocket("/ws/{user}")
        async def ws(websocket: WebSocket, user: str) -> None:
            await router.serve(user, websocket, on_message=handle)
    """

    def __init__(
        self,
        target: PubSubHost | Store,
        secret: str | bytes | Mapping[str, str | bytes] | None = None,
        *,
        queue_size: int = 256,
        overflow: str = "drop_oldest",
        signing_window: float = 30.0,
        owner_capacity: int = 65536,
        room_capacity: int = 65536,
        worker_ttl: float = 30.0,
    ) -> None:
        self.queue_size = positive_int("queue_size", queue_size)
        if overflow not in ("drop_oldest", "close"):
            raise ConfigError(f"overflow must be 'drop_oldest' or 'close', got {overflow!r}")
        ttl = worker_ttl
        if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0.3 <= ttl <= 86400:
            raise ConfigError(f"worker_ttl must be seconds in [0.3, 86400], got {ttl!r}")
        self.overflow = overflow
        self.worker_ttl = float(worker_ttl)
        self._own_pubsub = isinstance(target, Store)
        self.store: Store = target if isinstance(target, Store) else target.store
        self.pubsub: PubSub = PubSub(target) if isinstance(target, Store) else target.pubsub
        self.signer: Signer | None = None
        if secret:
            window, limit = signing_window, 2 * MAX_MESSAGE
            self.signer = Signer(
                secret, context="ws", window=window, max_bytes=limit, name="ws_signed"
            )
        self._capacities = {"owner_capacity": owner_capacity, "room_capacity": room_capacity}
        self._registry: Registry | None = None
        self._alive_until: dict[str, float] = {}  # workers seen alive, not checked again before
        self._reaping: set[tuple[str, ...]] = set()
        self._local: dict[str, Conn] = {}
        self._rooms: dict[str, set[Conn]] = {}  # room -> this worker's sockets in it
        self._presence: list[Callable[..., Any]] = []
        self._sub: Any = None
        self._bg: set[asyncio.Task[Any]] = set()
        self._closing: set[asyncio.Task[Any]] = set()  # releases of serve(), never cancelled
        self.server = self.worker = ""
        self.pubsub.prepare()  # the host counters and bus, allocated now, before workers start
        if self.store.kind is StoreBackendKind.TABLE:
            self.registry  # noqa: B018
        if not isinstance(target, Store):
            target.add_service(self)

    @property
    def registry(self) -> Registry:
        """Owner rows and rooms (Redis, or shared memory on the table backend)."""
        if self._registry is None:
            link = messaging_link(self.store.backend, "WSRouter")
            self._registry = RedisRegistry(link) if link else ShmRegistry(**self._capacities)
        return self._registry

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Subscribe this worker's channel (``Zeal`` calls it in every worker).

        With Redis down it starts anyway: the channel is subscribed and the heartbeat written
        as soon as Redis answers (the pub/sub state and ``ws_heartbeat_errors`` show it).
        """
        if self._sub is not None:
            return
        host = re.sub(r"[^A-Za-z0-9_.-]", "_", socket.gethostname())[:64]
        self.server = f"{host}-{server_identity().server_id}"
        self.worker = f"{self.server}:{os.getpid()}"
        self.registry  # noqa: B018 - fail at startup, not at the first message
        if self._own_pubsub:
            await self.pubsub.start()
        self._sub = await self.pubsub.add_system(self._channel(self.worker), self._on_wire)
        await self.pubsub.wait_ready(5.0)
        if self.registry.beats:  # on one host a worker is alive while its pid runs
            await self._beat()  # Redis down: the renewal loop keeps trying
            self._spawn(self._heartbeat())

    async def stop(self) -> None:
        """Release every local client and unsubscribe (tasks cancelled and awaited)."""
        if self._closing:
            await asyncio.wait(set(self._closing))  # releases under way finish first
        for client_id, conn in list(self._local.items()):
            await self.release(client_id, conn.conn_id)
        await cancel_tasks(*self._bg)
        sub, self._sub = self._sub, None
        if sub is not None:
            try:
                await self.registry.forget_worker(self.worker)  # its rows were released above
            except Exception as exc:  # the mark expires by itself after worker_ttl
                log.warning("zeal_asgi ws: could not drop this worker's liveness mark: %s", exc)
            await self.pubsub.unsubscribe(sub)
        if self._own_pubsub:
            await self.pubsub.stop()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """A background task that ``stop()`` cancels and awaits; failures are logged (by
        :func:`~zeal_asgi.messaging.stats.spawn`) and counted as ``ws_background_errors``."""
        return spawn(self._bg, coro, failures="ws_background_errors")

    @staticmethod
    def _channel(worker: str) -> str:
        return f"ws:w:{worker}"

    # -- owning sockets ------------------------------------------------------------------------

    def own(self, client_id: str, websocket: Any) -> str:
        """Register ``websocket`` as ``client_id``'s socket on this worker; its new conn_id.

        The owner row is written at once on the table backend and in the background on Redis
        (``join``/``release``/``send_to_client`` on this worker wait for it).  A previous socket
        of the same client on this worker is released.
        """
        check_client_id(client_id)
        if not self.worker:
            raise ConfigError("WSRouter.own(): the router is not started in this worker")
        old = self._local.pop(client_id, None)
        if old is not None:
            self._spawn(cancel_tasks(old.sender))
            self._forget(old)
        conn = Conn(client_id, websocket, asyncio.Queue(maxsize=self.queue_size))
        name = f"zeal-ws-send:{client_id}"
        conn.sender = asyncio.get_running_loop().create_task(self._send_loop(conn), name=name)
        self._local[client_id] = conn
        conn.registered = self._spawn(self.registry.set_owner(client_id, conn.conn_id, self.worker))
        count("owns")
        return conn.conn_id

    async def release(self, client_id: str, conn_id: str) -> bool:
        """Forget the socket ``conn_id`` of ``client_id``; ``True`` if the owner row was removed.

        Only the row naming ``conn_id`` is removed: the client may already own a newer socket
        here or elsewhere, and that row stays.
        """
        check_client_id(client_id)
        conn = self._local.get(client_id)
        if conn is not None and conn.conn_id == conn_id:
            del self._local[client_id]
            rooms = list(conn.rooms)
            self._forget(conn)  # no room message reaches it from here on
            await finish(conn.registered)
            await cancel_tasks(conn.sender)
            for room in rooms:
                try:
                    await self.registry.leave(room, client_id, self.worker)
                    await self._presence_event("leave", room, client_id)
                except Exception:
                    log.exception("zeal_asgi ws: leaving %r for %r failed", room, client_id)
        if not isinstance(conn_id, str) or not CONN_RE.match(conn_id):
            return False
        removed = await self.registry.release_owner(client_id, conn_id)
        count("releases" if removed else "release_kept")
        return removed

    async def _reregister(self) -> int:
        """Write this worker's owner rows and memberships again where none exist; how many
        clients were registered again.  A client whose row names another connection now lives
        elsewhere: its rooms are left alone too."""
        n = 0
        for client_id, conn in list(self._local.items()):
            await finish(conn.registered)
            row = (conn.conn_id, self.worker)
            if await self.registry.set_owner(client_id, *row, only_if_absent=True):
                n += 1
            elif await self.registry.get_owner(client_id) != row:
                continue
            for room in list(conn.rooms):
                await self.registry.join(room, client_id, self.worker, only_if_absent=True)
        return n

    def _forget(self, conn: Conn, rooms: Iterable[str] | None = None) -> None:
        """Take ``conn`` out of this worker's index of ``rooms`` (default: all of its rooms)."""
        for room in list(conn.rooms if rooms is None else rooms):
            conn.rooms.discard(room)
            members = self._rooms.get(room, set())
            members.discard(conn)
            if not members:
                self._rooms.pop(room, None)

    # -- sending -------------------------------------------------------------------------------

    def _seal(self, fields: dict[str, Any], to: str) -> bytes:
        """The envelope of ``fields``: signed for the worker ``to`` (or plain JSON)."""
        if self.signer is not None:
            return self.signer.sign({**fields, "to": to})
        return json.dumps(fields, separators=(",", ":"), allow_nan=False).encode()

    async def send_to_client(
        self, client_id: str, message: Message, *, conn_id: str | None = None
    ) -> bool:
        """Deliver to ``client_id``'s socket wherever it is; ``True`` when handed to its worker.

        Only the connection the owner row names receives it (with ``conn_id``, only if that is
        the one).  ``False`` when the client has no socket (or not that one).
        """
        check_client_id(client_id)
        body = encode_message(message)
        conn = self._local.get(client_id)
        if conn is not None:
            await finish(conn.registered)  # our own row is in place before it is read
        owner = await self.registry.get_owner(client_id)
        if owner is None or (conn_id is not None and owner[0] != conn_id):
            count("owner_missing")
            return False
        target_conn, worker = owner
        if worker == self.worker:
            conn = self._local.get(client_id)
            if conn is None or conn.conn_id != target_conn:
                return False  # the socket is gone: a release is on its way
            self._push(conn, body)
            count("sent_local")
            return True
        raw = self._seal({"t": "d", "c": client_id, "n": target_conn, **body}, worker)
        receivers = await self.pubsub.publish_system(self._channel(worker), raw)
        count("sent_remote")
        if not receivers:
            self._unreached(worker, owner=(client_id, target_conn))
        return receivers > 0

    async def join(self, room: str, client_id: str) -> bool:
        """Add this worker's client to ``room``; ``False`` if the client is not on this worker."""
        check_room(room)
        check_client_id(client_id)
        conn = self._local.get(client_id)
        if conn is None:
            return False
        await finish(conn.registered)
        await self.registry.join(room, client_id, self.worker)
        self._rooms.setdefault(room, set()).add(conn)
        conn.rooms.add(room)
        count("joins")
        await self._presence_event("join", room, client_id)
        return True

    async def leave(self, room: str, client_id: str) -> bool:
        """Remove ``client_id`` from ``room``; ``True`` if it was a member."""
        check_room(room)
        check_client_id(client_id)
        conn = self._local.get(client_id)
        if conn is not None:
            self._forget(conn, [room])
        removed = await self.registry.leave(room, client_id)
        if removed:
            count("leaves")
            await self._presence_event("leave", room, client_id)
        return removed

    async def room_servers(self, room: str) -> list[str]:
        """Workers (``server:pid``) that hold members of ``room``."""
        return await self.registry.room_servers(check_room(room))

    async def worker_alive(self, worker: str) -> bool:
        """Whether ``worker`` (a ``server:pid`` name, as :meth:`room_servers` lists and
        :attr:`worker` is for this one) is alive: on Redis its liveness mark is current (renewed
        every ``worker_ttl / 3``), on the table backend its process runs.  What the router
        checks before reaping a worker's rows; an app keeping its own per-worker records (a
        roster) uses it to drop those of dead workers."""
        return await self.registry.worker_alive(worker)

    async def broadcast(self, room: str, message: Message) -> int:
        """Send to every member of ``room``; the number of workers that received it."""
        check_room(room)
        count("broadcasts")
        return await self._to_room(room, {"t": "r", "r": room, **encode_message(message)})

    async def _to_room(self, room: str, fields: dict[str, Any]) -> int:
        # Unsigned, one envelope serves every worker (Redis publishes it in one round trip);
        # signed, each worker gets its own, bound to it.
        raw = None if self.signer is not None else self._seal(fields, "")
        pairs = None
        if raw is not None:
            wire = self.pubsub.system_wire(self._channel(""))  # every worker's, minus the worker
            pairs = await self.registry.publish_room(room, wire, raw)
        if pairs is None:

            def send(w: str) -> Awaitable[int]:
                return self.pubsub.publish_system(self._channel(w), raw or self._seal(fields, w))

            workers = await self.registry.room_servers(room)
            pairs = list(zip(workers, await asyncio.gather(*map(send, workers)), strict=True))
        for worker, n in pairs:
            if not n:
                self._unreached(worker, room=room)
        return sum(n for _, n in pairs)

    def on_presence(
        self, handler: Callable[[str, str, str], Any]
    ) -> Callable[[str, str, str], Any]:
        """Call ``handler(event, room, client_id)`` (``join``/``leave``) in every room worker."""
        self._presence.append(handler)
        return handler

    async def _presence_event(self, event: str, room: str, client_id: str) -> None:
        await self._to_room(room, {"t": "p", "e": event, "r": room, "c": client_id})

    # -- worker liveness -----------------------------------------------------------------------

    async def _heartbeat(self) -> None:
        lost = False
        while True:
            await asyncio.sleep(self.worker_ttl / 3)
            lost = await self._beat() is False or lost
            if not lost:
                continue
            try:
                n = await self._reregister()
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
                self.worker_ttl,
                n,
            )

    async def _beat(self) -> bool | None:
        """Renew the mark: whether it was current, ``None`` when Redis did not answer."""
        try:
            return await self.registry.beat(self.worker, self.worker_ttl)
        except Exception as exc:  # the next beat retries; outages must not stop the worker
            count("heartbeat_errors")
            log.warning("zeal_asgi ws: heartbeat failed: %s", exc)
            return None

    def _unreached(
        self, worker: str, room: str | None = None, owner: tuple[str, str] = ("", "")
    ) -> None:
        """A publish to ``worker`` reached nobody: check it (in the background) and reap its
        members of ``room`` and/or the owner row ``(client_id, conn_id)`` if it is dead."""
        if self._sub is None or worker == self.worker:
            return
        job = (worker, room or "", *owner)
        if self._alive_until.get(worker, 0.0) > time.monotonic() or job in self._reaping:
            return
        self._reaping.add(job)
        self._spawn(self._reap(job, worker, room, owner))

    async def _reap(
        self, job: tuple[str, ...], worker: str, room: str | None, owner: tuple[str, str]
    ) -> None:
        try:
            if await self.registry.worker_alive(worker):
                if len(self._alive_until) >= _ALIVE_CACHE_MAX:
                    self._alive_until.clear()
                self._alive_until[worker] = time.monotonic() + self.worker_ttl / 3
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
                    await self._presence_event("leave", room, client_id)
            client_id, conn_id = owner
            if client_id and await self.registry.release_owner(client_id, conn_id):
                count("reaped_owners")
        finally:
            self._reaping.discard(job)

    # -- receiving -----------------------------------------------------------------------------

    def _addressed(self, doc: dict[str, Any]) -> None:
        if doc.get("to") != self.worker:
            raise MessageRejectedError("replay", "a message addressed to another worker")

    async def _on_wire(self, raw: bytes, channel: str) -> None:
        try:
            if self.signer is not None:
                doc = self.signer.verify(raw, self._addressed)
            else:
                doc = parse_envelope(raw, MAX_MESSAGE * 2)
        except MessageRejectedError as exc:
            count("rejected")
            log.warning("zeal_asgi ws: dropped a message (%s)", exc.reason)
            return
        kind = doc.get("t")
        if kind == "d":
            conn = self._local.get(str(doc.get("c", "")))
            if conn is None or conn.conn_id != doc.get("n"):  # only the socket the row names
                count("stale_dropped")
                return
            self._push(conn, doc)
        elif kind == "r":
            for conn in list(self._rooms.get(str(doc.get("r", "")), ())):
                self._push(conn, doc)
        elif kind == "p":
            for handler in self._presence:
                try:
                    await call(handler, str(doc.get("e")), str(doc.get("r")), str(doc.get("c")))
                except Exception:
                    log.exception("zeal_asgi ws: presence handler %r failed", handler)
        else:
            count("rejected")

    def _push(self, conn: Conn, doc: Mapping[str, Any]) -> None:
        payload = doc.get("p")
        if not isinstance(payload, str):
            count("rejected")
            return
        item: str | bytes = payload
        if doc.get("b") == 1:
            try:
                item = base64.b64decode(payload, validate=True)
            except ValueError:
                count("rejected")
                return
        q = conn.queue
        if q.full():
            count("dropped_slow")
            if self.overflow == "close":
                conn.sender.cancel()
                self._spawn(close_socket(conn.websocket, 1013))
                return
            q.get_nowait()
        q.put_nowait(item)

    async def _send_loop(self, conn: Conn) -> None:
        ws = conn.websocket
        while True:
            item = await conn.queue.get()
            try:
                await (ws.send_bytes(item) if isinstance(item, bytes) else ws.send_text(item))
            except Exception as exc:  # the socket is gone; serve() notices the sender ended
                count("send_failed")
                log.debug("zeal_asgi ws: send to %r failed: %s", conn.client_id, exc)
                return
            count("delivered")

    async def serve(
        self,
        client_id: str,
        websocket: Any,
        on_message: Callable[[str | bytes], Any] | None = None,
        *,
        rooms: Iterable[str] = (),
        accept: bool = True,
    ) -> None:
        """Own ``websocket`` for ``client_id`` (joining ``rooms``), read it until it closes,
        then release it.

        The receive loop and the sender run together: when either ends, the other is
        cancelled (and awaited), and the client is released (leaving its rooms).
        """
        rooms = [check_room(r) for r in rooms]
        if accept:
            await websocket.accept()
        conn_id = self.own(client_id, websocket)
        conn = self._local[client_id]
        try:
            for room in rooms:
                await self.join(room, client_id)
        except BaseException:
            await self.release(client_id, conn_id)
            raise

        async def receive() -> None:
            while True:
                msg = await websocket.receive()
                if msg["type"] == "websocket.disconnect":
                    return
                data = msg.get("text") if msg.get("text") is not None else msg.get("bytes")
                if on_message is not None and data is not None:
                    await call(on_message, data)

        reader = asyncio.get_running_loop().create_task(receive())
        try:
            await asyncio.wait({reader, conn.sender}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            # Shielded: cancelled meanwhile (the server or a test client closing the session),
            # the release still runs to its end, so no owner row or membership outlives the
            # socket; the cancellation propagates as the caller's own.
            await asyncio.shield(spawn(self._closing, self._close(reader, client_id, conn_id)))
        if not reader.cancelled() and reader.exception() is not None:
            raise reader.exception()  # type: ignore[misc]

    async def _close(self, reader: asyncio.Task[None], client_id: str, conn_id: str) -> None:
        await cancel_tasks(reader)
        await self.release(client_id, conn_id)

    def stats(self) -> dict[str, Any]:
        """Local sockets and rooms of this worker."""
        out: dict[str, Any] = {"local_clients": len(self._local), "local_rooms": len(self._rooms)}
        if self.signer is not None:
            out["signed"] = self.signer.stats()
        return out
