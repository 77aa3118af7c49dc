"""One Redis connection carrying many commands at once: automatic pipelining.

A :class:`Pipe` is an asyncio protocol with a hiredis reader.  A command sent while the
connection has nothing in flight is written at once (one round trip, no added latency); one sent
while others are in flight waits in a buffer that is written in one piece at the end of the
event loop's current pass, so every command issued by the tasks of that pass shares one write
(``coalesce=False``: each command is written on its own at once, as ioredis does without its
auto-pipelining; they still share the connection).
Replies come back in the order of the writes: each one settles the future at the head of the
queue, a result or an error reply for that caller alone.  The batch is bounded by the
connector's slots (commands in flight per loop).  That is node-redis' scheme (one write per
pass of the loop) rather than ioredis' (one batch in flight per node, the next one waiting for
its replies), which adds a round trip of latency to every command behind a batch.

Nothing in a queue is ever given another caller's reply: a caller that gives up (its time
limit, or a cancellation) leaves its place in the queue, and its late reply is read and
dropped.  When the connection fails, every command in it fails with :class:`Dropped`: one that
was written may have run, so only the connector's retry policy decides what is sent again.

Time limits cost no timer per command: each command carries its caller's deadline, and from
the moment it is written also ``socket_timeout``; the pipe arms one timer at the earliest limit.
When it fires, commands past their limit fail with :class:`Expired`, and a connection whose
oldest command got no reply for ``socket_timeout`` is declared hung and closed (everything
behind that command is stuck too).
"""

from __future__ import annotations

import asyncio
import math
import socket
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, cast

import hiredis
from redis.exceptions import ResponseError

_RESOLUTION = 0.001
"""Timers may fire up to a clock tick early (libuv counts milliseconds)."""

Opener = Callable[[Callable[[], asyncio.Protocol]], Awaitable[object]]
"""Opens the transport with the given protocol factory (``loop.create_connection`` & co)."""


def pack(args: Sequence[Any]) -> bytes:
    """One command in RESP (arguments are bytes, str, int or float)."""
    packed: bytes = hiredis.pack_command(tuple(args))
    return packed


class Template:
    """A command packed once but for a few arguments (``holes``: their positions), filled in per
    call: the arguments that never change cost nothing to encode again (``pack`` costs about
    0.2 µs per argument; a script's ARGV of ranges and zero fields is a dozen of them)."""

    __slots__ = ("_format",)

    def __init__(self, args: Sequence[Any], holes: Sequence[int]) -> None:
        parts = [b"*%d\r\n" % len(args)]
        for i, arg in enumerate(args):
            if i in holes:
                parts.append(b"$%d\r\n%b\r\n")
            else:
                one = pack((arg,))
                # without its array header; a literal '%' doubled for the format below
                parts.append(one[one.index(b"\n") + 1 :].replace(b"%", b"%%"))
        self._format = b"".join(parts)
        """The whole command as one bytes format: a fill is one ``%`` (a third of the time
        of joining the pieces)."""

    def fill(self, *values: bytes) -> bytes:
        """The command with ``values`` (bytes, one per hole, in order) in the holes."""
        out: list[int | bytes] = []
        for value in values:
            out += (len(value), value)
        return self._format % tuple(out)


class Expired(Exception):
    """A command's time limit passed before its reply came."""

    def __init__(self, at_deadline: bool) -> None:
        super().__init__("expired")
        self.at_deadline = at_deadline


class Dropped(ConnectionError):
    """The connection failed (or never opened) before a command's reply came: the command may
    or may not have run."""

    def __init__(self, cause: BaseException) -> None:
        super().__init__(str(cause) or type(cause).__name__)
        self.cause = cause


Sent = tuple["asyncio.Future[Any]", float, float]
"""A written command: its future, its caller's deadline, and when the connection counts as
hung if that command is the oldest and still unanswered (written + ``socket_timeout``)."""
Queued = tuple["asyncio.Future[Any]", float]
"""A command not written yet: its future and its caller's deadline."""


