"""Redis clients per worker and event loop, the bounded slots, timeouts, retries and counters.

asyncio clients are bound to the loop that opened their sockets, and a forked worker must not
reuse its parent's sockets: :class:`RedisConnector` keeps one state per (process, loop), built
lazily on first use, so tests running several loops and gunicorn forks both get fresh ones.

Every call takes one of ``pool_size`` slots (waiting at most ``acquire_timeout``, then
:class:`~zeal_asgi.errors.PoolTimeoutError`) and ends within ``deadline`` (from the call's start);
each attempt also waits at most ``socket_timeout`` for its reply (plus ``connect_timeout`` when
it opens the connection).  Idempotent commands are retried on connection errors and timeouts
with full-jitter backoff inside that deadline (never INCR, HINCRBY, XADD, PUBLISH or a user
script), and redis-py exceptions are translated into the ZealError hierarchy.

Two ways in: :meth:`RedisConnector.call` / :meth:`RedisConnector.script` send one command (the
fast path of :mod:`._redis_direct` on a standalone server, its limits kept by one timer per
loop in :mod:`._redis_deadlines`), and :meth:`RedisConnector.run` awaits any ``op(client)`` on
the pooled redis-py client (pipelines, Cluster, Sentinel, a user's client), bounded by an
``asyncio.timeout_at``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import random
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from redis import exceptions as rx
from redis.asyncio.connection import AbstractConnection
from redis.asyncio.sentinel import Sentinel
from redis.utils import HIREDIS_AVAILABLE

from zeal_asgi._redis.clients import ClientFactory
from zeal_asgi._redis.config import RedisConfig
from zeal_asgi._redis.deadlines import Deadlines
from zeal_asgi._redis.direct import DirectConnections, direct_call, pack, pack_script
from zeal_asgi._redis.errors import retriable, translate
from zeal_asgi._redis.scripts import Script
from zeal_asgi.errors import BackendTimeoutError, ConfigError, PoolTimeoutError, ZealError
from zeal_asgi.shm.hoststats import host_stats

__all__ = ["COUNTERS", "HOST_KEYS", "LoopState", "RedisConnector"]

log = logging.getLogger("zeal_asgi.redis")
T = TypeVar("T")

COUNTERS = ("acquires", "acquire_timeouts", "clients_created", "commands", "errors", "retries")
"""Per-worker counters of :meth:`RedisConnector.stats` (also summed over the host)."""
HOST_KEYS = {name: f"redis_{name}_total" for name in COUNTERS}

_BACKOFF_BASE = 0.01
_BACKOFF_CAP = 0.2

if not HIREDIS_AVAILABLE:  # pragma: no cover - the redis extra installs it
    raise ConfigError("the redis backend needs hiredis: pip install 'zeal-asgi[redis]'")

_pid = os.getpid()  # cached: getpid is a system call, and every call checks it


def _after_fork() -> None:
    global _pid
    _pid = os.getpid()


os.register_at_fork(after_in_child=_after_fork)


@dataclass
class LoopState:
    """One event loop's client, slots, fast-path connections and limits (in one process)."""

    loop: asyncio.AbstractEventLoop
    pid: int
    client: Any
    slots: asyncio.Semaphore
    owned: bool
    direct: DirectConnections | None = None
    deadlines: Deadlines = field(init=False)
    sentinel: Sentinel | None = None
    in_use: int = 0
    waiting: int = 0
    booted: bool = False

    def __post_init__(self) -> None:
        self.deadlines = Deadlines(self.loop)


