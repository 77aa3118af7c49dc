"""A loopback TCP proxy in front of a real server, for the faults a server does not make on demand.

No toxiproxy or netem on this machine kind; the proxy runs in the test's own event loop and
``aclose()`` closes every socket and task it made.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable

from tests._harness.servers import HOST

__all__ = ["Proxy"]


class Proxy:
    """``127.0.0.1:port`` forwarding to ``upstream_port`` on 127.0.0.1.

    ``latency``: every client->server chunk is forwarded that many seconds late (toxiproxy's
    ``latency`` toxic; order is kept per connection). ``hangup``: while set, the server's replies
    are dropped and the client's connection closed instead, although its command reached the
    server and ran: what a client sees when the server dies right after executing a command.
    ``reply_budget``: when set, that many more bytes of replies are forwarded, then the proxy
    hangs up (mid-reply, if that is where the budget ends).
    """

    def __init__(self, upstream_port: int, latency: float = 0.0) -> None:
        self.upstream_port = upstream_port
        self.latency = latency
        self.hangup = False
        self.reply_budget: int | None = None
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> Proxy:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def address(self) -> str:
        """``127.0.0.1:PORT``, for a client's URL."""
        return f"{HOST}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for coro in (
            self._pump(reader, up_writer, self.latency, lambda data: (data, False)),
            self._pump(up_reader, writer, 0.0, self._replies),
        ):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def _replies(self, data: bytes) -> tuple[bytes, bool]:
        """The part of a reply chunk to forward, and whether to hang up after it."""
        if self.hangup:
            return b"", True
        if self.reply_budget is None:
            return data, False
        part = data[: self.reply_budget]
        self.reply_budget -= len(part)
        self.hangup = self.reply_budget == 0
        return part, self.hangup

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader,
        dst: asyncio.StreamWriter,
        delay: float,
        let_through: Callable[[bytes], tuple[bytes, bool]],
    ) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                await asyncio.sleep(max(0.0, due - loop.time()))
                dst.write(data)
                await dst.drain()
            dst.close()

        sender = asyncio.create_task(deliver())
        try:
            while data := await src.read(65536):
                part, hang_up = let_through(data)
                if part:
                    queue.put_nowait((loop.time() + delay, part))
                if hang_up:
                    break
            queue.put_nowait((loop.time(), b""))
            await sender
        except (OSError, asyncio.IncompleteReadError):
            dst.close()
        finally:
            sender.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await sender

    async def aclose(self) -> None:
        """Stop listening and close every proxied connection."""
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
        for w in list(self._writers):
            w.close()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await task
        for w in list(self._writers):
            with contextlib.suppress(OSError):
                await w.wait_closed()