class Pipe(asyncio.Protocol):
    """One connection (opened by :meth:`open`) and the commands in flight on it."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        socket_timeout: float,
        coalesce: bool = True,
        on_write: Callable[[], None] = lambda: None,
    ) -> None:
        self.loop = loop
        self.on_write = on_write
        """Called for every write of commands to the socket."""
        self.socket_timeout = socket_timeout
        self.coalesce = coalesce
        """``False``: every command is written on its own, as soon as it is sent."""
        self.ready = False
        """Open, greeted (AUTH, SELECT), and not closed: commands are written."""
        self.closed = False
        self._transport: asyncio.Transport | None = None
        self._reader = hiredis.Reader(replyError=ResponseError)
        self._sent: deque[Sent] = deque()
        self._queued: list[Queued] = []
        self._chunks: list[bytes] = []
        self._flushing = False
        self._timer: asyncio.TimerHandle | None = None
        self._armed_at = math.inf

    # -- commands ----------------------------------------------------------------------------------

    def send(self, packed: bytes, deadline: float) -> asyncio.Future[Any]:
        """Queue one command; its future gets the reply, an error reply, or :class:`Expired`
        (at ``deadline``, or ``socket_timeout`` after it was written) or :class:`Dropped`."""
        fut = self.loop.create_future()
        if self.ready and not self._chunks and not (self._sent and self.coalesce):
            stale = self.loop.time() + self.socket_timeout
            self._sent.append((fut, deadline, stale))
            assert self._transport is not None
            self._transport.write(packed)
            self.on_write()
            deadline = min(deadline, stale)
        else:
            self._queued.append((fut, deadline))
            self._chunks.append(packed)
            if self.ready and not self._flushing:
                self._flushing = True
                self.loop.call_soon(self._flush)
        if deadline < self._armed_at:
            self._arm(deadline)
        return fut

    def _flush(self) -> None:
        self._flushing = False
        if not self.ready or not self._chunks:
            return
        assert self._transport is not None
        stale = self.loop.time() + self.socket_timeout
        self._sent.extend([(fut, deadline, stale) for fut, deadline in self._queued])
        data = b"".join(self._chunks)
        self._queued.clear()
        self._chunks.clear()
        self._transport.write(data)
        self.on_write()
        if stale < self._armed_at:
            self._arm(stale)

    # -- opening -----------------------------------------------------------------------------------

    async def open(self, opener: Opener, greeting: Sequence[bytes], within: float) -> None:
        """Open the connection and send ``greeting`` (AUTH, SELECT: each must succeed) within
        ``within`` seconds; then write what was queued meanwhile.  On failure every queued command
        fails with ``Dropped(exc)`` and the exception is raised."""
        try:
            async with asyncio.timeout(within):
                await opener(lambda: self)
                assert self._transport is not None
                replies = []
                for command in greeting:  # written at once, ahead of the queued commands
                    replies.append(self.loop.create_future())
                    self._sent.append((replies[-1], math.inf, math.inf))  # timeout: above
                    self._transport.write(command)
                for reply in replies:
                    await reply
        except BaseException as exc:
            self.abort(exc)
            raise
        self.ready = True
        self._flush()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Keep the transport; keepalive probes notice a peer that vanished silently."""
        self._transport = cast(asyncio.Transport, transport)  # uvloop's are not subclasses
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family != socket.AF_UNIX:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)

    # -- replies -----------------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        """Settle the oldest futures with the complete replies in ``data``."""
        reader = self._reader
        reader.feed(data)
        sent = self._sent
        while True:
            try:
                reply = reader.gets()
            except hiredis.ProtocolError as exc:
                self.abort(exc)
                return
            if reply is False:
                return
            if not sent:
                self.abort(ConnectionError("a reply nobody asked for: the stream is out of step"))
                return
            fut = sent.popleft()[0]
            if not fut.done():
                if reply.__class__ is ResponseError:
                    fut.set_exception(reply)
                else:
                    fut.set_result(reply)

    # -- failure -----------------------------------------------------------------------------------

    def connection_lost(self, exc: Exception | None) -> None:
        """Fail every command still waiting (see the module's docstring)."""
        self.abort(exc or ConnectionError("connection closed by the server"))

    def abort(self, exc: BaseException) -> None:
        """Close the connection now and fail every command in it with :class:`Dropped`."""
        self.ready = False
        self.closed = True
        if self._transport is not None:
            self._transport.abort()
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        futures = [e[0] for e in self._sent] + [e[0] for e in self._queued]
        self._sent, self._queued, self._chunks = deque(), [], []
        for fut in futures:
            if not fut.done():
                fut.set_exception(Dropped(exc))

    # -- time limits -------------------------------------------------------------------------------

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._armed_at = when
        self._timer = self.loop.call_at(when, self._fire)

    def _fire(self) -> None:
        self._timer = None
        self._armed_at = math.inf
        now = self.loop.time() + _RESOLUTION
        nearest = math.inf
        for fut, deadline, stale in [*self._sent, *((f, d, math.inf) for f, d in self._queued)]:
            if fut.done():
                continue
            limit = min(deadline, stale)
            if limit <= now:
                fut.set_exception(Expired(deadline < stale))
            elif limit < nearest:
                nearest = limit
        if self._sent:
            if self._sent[0][2] <= now:
                # no reply to the oldest command within socket_timeout: none behind it will come
                self.abort(TimeoutError("no reply to an earlier command within socket_timeout"))
                return
            nearest = min(nearest, self._sent[0][2])
        if nearest < math.inf:
            self._arm(nearest)