class RedisConnector:
    """Clients, slots, deadline, retries and counters of one Redis backend in this worker."""

    def __init__(self, cfg: RedisConfig) -> None:
        self.cfg = cfg
        self.where = cfg.describe()
        self._factory = ClientFactory(cfg, self._on_connect)
        self._states: dict[int, LoopState] = {}
        self.local = dict.fromkeys(COUNTERS, 0)
        """This worker's counters (see :data:`COUNTERS`); the host's are in host_stats()."""

    # -- counters ------------------------------------------------------------------------------

    def count(self, name: str, by: int = 1) -> None:
        """Add ``by`` to this worker's counter ``name`` and to the host's."""
        self.local[name] += by
        host_stats().incr(HOST_KEYS[name], by)

    def stats(self) -> dict[str, Any]:
        """Slot gauges and counters of this worker, and the counters summed over the host."""
        st = self._current()
        host = host_stats().host()
        direct = st.direct if st else None
        return {
            "target": self.where,
            "pool_size": self.cfg.pool_size,
            "in_use": st.in_use if st else 0,
            "waiting": st.waiting if st else 0,
            "connections": direct.open if direct else 0,
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
        return st if st is not None and st.loop is loop and st.pid == _pid else None

    def state(self) -> LoopState:
        """The state of the running loop in this process (built on first use, no I/O)."""
        loop = asyncio.get_running_loop()
        st = self._states.get(id(loop))
        if st is not None and st.loop is loop and st.pid == _pid:
            return st
        self._forget_dead()
        client, sentinel = self._factory.pooled()
        make = self._factory.direct_factory()
        st = LoopState(
            loop,
            _pid,
            client,
            asyncio.Semaphore(self.cfg.pool_size),
            owned=self.cfg.mode != "client",
            direct=DirectConnections(make) if make is not None else None,
            sentinel=sentinel,
        )
        self._states[id(loop)] = st
        return st

    def _forget_dead(self) -> None:
        for key, st in list(self._states.items()):
            if st.pid != _pid or st.loop.is_closed():
                # A forked child must not close its parent's sockets, and a closed loop cannot
                # run the close: drop the references (aclose() on the right loop avoids this).
                del self._states[key]
                if st.pid == _pid and st.owned:
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
        st.deadlines.close()
        if st.direct is not None:
            with contextlib.suppress(rx.RedisError, OSError):
                await st.direct.close()
        if not st.owned:
            return
        with contextlib.suppress(rx.RedisError, OSError):
            await st.client.aclose()
        if st.sentinel is not None:
            for s in st.sentinel.sentinels:
                with contextlib.suppress(rx.RedisError, OSError):
                    await s.aclose()

    async def dedicated(self, socket_timeout: float | None, for_key: bytes | None) -> Any:
        """A client with its own small pool, never a slot of the request pool (caller closes)."""
        st = self.state()
        return await self._factory.dedicated(
            st.client, st.sentinel, socket_timeout, for_key, self.where
        )

    # -- slots ---------------------------------------------------------------------------------

    async def acquire(self, st: LoopState, what: str, table: str | None) -> None:
        """Take a slot of ``st``, waiting at most ``acquire_timeout`` (PoolTimeoutError)."""
        slots = st.slots
        if not slots.locked():
            await slots.acquire()  # returns at once: no timer when a slot is free
        else:
            timeout = self.cfg.acquire_timeout
            st.waiting += 1
            try:
                async with asyncio.timeout(timeout):
                    await slots.acquire()
            except TimeoutError:
                self.count("acquire_timeouts")
                raise PoolTimeoutError(
                    f"{self._describe(what, table)}: all {self.cfg.pool_size} connections "
                    f"stayed busy for {timeout * 1000:.0f} ms (acquire_timeout); raise "
                    "pool_size or find the slow calls"
                ) from None
            finally:
                st.waiting -= 1
        self.count("acquires")

    def failed(
        self,
        exc: BaseException | None,
        expired: bool,
        at_deadline: bool,
        what: str,
        table: str | None,
    ) -> ZealError:
        """The error of a failed attempt: ours when its time limit ``expired`` (the call's
        deadline, or ``socket_timeout``), else the translation of ``exc``."""
        where = self._describe(what, table)
        if expired:
            cfg = self.cfg
            if at_deadline:
                return BackendTimeoutError(
                    f"{where}: no answer within the {cfg.deadline * 1000:.0f} ms deadline"
                )
            return BackendTimeoutError(
                f"{where}: no answer within socket_timeout ({cfg.socket_timeout * 1000:.0f} ms)"
            )
        assert exc is not None
        return translate(exc, where)

    def give_up(self, err: ZealError, attempt: int, idempotent: bool, left: float) -> float:
        """The backoff before the next attempt, or -1 to raise ``err`` now."""
        delay = random.uniform(0, min(_BACKOFF_CAP, _BACKOFF_BASE * 2**attempt))
        if not idempotent or not retriable(err) or attempt >= self.cfg.retries or delay >= left:
            self.count("errors")
            return -1.0
        self.count("retries")
        return delay

    # -- single commands (fast path on a standalone server) ------------------------------------

    async def call(
        self, args: tuple[Any, ...], what: str, *, idempotent: bool, table: str | None = None
    ) -> Any:
        """Send one command (name a str, arguments bytes, str or int) and return its reply.

        The reply is RESP2 as parsed by hiredis on a standalone server (``HGETALL``: a flat
        list) and redis-py's parsed reply elsewhere (``HGETALL``: a dict); every other command
        this package sends this way reads the same both ways.  ``what`` (and ``table``) name
        the call in error messages.
        """
        st = self.state()
        if st.direct is None:
            return await self.run(
                lambda c: c.execute_command(*args), what=what, idempotent=idempotent, table=table
            )
        return await direct_call(self, st, st.direct, pack(args), None, what, table, idempotent)

    async def script(
        self,
        script: Script,
        keys: Sequence[bytes],
        args: Sequence[Any],
        what: str,
        *,
        idempotent: bool,
        table: str | None = None,
    ) -> Any:
        """Run ``script`` (EVALSHA, then EVAL if the server lost it); its raw reply."""
        st = self.state()
        if st.direct is None:
            return await self.run(
                lambda c: script(c, keys, args), what=what, idempotent=idempotent, table=table
            )
        packed = pack_script(b"EVALSHA", script.sha, keys, args)
        fallback = (script.body, keys, args)
        return await direct_call(self, st, st.direct, packed, fallback, what, table, idempotent)

    # -- any operation on the pooled client ----------------------------------------------------

    async def run(
        self,
        op: Callable[[Any], Awaitable[T]],
        *,
        what: str,
        idempotent: bool,
        table: str | None = None,
    ) -> T:
        """Run ``op(client)`` within the slots, the deadline and the retry policy.

        Raises:
            PoolTimeoutError: no slot within ``acquire_timeout``.
            BackendTimeoutError: no answer within ``socket_timeout`` / ``deadline``.
            BackendUnavailableError (and its TLS/auth leaves), BackendResponseError.
        """
        st = self.state()
        loop = st.loop
        deadline = loop.time() + self.cfg.deadline
        await self.acquire(st, what, table)
        st.in_use += 1
        try:
            attempt = 0
            while True:
                self.count("commands")
                cm = asyncio.timeout_at(deadline)
                try:
                    async with cm:
                        return await op(st.client)
                except (rx.RedisError, rx.RedisClusterException, OSError) as exc:
                    # OSError covers TimeoutError, ours (expired) and the socket's
                    err = self.failed(exc, cm.expired(), True, what, table)
                    cause: BaseException = exc
                delay = self.give_up(err, attempt, idempotent, deadline - loop.time())
                if delay < 0:
                    raise err from cause
                attempt += 1
                await asyncio.sleep(delay)
        finally:
            st.in_use -= 1
            st.slots.release()

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
