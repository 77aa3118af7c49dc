"""Where WebSocket clients live: owner rows and room rosters, in Redis or in shared memory.

Both registries offer the same operations, each atomic:

* owner row per client: ``conn_id`` + the worker that holds the socket; ``release_owner``
  deletes it only when the ``conn_id`` still matches (a late close of an old connection never
  removes the row of the client's new connection);
* room roster: member -> worker, and per room a worker -> member-count map, so ``room_servers``
  lists the workers to publish a room message to (targeted, no global fan-out).  Join and leave
  update both in one step (Lua on Redis, a host-wide stripe lock on shared memory);
* worker liveness, so the rows of a worker that died without releasing them can be reaped:
  on Redis a key per worker that its heartbeat keeps alive (``beat``), on shared memory the
  worker's pid (one host).  ``purge`` removes one worker's members from a room in one step.

Redis keys (all prefixed; ``{room}`` is a Cluster hash tag so one script touches one slot)::

    {prefix}:ws:owner:{client_id}          hash  c=conn_id w=worker
    {prefix}:ws:room:{<room>}:members      hash  client_id -> worker
    {prefix}:ws:room:{<room>}:servers      hash  worker -> members on it
    {prefix}:ws:alive:{worker}             string, expires unless the worker's heartbeat renews it
"""

from __future__ import annotations

import contextlib
import hashlib
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from zeal_asgi._redis.scripts import (
    WS_JOIN,
    WS_LEAVE,
    WS_OWN_NX,
    WS_PUBLISH_ROOM,
    WS_PURGE,
    WS_RELEASE,
    Script,
    text,
)
from zeal_asgi.errors import LockTimeoutError, ZealError
from zeal_asgi.shm.lease import Lease
from zeal_asgi.shm.process import process_alive

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink

_T = TypeVar("_T")
SEP = "\x1f"
_STRIPES = 64
_LOCK_TIMEOUT = 2.0


