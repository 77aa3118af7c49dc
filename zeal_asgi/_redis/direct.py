"""The single-command fast path: this loop's own redis-py connections, one packed write each.

A redis-py ``Redis.execute_command`` costs tens of microseconds of Python on top of the round
trip: its pool's lock and liveness probe, retry wrapper, observability hooks, response callbacks
and a task per write (``asyncio.wait_for`` in CPython 3.11).  On a standalone server the
connector instead holds one redis-py ``Connection`` per slot and sends each command as one
hiredis-packed buffer, its time limit kept by :mod:`._redis_deadlines` (no timer per call).

Invariant: a connection in :attr:`DirectConnections.idle` has no unread reply.  redis-py's
``send_packed_command``/``read_response`` close the connection on any failure (timeouts and
cancellation included) and an error *reply* is read in full, so a failed call leaves the
connection either closed (it reconnects on next use) or clean.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import hiredis
from redis import exceptions as rx
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import NoScriptError

from zeal_asgi.errors import SerializationError

if TYPE_CHECKING:
    from zeal_asgi._redis.connector import LoopState, RedisConnector

__all__ = ["DirectConnections", "direct_call", "pack", "pack_script"]


def pack(args: tuple[Any, ...]) -> bytes:
    """One command in RESP (args are bytes, str, or int)."""
    try:
        packed: bytes = hiredis.pack_command(args)
    except TypeError as exc:
        # Only the backend's own code reaches here, with arguments it built and checked.
        raise SerializationError(f"cannot send {args[0]!r}: {exc}") from None
    return packed


def pack_script(
    command: bytes, sha_or_body: str | bytes, keys: Sequence[bytes], args: Sequence[Any]
) -> bytes:
    """``EVALSHA sha n KEYS... ARGV...`` (or ``EVAL body ...``) in RESP."""
    return pack((command, sha_or_body, len(keys), *keys, *args))


class DirectConnections:
    """The fast path's connections of one event loop (at most one per connector slot)."""

    def __init__(self, make: Callable[[], AbstractConnection]) -> None:
        self._make = make
        self.idle: list[AbstractConnection] = []
        self.made: list[AbstractConnection] = []

    def take(self) -> AbstractConnection:
        """An idle connection (possibly closed: it reconnects on first use), or a new one."""
        if self.idle:
            return self.idle.pop()
        conn = self._make()
        self.made.append(conn)
        return conn

    def give(self, conn: AbstractConnection) -> None:
        """Return a connection taken with :meth:`take` (see the module's invariant)."""
        self.idle.append(conn)

    @property
    def open(self) -> int:
        """Connections with an open socket."""
        return sum(1 for c in self.made if c.is_connected)

    async def close(self) -> None:
        """Close every connection (idle or not)."""
        made, self.made, self.idle = self.made, [], []
        for conn in made:
            await conn.disconnect()


async def direct_call(
    owner: RedisConnector,
    st: LoopState,
    direct: DirectConnections,
    packed: bytes,
    script: tuple[bytes, Sequence[bytes], Sequence[Any]] | None,
    what: str,
    table: str | None,
    idempotent: bool,
) -> Any:
    """One command (or script) on this loop's own connection: slot, limits, retries, errors.

    The counterpart of :meth:`RedisConnector.run` for single commands; see the module's
    invariant for why a connection goes back to the idle list after any failure.
    """
    loop = st.loop
    cfg = owner.cfg
    deadline = loop.time() + cfg.deadline
    slots = st.slots
    if slots.locked():
        await owner.acquire(st, what, table)
    else:
        await slots.acquire()  # returns at once: no timer when a slot is free
        owner.count("acquires")
    st.in_use += 1
    conn: Any = direct.take()  # redis-py leaves connect() unannotated
    task = asyncio.current_task()
    assert task is not None
    limits = st.deadlines
    try:
        attempt = 0
        while True:
            owner.count("commands")
            at_deadline = True
            # redis-py bounds a connect by connect_timeout; this bounds it by the deadline
            limit = limits.start(task, deadline) if not conn.is_connected else None
            try:
                if limit is not None:
                    await conn.connect()
                    limits.end(limit)
                when = loop.time() + cfg.socket_timeout
                at_deadline = when >= deadline
                limit = limits.start(task, deadline if at_deadline else when)
                if loop.time() > conn.next_health_check and conn.health_check_interval:
                    await conn.check_health()  # PING after health_check_interval idle
                await conn.send_packed_command(packed, check_health=False)
                try:
                    return await conn.read_response()
                except NoScriptError:
                    if script is None:
                        raise
                # NOSCRIPT (restart, failover, SCRIPT FLUSH): the script did not run, so
                # sending its source is safe even when it is not idempotent
                await conn.send_packed_command(pack_script(b"EVAL", *script), False)
                return await conn.read_response()
            except asyncio.CancelledError:
                # cut mid-connect or mid-command: the connection's state is unknown
                await conn.disconnect(nowait=True)
                if limit is None or not limit.expired or task.uncancel():
                    raise  # not (only) ours: the caller's cancellation goes on
                err = owner.failed(None, True, at_deadline, what, table)
                cause: BaseException | None = None
            except (rx.RedisError, OSError) as exc:
                if not isinstance(exc, rx.ResponseError):
                    # not a reply read in full: the connection's state is unknown
                    await conn.disconnect(nowait=True)
                expired = limit is not None and limit.expired
                if expired:
                    task.uncancel()  # our cancellation, turned into another error
                err = owner.failed(exc, expired, at_deadline, what, table)
                cause = exc
            finally:
                if limit is not None:
                    limits.end(limit)
            delay = owner.give_up(err, attempt, idempotent, deadline - loop.time())
            if delay < 0:
                raise err from cause
            attempt += 1
            await asyncio.sleep(delay)
    finally:
        direct.give(conn)
        st.in_use -= 1
        slots.release()
