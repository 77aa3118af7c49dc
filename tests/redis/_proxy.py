"""A loopback TCP proxy that delays every client->server chunk (toxiproxy's ``latency`` toxic).

No toxiproxy or netem on this machine kind; this runs in the test's own event loop.  Order is
preserved per connection; ``aclose()`` closes every socket and task it made.
"""

from __future__ import annotations

import asyncio
import contextlib

from tests.servers import HOST


class LatencyProxy:
    """``127.0.0.1:port`` forwarding to ``upstream_port``, each request ``latency`` s late."""

    def __init__(self, upstream_port: int, latency: float) -> None:
        self.upstream_port = upstream_port
        self.latency = latency
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> LatencyProxy:
        """Listen on a free port."""
        self._server = await asyncio.start_server(self._handle, HOST, 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    @property
    def url(self) -> str:
        """``redis://127.0.0.1:port``."""
        return f"redis://{HOST}:{self.port}"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        try:
            up_reader, up_writer = await asyncio.open_connection(HOST, self.upstream_port)
        except OSError:
            writer.close()
            return
        self._writers.add(up_writer)
        for coro in (
            self._pump(reader, up_writer, self.latency),
            self._pump(up_reader, writer, 0.0),
        ):
            task = asyncio.create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(src: asyncio.StreamReader, dst: asyncio.StreamWriter, delay: float) -> None:
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
                queue.put_nowait((loop.time() + delay, data))
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