class RedisRegistry:
    """The registry in Redis (every node sees it)."""

    beats = True
    """Whether workers renew their liveness with :meth:`beat` (Redis) or not (pids)."""

    def __init__(self, redis: RedisLink) -> None:
        self.redis = redis

    def _owner_key(self, client_id: str) -> str:
        return self.redis.key("ws", "owner", client_id)

    def _room_keys(self, room: str) -> list[str]:
        tag = "{" + room + "}"
        return [self.redis.key("ws", "room", tag, part) for part in ("members", "servers")]

    async def _run(self, op: Callable[[Any], Awaitable[_T]], what: str) -> _T:
        """``await op(client)``: a read or an overwrite, retried after a transient failure."""
        return await self.redis.run(op, what=what, idempotent=True)

    async def _eval(self, script: Script, keys: list[str], args: list[Any], what: str) -> Any:
        """One of the registry's scripts on the backend's fast path (never retried: it writes)."""
        raw_keys = [k.encode("utf-8") for k in keys]
        return await self.redis.run_script(script, raw_keys, args, what=what, idempotent=False)

    async def set_owner(
        self, client_id: str, conn_id: str, worker: str, *, only_if_absent: bool = False
    ) -> bool:
        """Record that ``worker`` holds ``client_id``'s socket ``conn_id``: newest wins, or
        only when the client has no row (``only_if_absent``, a script); ``True`` when written."""
        key = self._owner_key(client_id)
        if only_if_absent:
            return bool(await self._eval(WS_OWN_NX, [key], [conn_id, worker], "ws owner row"))
        await self._run(lambda c: c.hset(key, mapping={"c": conn_id, "w": worker}), "ws owner row")
        return True

    async def get_owner(self, client_id: str) -> tuple[str, str] | None:
        """``(conn_id, worker)`` of the owner row (HMGET), or ``None``."""
        key = self._owner_key(client_id)
        conn, worker = await self._run(lambda c: c.hmget(key, ["c", "w"]), "ws owner lookup")
        if not conn or not worker:
            return None
        return text(conn), text(worker)

    async def release_owner(self, client_id: str, conn_id: str) -> bool:
        """Delete the row only if it still names ``conn_id`` (Lua); ``True`` when deleted."""
        res = await self._eval(WS_RELEASE, [self._owner_key(client_id)], [conn_id], "ws release")
        return bool(res)

    async def join(
        self, room: str, client_id: str, worker: str, *, only_if_absent: bool = False
    ) -> bool:
        """Add (or move, unless ``only_if_absent``) a member, roster and per-worker count in
        one script; ``True`` when something changed."""
        args = [client_id, worker, "1" if only_if_absent else "0"]
        return bool(await self._eval(WS_JOIN, self._room_keys(room), args, "ws join"))

    async def leave(self, room: str, client_id: str, worker: str = "") -> bool:
        """Remove a member (only if on ``worker`` when given), roster and per-worker count in
        one script; ``True`` when removed."""
        res = await self._eval(WS_LEAVE, self._room_keys(room), [client_id, worker], "ws leave")
        return bool(res)

    async def room_servers(self, room: str) -> list[str]:
        """Workers holding at least one member of ``room``: HSCAN in pages (a room's worker
        map is never loaded in one unbounded reply)."""
        key = self._room_keys(room)[1]

        async def scan(c: Any) -> list[str]:
            return [text(w) async for w, n in c.hscan_iter(key, count=256) if int(n) > 0]

        return await self._run(scan, "ws room servers")

    async def publish_room(
        self, room: str, wire_prefix: str, payload: bytes
    ) -> list[tuple[str, int]] | None:
        """Publish ``payload`` on ``wire_prefix + worker`` for every worker of ``room`` in one
        script; ``(worker, receivers)`` pairs (``None`` from a registry whose caller publishes)."""
        servers = self._room_keys(room)[1:]
        flat = await self._eval(WS_PUBLISH_ROOM, servers, [wire_prefix, payload], "ws room publish")
        return [(text(flat[i]), int(flat[i + 1])) for i in range(0, len(flat or ()), 2)]

    def _alive_key(self, worker: str) -> str:
        return self.redis.key("ws", "alive", worker)

    async def beat(self, worker: str, ttl: float) -> bool:
        """Mark ``worker`` alive for ``ttl`` seconds (``SET PX GET``); ``False`` if it was not
        marked alive (its first beat, or its mark expired or was lost with the data)."""
        key, ms = self._alive_key(worker), max(1, round(ttl * 1000))
        old = await self._run(lambda c: c.set(key, b"1", px=ms, get=True), "ws heartbeat")
        return old is not None

    async def worker_alive(self, worker: str) -> bool:
        """Whether ``worker``'s mark is current (``EXISTS``)."""
        key = self._alive_key(worker)
        return bool(await self._run(lambda c: c.exists(key), "ws liveness"))

    async def purge(self, room: str, worker: str) -> list[str]:
        """Remove every member ``worker`` holds in ``room`` in one script (O(members of the
        room), run once per death); their client ids."""
        gone = await self._eval(WS_PURGE, self._room_keys(room), [worker], "ws purge")
        return [text(c) for c in gone or ()]

    async def forget_worker(self, worker: str) -> None:
        """Drop ``worker``'s liveness mark (a clean shutdown)."""
        key = self._alive_key(worker)
        await self._run(lambda c: c.delete(key), "ws liveness")


