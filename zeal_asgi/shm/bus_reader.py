"""One worker's reader of the host bus: its subscriptions, its position, its wake-up socket."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import secrets
import socket
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from zeal_asgi.shm.bus import (
    _YIELD_EVERY,
    HOLE_TIMEOUT,
    SWEEP_INTERVAL,
    WAKE_TIMEOUT,
    Deliver,
    HostBus,
    glob_to_regex,
)
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.process import process_start_time


def _host_count(name: str, by: int) -> None:
    host_stats().incr(f"pubsub_{name}", by)


class BusSubscriber:
    """One worker's reader of the ring: its subscriptions, its position, its wake-up socket.

    The wake-up socket's name ends with a random token (kept in the 0600 registry), so no other
    process can predict it and bind it first.
    """

    def __init__(self, bus: HostBus, count: Callable[[str, int], None] = _host_count) -> None:
        self.bus = bus
        self._count = count
        self.pid = os.getpid()
        self.token = secrets.token_hex(12)
        self._wkey = bus.worker_key(self.token)
        self._refs: Counter[tuple[str, bool]] = Counter()
        self._patterns: dict[str, re.Pattern[str]] = {}
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        try:
            self._sock.setblocking(False)
            self._sock.bind(bus.wake_address(self.token))
            # Position first, rows second: any publish that counts us comes after our position.
            self.next_seq = bus.head.get() + 1
            self._register()
        except BaseException:
            self._sock.close()
            raise
        self._closed = False

    def _sub_row(self, wire: str, pattern: bool) -> None:
        row = {"pid": self.pid, "start": 0, "pattern": int(pattern), "channel": wire}
        self.bus.registry.set(self.bus.sub_key(self.token, wire, pattern), row)

    def _register(self) -> None:
        """Write every row of this subscriber (again, when a sweep took it for dead)."""
        start = process_start_time(self.pid) or 0
        self.bus.registry.set(self._wkey, {"pid": self.pid, "start": start, "sleeping": 0})
        for wire, pattern in self._refs:
            self._sub_row(wire, pattern)
        self.bus.regen.increment()

    def add(self, wire: str, pattern: bool) -> None:
        """Subscribe to a wire channel or pattern (reference counted; names are validated
        where they are made, :mod:`zeal_asgi.store.channels`)."""
        self._refs[wire, pattern] += 1
        if self._refs[wire, pattern] == 1:
            if pattern:
                self._patterns[wire] = glob_to_regex(wire)
            self._sub_row(wire, pattern)
            self.bus.regen.increment()

    def remove(self, wire: str, pattern: bool) -> None:
        """Drop one reference to a subscription; unregister it at zero."""
        self._refs[wire, pattern] -= 1
        if self._refs[wire, pattern] > 0:
            return
        del self._refs[wire, pattern]
        if pattern:
            self._patterns.pop(wire, None)
        self.bus.registry.delete(self.bus.sub_key(self.token, wire, pattern))
        self.bus.regen.increment()

    def close(self) -> None:
        """Unregister every row of this subscriber and close its socket."""
        if self._closed:
            return
        self._closed = True
        reg = self.bus.registry
        if not reg.closed:
            for wire, pattern in self._refs:
                reg.delete(self.bus.sub_key(self.token, wire, pattern))
            reg.delete(self._wkey)
            self.bus.regen.increment()
        self._refs.clear()
        self._patterns.clear()
        self._sock.close()

    # -- reading -------------------------------------------------------------------------------

    def _match(self, wire: str, payload: bytes, deliver: Deliver) -> None:
        if (wire, False) in self._refs:
            deliver(wire, None, payload)
        for pat, rx in self._patterns.items():
            if rx.fullmatch(wire):
                deliver(wire, pat, payload)

    async def _row(self, seq: int) -> dict[str, Any] | None:
        """The ring row of ``seq``; ``None`` when it was overwritten (or never written)."""
        key = self.bus._keys[seq % self.bus.slots]
        deadline = 0.0
        while True:
            row: dict[str, Any] | None = self.bus.ring.get(key)
            have = -1 if row is None else int(row["seq"])
            if have == seq:
                return row
            if have > seq:
                return None
            # Reserved but not written yet: the publisher is between its two steps.
            now = time.monotonic()
            if not deadline:
                deadline = now + HOLE_TIMEOUT
            elif now > deadline:
                self._count("lost", 1)
                return None
            await asyncio.sleep(0.0005)

    async def drain(self, deliver: Deliver) -> int:
        """Deliver every message published since the last call; the number read."""
        bus = self.bus
        head = bus.head.get()
        done = 0
        while self.next_seq <= head:
            oldest = head - bus.slots + 1
            if self.next_seq < oldest:
                self._count("overrun", oldest - self.next_seq)
                self.next_seq = oldest
            seq = self.next_seq
            row = await self._row(seq)
            if row is None or row["part"] != 0:
                # overwritten or lost, or the tail of a message whose head we lost
                self.next_seq = seq + 1
                head = bus.head.get()
                continue
            nparts = int(row["nparts"])
            parts = [row]
            while len(parts) < nparts and (nxt := await self._row(seq + len(parts))) is not None:
                parts.append(nxt)
            self.next_seq = seq + nparts
            if len(parts) < nparts:
                continue  # a part was overwritten: the message is lost
            self._match(str(row["channel"]), b"".join(p["data"] for p in parts), deliver)
            done += 1
            if done % _YIELD_EVERY == 0:
                await asyncio.sleep(0)
            if self.next_seq > head:
                head = bus.head.get()
        return done

    async def wait(self, wake_timeout: float = WAKE_TIMEOUT) -> None:
        """Sleep until a publisher wakes us (or ``wake_timeout``), unless messages are pending."""
        reg = self.bus.registry
        reg.set(self._wkey, {"sleeping": 1})
        if self.bus.head.get() >= self.next_seq:
            reg.set(self._wkey, {"sleeping": 0})
            return
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(wake_timeout):
                await asyncio.get_running_loop().sock_recv(self._sock, 64)
        with contextlib.suppress(OSError):  # BlockingIOError: every wake-up is read
            while True:
                self._sock.recv(64)

    async def run(self, deliver: Deliver) -> None:
        """Read forever (until cancelled), sweeping dead subscribers now and then."""
        next_sweep = time.monotonic() + SWEEP_INTERVAL
        while True:
            await self.drain(deliver)
            now = time.monotonic()
            if now >= next_sweep:
                next_sweep = now + SWEEP_INTERVAL
                self.bus.prune_dead()
                # A sweep by another worker may have taken us for dead after a long stall.
                if not self.bus.registry.exists(self._wkey):
                    self._register()
            await self.wait()
