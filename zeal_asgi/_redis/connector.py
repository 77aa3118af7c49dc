"""Redis clients per worker and event loop, the slots, timeouts, retries and counters.

asyncio clients are bound to the loop that opened their sockets, and a forked worker must not
reuse its parent's sockets: :class:`RedisConnector` keeps one state per (process, loop), built
lazily on first use, so tests running several loops and gunicorn forks both get fresh ones.

Every call takes one of ``pool_size`` slots (waiting at most ``acquire_timeout``, then
:class:`~zeal_asgi.errors.PoolTimeoutError`) and ends within ``deadline`` (from the call's start);
each attempt also waits at most ``socket_timeout`` for its reply (plus ``connect_timeout`` when
it opens the connection).  Idempotent commands are retried on connection errors and timeouts
with full-jitter backoff inside that deadline (never INCR, HINCRBY, XADD, PUBLISH or a user
script), and redis-py exceptions are translated into the ZealError hierarchy.

Two ways in: :meth:`RedisConnector.call` / :meth:`RedisConnector.script` send one command on
the loop's pipelined connection to the server, or on a Cluster to the node that owns the key's
slot (:mod:`zeal_asgi._redis.pipe`), following MOVED and ASK redirections;
:meth:`RedisConnector.run` awaits any ``op(client)`` on the pooled redis-py client (pipelines,
SCAN, a user's client), bounded by an ``asyncio.timeout_at``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, TypeVar

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel
from redis.backoff import FullJitterBackoff
from redis.crc import key_slot
from redis.utils import HIREDIS_AVAILABLE

from zeal_asgi._redis.clients import Address, ClientFactory
from zeal_asgi._redis.config import RedisConfig
from zeal_asgi._redis.errors import retriable, translate
from zeal_asgi._redis.pipe import Dropped, Expired, Opener, Pipe, pack
from zeal_asgi._redis.scripts import Script
from zeal_asgi.errors import BackendTimeoutError, ConfigError, PoolTimeoutError, ZealError
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.process import current_pid

log = logging.getLogger("zeal_asgi.redis")
T = TypeVar("T")

COUNTERS = (
    "acquires",
    "acquire_timeouts",
    "clients_created",
    "commands",
    "writes",
    "errors",
    "retries",
)
"""Per-worker counters of :meth:`RedisConnector.stats` (also summed over the host); single
commands per socket write is ``commands / writes`` (pipelines and scans aside)."""
HOST_KEYS = {name: f"redis_{name}_total" for name in COUNTERS}

_BACKOFF = FullJitterBackoff(cap=0.2, base=0.01)  # waits uniform(0, min(cap, base * 2**tries))
_REDIRECTS = 5
"""MOVED/ASK replies followed per call (redis-py follows up to 16; a slot moves once)."""
_ASKING = pack((b"ASKING",))

if not HIREDIS_AVAILABLE:  # pragma: no cover - the redis extra installs it
    raise ConfigError("the redis backend needs hiredis: pip install 'zeal-asgi[redis]'")


@dataclass
class LoopState:
    """One event loop's clients, pipes and slots (in one process)."""

    loop: asyncio.AbstractEventLoop
    pid: int
    client: Any
    free: int
    """Slots free (``pool_size`` at first)."""
    sentinel: Sentinel | None = None
    queue: deque[asyncio.Future[None]] = field(default_factory=deque)
    """Callers waiting for a slot, oldest first: a released slot is handed to the first."""
    pipes: dict[Address | None, Pipe] = field(default_factory=dict)
    """The pipelined connection of each node (``None``: the one server); closed ones replaced."""
    opening: set[asyncio.Task[None]] = field(default_factory=set)
    topology: bool | None = None
    """Cluster: whether the slot map is current (``None``: never loaded)."""
    booted: bool = False