class ShmRegistry:
    """The registry in shared-memory tables: every worker of this host, no Redis.

    Allocated when the router is made (before workers start).  Conditional updates hold one of
    ``64`` host-wide stripe locks (a CAS on a shared row; a lock whose holder died is taken
    over); the sections never await, so they last microseconds.  A worker is alive while its
    process is (``server:pid``, one host), so there is nothing to renew.
    """

    beats = False

    def __init__(self, *, owner_capacity: int = 65536, room_capacity: int = 65536) -> None:
        from zeal_asgi.shm.ext import Table

        def table(part: str, rows: int, columns: dict[str, Any], key_size: int) -> Table:
            return Table(rows, columns, name=f"__zeal_ws_{part}__", key_size=key_size)

        worker = ("string", 160)
        owner_row = {"c": ("string", 32), "w": worker}  # conn_id, and the worker holding it
        self.owner = table("owner", owner_capacity, owner_row, key_size=256)
        self.members = table("members", room_capacity, {"w": worker}, key_size=384)
        self.servers = table("servers", room_capacity, {"n": ("int", 4)}, key_size=256)
        self.locks = table("locks", _STRIPES, {"holder": ("int", 8)}, key_size=64)
        # A live holder keeps its stripe (its sections last microseconds): only death frees it.
        self._stripes = Lease(self.locks, 24 * 3600.0, column="holder")

    @contextlib.contextmanager
    def _locked(self, name: str) -> Iterator[None]:
        stripe = str(int.from_bytes(hashlib.blake2b(name.encode(), digest_size=4).digest()) % 64)
        deadline = time.monotonic() + _LOCK_TIMEOUT
        while (token := self._stripes.acquire(stripe)) is None:
            if time.monotonic() > deadline:
                raise LockTimeoutError(
                    f"ws registry stripe {stripe} held by pid {self._stripes.holder(stripe)} for "
                    f"over {_LOCK_TIMEOUT} s"
                )
            time.sleep(0)
        try:
            yield
        finally:
            self._stripes.release(stripe, token)

    async def set_owner(
        self, client_id: str, conn_id: str, worker: str, *, only_if_absent: bool = False
    ) -> bool:
        """One row write under the client's stripe lock (a release comparing the old row
        cannot delete this one between its check and its delete)."""
        with self._locked("o" + client_id):
            if only_if_absent and self.owner.exists(client_id):
                return False
            self.owner.set(client_id, {"c": conn_id, "w": worker})
            return True

    async def get_owner(self, client_id: str) -> tuple[str, str] | None:
        """One atomic row read."""
        row = self.owner.get(client_id)
        if row is None or not row["c"]:
            return None
        return str(row["c"]), str(row["w"])

    async def release_owner(self, client_id: str, conn_id: str) -> bool:
        """Compare and delete under the client's stripe lock."""
        with self._locked("o" + client_id):
            if self.owner.get(client_id, "c") != conn_id:
                return False
            return bool(self.owner.delete(client_id))

    def _dec(self, room: str, worker: str) -> None:
        key = room + SEP + worker
        if self.servers.incr(key, "n", -1) <= 0:
            self.servers.delete(key)

    async def join(
        self, room: str, client_id: str, worker: str, *, only_if_absent: bool = False
    ) -> bool:
        """Roster + per-worker count under the room's stripe lock."""
        mkey = room + SEP + client_id
        with self._locked("r" + room):
            old = self.members.get(mkey, "w")
            if old == worker or (old is not None and only_if_absent):
                return False
            if old is not None:
                self._dec(room, str(old))
            self.servers.incr(room + SEP + worker, "n", 1)
            try:
                self.members.set(mkey, {"w": worker})
            except ZealError:
                self._dec(room, worker)  # the roster is full: undo the count
                raise
            return True

    async def leave(self, room: str, client_id: str, worker: str = "") -> bool:
        """Roster + per-worker count under the room's stripe lock."""
        mkey = room + SEP + client_id
        with self._locked("r" + room):
            old = self.members.get(mkey, "w")
            if old is None or (worker and old != worker):
                return False
            self.members.delete(mkey)
            self._dec(room, str(old))
            return True

    async def room_servers(self, room: str) -> list[str]:
        """Scan of the per-worker counts (one host: a few thousand rows at most)."""
        pre = room + SEP
        return [
            str(k)[len(pre) :]
            for k, row in self.servers.items()
            if str(k).startswith(pre) and row["n"] > 0
        ]

    async def publish_room(
        self, room: str, wire_prefix: str, payload: bytes
    ) -> list[tuple[str, int]] | None:
        """``None``: the host bus publishes without a round trip, the router does it."""
        return None

    async def beat(self, worker: str, ttl: float) -> bool:
        """Nothing to renew: liveness is the worker's process."""
        return True

    async def worker_alive(self, worker: str) -> bool:
        """Whether the pid in ``server:pid`` runs (an unparsable name counts as alive)."""
        pid = worker.rpartition(":")[2]
        return not pid.isdigit() or process_alive(int(pid))

    async def purge(self, room: str, worker: str) -> list[str]:
        """Scan of the roster under the room's stripe lock (once per death)."""
        pre = room + SEP
        gone: list[str] = []
        with self._locked("r" + room):
            for key, row in list(self.members.items()):
                k = str(key)
                if k.startswith(pre) and row["w"] == worker:
                    self.members.delete(key)
                    gone.append(k[len(pre) :])
            self.servers.delete(pre + worker)
        return gone

    async def forget_worker(self, worker: str) -> None:
        """Nothing to drop."""

    def close(self) -> None:
        """Unlink the tables (tests)."""
        from zeal_asgi.shm.segments import destroy

        for t in (self.owner, self.members, self.servers, self.locks):
            if not t.closed:
                destroy(t)


Registry = RedisRegistry | ShmRegistry
"""Owner rows and room rosters: the same operations on Redis and in shared memory."""