def _unpack_evalsha(packed: bytes) -> tuple[list[bytes], list[bytes]]:
    """The keys and args of an EVALSHA in RESP (for a ready client, which packs its own)."""
    reader = hiredis.Reader()
    reader.feed(packed)
    words = reader.gets()
    first = 3 + int(words[2])
    return words[3:first], words[first:]


class RedisConnector:
    """Clients, slots, deadline, retries and counters of one Redis backend in this worker."""

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self.where = cfg.describe()
        self._factory = ClientFactory(cfg, self._on_connect)
        self._states: dict[int, LoopState] = {}
        self._owned = cfg.mode != "client"  # a ready client is the user's to close
        self._cluster = cfg.mode == "cluster"
        self.local = dict.fromkeys(COUNTERS, 0)
        """This worker's counters (see :data:`COUNTERS`); the host's are in host_stats()."""
        self._synced = dict.fromkeys(COUNTERS, 0)
        """What the host's counters hold of :attr:`local`: single commands add to ``local``
        alone, and the difference goes to the host with the next socket write (or error, or
        ``stats()``): one update of shared memory per batch rather than two per command."""

    # -- counters ------------------------------------------------------------------------------

    def count(self, name: str, by: int = 1) -> None:
        """Add ``by`` to this worker's counter ``name`` and to the host's."""
        self.local[name] += by
        self._sync()

    def _sync(self) -> None:
        local, synced = self.local, self._synced
        if local == synced:
            return
        host = host_stats()
        for name, value in local.items():
            if value != synced[name]:
                host.incr(HOST_KEYS[name], value - synced[name])
                synced[name] = value

    def stats(self) -> dict[str, Any]:
        """Slot gauges and counters of this worker, and the counters summed over the host."""
        self._sync()
        st = self._current()
        host = host_stats().host()
        return {
            "target": self.where,
            "pool_size": self.cfg.pool_size,
            "auto_pipeline": self.cfg.auto_pipeline,
            "in_use": self.cfg.pool_size - st.free if st else 0,  # slots handed over count too
            "waiting": sum(not fut.done() for fut in st.queue) if st else 0,
            "connections": sum(1 for p in st.pipes.values() if not p.closed) if st else 0,
            **self.local,
            "host": {name: host.get(HOST_KEYS[name], 0) for name in COUNTERS},
        }

    def _describe(self, what: str, table: str | None) -> str:
        # built only when a call fails: no formatting on the hot path
        return f"{what} on {self.where}" if table is None else f"{what} {table!r} on {self.where}"

    # -- per-loop clients ----------------------------------------------------------------------

    def _current(self) -> LoopState | None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return None
        st = self._states.get(id(loop))
        return st if st is not None and st.loop is loop and st.pid == current_pid() else None

    def state(self) -> LoopState:
        """The state of the running loop in this process (built on first use, no I/O)."""
        st = self._current()
        if st is None:
            loop = asyncio.get_running_loop()
            self._forget_dead()
            client, sentinel = self._factory.pooled()
            st = LoopState(loop, current_pid(), client, self.cfg.pool_size, sentinel)
            self._states[id(loop)] = st
        return st

    def _forget_dead(self) -> None:
        for key, st in list(self._states.items()):
            if st.pid != current_pid() or st.loop.is_closed():
                # A forked child must not close its parent's sockets, and a closed loop cannot
                # run the close: drop the references (aclose() on the right loop avoids this).
                del self._states[key]
                if st.pid == current_pid() and self._owned:
                    log.warning(
                        "zeal_asgi: %s: a client was left open on a closed event loop; call "
                        "Store.aclose() (the lifespan does) before the loop ends",
                        self.where,
                    )

    async def _on_connect(self, conn: AbstractConnection) -> None:
        self.count("clients_created")
        await conn.on_connect()

    async def close(self) -> None:
        """Close the clients of the running loop (and drop those of dead loops)."""
        self._forget_dead()
        st = self._current()
        if st is None:
            return
        del self._states[id(st.loop)]
        for task in st.opening:
            task.cancel()
        closed = ConnectionError("the store was closed")
        for pipe in st.pipes.values():
            pipe.abort(closed)
        await asyncio.sleep(0)  # the transports close their sockets in the next pass
        if not self._owned:
            return
        for client in [st.client, *(st.sentinel.sentinels if st.sentinel else ())]:
            with contextlib.suppress(rx.RedisError, OSError):
                await client.aclose()

    async def dedicated(self, socket_timeout: float | None, for_key: bytes | None) -> Any:
        """A client with its own small pool, never a slot of the request pool (caller closes)."""
        st = self.state()
        return await self._factory.dedicated(
            st.client, st.sentinel, socket_timeout, for_key, self.where
        )

    # -- connections of single commands --------------------------------------------------------

    def _pipe(self, st: LoopState, addr: Address | None) -> Pipe:
        """A new pipelined connection to ``addr`` (there was none, or it closed): commands queue
        on it while it opens in a task."""
        cfg, factory = self.cfg, self._factory
        pipe = Pipe(st.loop, cfg.socket_timeout, cfg.auto_pipeline, partial(self.count, "writes"))
        opener = factory.opener(st.loop, addr, st.sentinel)
        task = st.loop.create_task(self._open(pipe, opener, factory.greeting(addr is not None)))
        st.opening.add(task)
        task.add_done_callback(st.opening.discard)
        st.pipes[addr] = pipe
        return pipe

    async def _open(self, pipe: Pipe, opener: Opener, greeting: list[bytes]) -> None:
        with contextlib.suppress(Exception):  # the queued commands got the error
            await pipe.open(opener, greeting, self.cfg.connect_timeout)
            self.count("clients_created")

    async def _node(self, st: LoopState, key: bytes | None) -> Address:
        """Cluster: the primary that owns ``key``'s slot (any primary without a key)."""
        client = st.client
        if not st.topology:
            # first use: the client loads the map; later, after a MOVED or a lost node, reload
            await (
                client.initialize() if st.topology is None else client.nodes_manager.initialize()
            )
            st.topology = True
        node = (
            client.get_default_node()
            if key is None
            else client.nodes_manager.get_node_from_slot(key_slot(key))
        )
        return node.host, node.port

    # -- calls ---------------------------------------------------------------------------------

    async def _acquire(self, st: LoopState, what: str, table: str | None) -> None:
        """Wait for a slot (none was free): at most ``acquire_timeout``.

        Raises:
            PoolTimeoutError: no slot within ``acquire_timeout``.
        """
        timeout = self.cfg.acquire_timeout
        fut: asyncio.Future[None] = st.loop.create_future()
        st.queue.append(fut)
        try:
            async with asyncio.timeout(timeout):
                await fut
        except BaseException as exc:
            if fut.done() and not fut.cancelled():
                self._release(st)  # handed over as the wait ended: pass it on
            else:
                fut.cancel()
            if not isinstance(exc, TimeoutError):
                raise
            self.count("acquire_timeouts")
            raise PoolTimeoutError(
                f"{self._describe(what, table)}: all {self.cfg.pool_size} slots stayed busy "
                f"for {timeout * 1000:.0f} ms (acquire_timeout): raise pool_size or find the "
                "slow calls"
            ) from None

    @staticmethod
    def _release(st: LoopState) -> None:
        queue = st.queue
        while queue:
            fut = queue.popleft()
            if not fut.done():
                fut.set_result(None)  # the slot goes to the oldest waiter, never counted free
                return
        st.free += 1

    def _retry(self, err: ZealError, tries: int, idempotent: bool, deadline: float) -> float | None:
        """The backoff before another attempt after ``err``, or ``None``: no more attempts."""
        delay = _BACKOFF.compute(tries)
        again = idempotent and tries < self.cfg.retries and retriable(err)
        if not again or delay >= deadline - asyncio.get_running_loop().time():
            self.count("errors")
            return None
        self.count("retries")
        return delay

    def failed(self, exc: BaseException | None, what: str, table: str | None) -> ZealError:
        """The error of a failed attempt: the translation of ``exc``; with ``exc`` an
        :class:`Expired` (or None: the call's deadline), ours."""
        where = self._describe(what, table)
        if exc is not None and not isinstance(exc, Expired):
            return translate(exc, where)
        cfg = self.cfg
        if exc is None or exc.at_deadline:
            limit = f"the {cfg.deadline * 1000:.0f} ms deadline"
        else:
            limit = f"socket_timeout ({cfg.socket_timeout * 1000:.0f} ms)"
        return BackendTimeoutError(f"{where}: no answer within {limit}")

    def call(
        self,
        args: tuple[Any, ...],
        what: str,
        *,
        idempotent: bool,
        table: str | None = None,
        packed: bytes | None = None,
    ) -> Awaitable[Any]:
        """Send one command (name a str, arguments bytes, str or int); awaited, its reply.

        The reply is RESP2 as parsed by hiredis (``HGETALL``: a flat list), except with a ready
        client of the user's (redis-py's parsed reply; ``HGETALL``: a dict); every other
        command this package sends this way reads the same both ways.  ``what`` (and
        ``table``) name the call in error messages; ``packed``: ``pack(args)``, kept by a
        caller that sends the same command again and again.
        """
        if not self._owned:  # a ready client of the user's sends it
            return self.run(
                lambda c: c.execute_command(*args), what=what, idempotent=idempotent, table=table
            )
        key = args[1] if len(args) > 1 else None
        return self._send(packed or pack(args), key, None, what, table, idempotent)

    def script(
        self,
        script: Script,
        keys: Sequence[bytes],
        args: Sequence[Any],
        what: str,
        *,
        idempotent: bool,
        table: str | None = None,
        packed: bytes | None = None,
    ) -> Awaitable[Any]:
        """Run ``script`` (EVALSHA, then EVAL if the server lost it); awaited, its raw reply.

        ``packed``: the EVALSHA already packed by the caller (a :class:`Template` filled in),
        which then stands for ``args`` (and ``keys`` but the first, which picks the node).
        """
        if packed is None:
            packed = pack((b"EVALSHA", script.sha, len(keys), *keys, *args))
        if not self._owned:  # a ready client of the user's runs it
            keys, args = _unpack_evalsha(packed)
            return self.run(
                lambda c: script(c, keys, args), what=what, idempotent=idempotent, table=table
            )
        return self._send(packed, keys[0] if keys else None, script, what, table, idempotent)

    async def _send(
        self,
        packed: bytes,
        key: bytes | None,
        lost: Script | None,
        what: str,
        table: str | None,
        idempotent: bool,
    ) -> Any:
        """One command on a pipe within a slot, the deadline and the retry policy (the errors
        of :meth:`run`).  ``lost``: the script ``packed`` runs with EVALSHA, for the EVAL sent
        when the server answers NOSCRIPT (it did not run the script)."""
        loop = asyncio.get_running_loop()
        st = self._states.get(id(loop))
        if st is None or st.loop is not loop or st.pid != current_pid():
            st = self.state()  # :meth:`state` inlined: a call less per command
        deadline = loop.time() + self.cfg.deadline
        if st.free and not st.queue:
            st.free -= 1
        else:
            await self._acquire(st, what, table)
        local = self.local
        local["acquires"] += 1
        cluster = self._cluster
        try:
            tries = 0
            while True:
                local["commands"] += 1
                addr: Address | None = None
                cause: BaseException | None
                asking, redirects = False, 0
                while True:  # one attempt: redirections and NOSCRIPT send again within it
                    pipe = None
                    try:
                        if cluster and not redirects:
                            addr = await self._node(st, key)
                        pipe = st.pipes.get(addr)
                        if pipe is None or pipe.closed:
                            pipe = self._pipe(st, addr)
                        if asking:  # written just before the command: both in one write
                            asked = pipe.send(_ASKING, deadline)  # its outcome read, and dropped
                            asked.add_done_callback(lambda f: f.cancelled() or f.exception())
                        return await pipe.send(packed, deadline)
                    except rx.ResponseError as exc:
                        text = str(exc)
                        if lost is not None and text.startswith("NOSCRIPT"):
                            # a restart, failover or SCRIPT FLUSH: the script did not run, so
                            # sending its source is safe even when it is not idempotent
                            packed, lost = lost.eval_of(packed), None
                            continue
                        if text.startswith(("MOVED ", "ASK ")) and redirects < _REDIRECTS:
                            # not run: the slot is served elsewhere (for good, or for now)
                            redirects += 1
                            asking = text.startswith("ASK")
                            st.topology = st.topology and asking
                            host, _, port = text.split()[2].rpartition(":")
                            addr = (host, int(port))
                            continue
                        if text.startswith("READONLY") and pipe is not None:
                            pipe.abort(exc)  # a demoted master: reconnect, and rediscover
                        err, cause = self.failed(exc, what, table), exc
                    except Expired as exc:
                        err, cause = self.failed(exc, what, table), None
                    except Dropped as exc:
                        st.topology = st.topology and False  # a Cluster node went away: reload
                        err, cause = self.failed(exc.cause, what, table), exc.cause
                    except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                        err, cause = self.failed(exc, what, table), exc
                    break
                delay = self._retry(err, tries, idempotent, deadline)
                if delay is None:
                    raise err from cause
                tries += 1
                await asyncio.sleep(delay)
        finally:
            if st.queue:
                self._release(st)
            else:
                st.free += 1

    async def run(
        self,
        op: Callable[[Any], Awaitable[T]],
        *,
        what: str,
        idempotent: bool,
        table: str | None = None,
    ) -> T:
        """Run ``op(client)`` on the pooled client within a slot, the deadline and the retry
        policy (:meth:`_send` is the single-command case, in one frame).

        Raises:
            PoolTimeoutError: no slot within ``acquire_timeout``.
            BackendTimeoutError: no answer within ``socket_timeout`` / ``deadline``.
            BackendUnavailableError (and its TLS/auth leaves), BackendResponseError.
        """
        st = self.state()
        deadline = st.loop.time() + self.cfg.deadline
        if st.free and not st.queue:
            st.free -= 1  # no timer, no await when a slot is free
        else:
            await self._acquire(st, what, table)
        local = self.local
        local["acquires"] += 1
        try:
            tries = 0
            while True:
                local["commands"] += 1
                cm = asyncio.timeout_at(deadline)
                try:
                    async with cm:
                        return await op(st.client)
                except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                    # OSError covers TimeoutError, ours (expired) and the socket's
                    err = self.failed(None if cm.expired() else exc, what, table)
                    delay = self._retry(err, tries, idempotent, deadline)
                    if delay is None:
                        raise err from exc
                tries += 1
                await asyncio.sleep(delay)
        finally:
            self._release(st)

    async def boot(self) -> None:
        """PING once per loop; fails loudly, naming the target (never the password)."""
        st = self.state()
        if st.booted:
            return
        if self.cfg.verification_weakened:
            log.warning(
                "zeal_asgi: TLS to %s does NOT verify the server (ssl_cert_reqs=%s, "
                "ssl_check_hostname=%s): anyone on the path can impersonate it",
                self.where,
                self.cfg.ssl_cert_reqs,
                self.cfg.ssl_check_hostname,
            )
        try:
            await self.call(("PING",), "boot PING", idempotent=True)
        except ZealError as exc:
            raise type(exc)(
                f"Redis boot check failed: {exc} (the target comes from ZEAL_REDIS_URL, or the "
                "url/cluster/sentinel options; ZEAL_ON_ERROR=fallback_table boots degraded)"
            ) from exc
        st.booted = True
