"""Same-host pub/sub: a message ring and a subscriber registry in shared memory (no Redis).

Publishers append to a ring of fixed-size slots (a shared ``Table``, one row per slot) under a
shared sequence number (an ``Atomic``); each subscribing worker reads the ring from its own
position and keeps the messages whose channel it subscribed to.  A payload longer than one slot
takes consecutive slots.  The registry (another shared table) lists every subscribing worker and
its channels and patterns, so ``publish`` returns the number of subscribed workers on this host,
and writes nothing when there is none.

Wake-ups: a worker with nothing to read flags itself asleep in the registry and waits on an
abstract Unix datagram socket named with a random token (kept in the registry, so another user
cannot predict the name and bind it first); a publisher sends one byte only to workers whose
flag it flips from 1 to 0.  The byte carries no data (the data stays in the 0600 segment, so a
forged wake-up is harmless), and a full socket queue only means a wake-up is already pending.
Sleepers also wake every ``WAKE_TIMEOUT`` seconds, which bounds the delay if a publisher dies
between its write and its wake-up.

Overflow policy: a worker that falls more than ``slots`` messages behind loses the oldest ones
(counted as ``pubsub_overrun``); publishers never block.  A slot reserved by a publisher that
died before writing it is skipped after ``HOLE_TIMEOUT`` (counted as ``pubsub_lost``).
"""

from __future__ import annotations

import atexit
import functools
import hashlib
import os
import re
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from zeal_asgi.errors import ConfigError, ValueTooLargeError
from zeal_asgi.shm.ext import Atomic, Table
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.shm.process import process_alive
from zeal_asgi.shm.segments import destroy, server_identity

CHANNEL_MAX = 256
"""Longest channel or pattern name, in UTF-8 bytes (a wire name adds a 2-byte namespace)."""
_WIRE_MAX = CHANNEL_MAX + 16
WAKE_TIMEOUT = 0.25
HOLE_TIMEOUT = 0.5
SNAPSHOT_MAX_AGE = 1.0
SWEEP_INTERVAL = 2.0
_YIELD_EVERY = 256

Deliver = Callable[[str, "str | None", bytes], object]
"""``deliver(wire_channel, matched_pattern_or_None, payload)``, called for each match (its
result is ignored)."""


def _char_class(p: str, i: int) -> tuple[str, int]:
    """The regex of the class whose first char (after its "[") is ``p[i]``, and the index of
    its last char: Redis reads it left to right, "x-y" is a range either way round ("z-a" is
    "a-z"), an escaped char stands for itself, and a class not closed ends with the pattern."""
    neg = i < len(p) and p[i] == "^"
    i += neg
    members: list[str] = []
    while i < len(p) and p[i] != "]":
        if p[i] == "\\" and i + 1 < len(p):
            i += 1
            members.append(re.escape(p[i]))
        elif i + 2 < len(p) and p[i + 1] == "-":
            lo, hi = sorted((p[i], p[i + 2]))
            members.append(f"{re.escape(lo)}-{re.escape(hi)}")
            i += 2
        else:
            members.append(re.escape(p[i]))
        i += 1
    body = "".join(members)
    # an empty class matches no char; negated, any char
    regex = f"[{'^' * neg}{body}]" if body else "." if neg else "(?!)"
    return regex, min(i, len(p) - 1)


def glob_to_regex(pattern: str) -> re.Pattern[str]:
    """Redis's glob (PSUBSCRIBE, KEYS) as a regex: ``*``, ``?``, ``\\x``, and classes ``[abc]``,
    ``[^a]``, ``[a-z]``, read as Redis reads them (see :func:`_char_class`)."""
    out: list[str] = []
    i = 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":
            cls, i = _char_class(pattern, i + 1)
            out.append(cls)
        elif c == "\\" and i + 1 < len(pattern):
            i += 1
            out.append(re.escape(pattern[i]))
        else:
            out.append(".*" if c == "*" else "." if c == "?" else re.escape(c))
        i += 1
    return re.compile("".join(out), re.DOTALL)


def user_wire(channel: str) -> str:
    """Wire name of a user channel on the ring (system topics are ``s:<name>``)."""
    return "u:" + channel


def _digest(text: str) -> str:
    return hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).hexdigest()


@dataclass
class _Snapshot:
    """The registry as a publisher sees it (rebuilt when the registry generation changes)."""

    gen: int
    taken: float
    exact: dict[str, set[str]] = field(default_factory=dict)
    patterns: list[tuple[re.Pattern[str], str]] = field(default_factory=list)
    cache: dict[str, tuple[str, ...]] = field(default_factory=dict)

    def targets(self, wire: str) -> tuple[str, ...]:
        hit = self.cache.get(wire)
        if hit is None:
            matched = {tok for rx, tok in self.patterns if rx.fullmatch(wire)}
            hit = tuple(self.exact.get(wire, set()) | matched)
            if len(self.cache) < 4096:
                self.cache[wire] = hit
        return hit


class HostBus:
    """The shared ring and registry of one server (every worker of the host attaches to it).

    Allocate it before workers start where possible (``host_bus()`` is called when a
    subscription is declared, when a ``WSRouter`` is made on the table backend, and on the first
    publish); named segments let workers attach later too.
    """

    def __init__(
        self, *, slots: int = 2048, slot_bytes: int = 1024, registry_rows: int = 4096
    ) -> None:
        for name, value, low in (
            ("slots", slots, 16),
            ("slot_bytes", slot_bytes, 64),
            ("registry_rows", registry_rows, 16),
        ):
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"host bus {name} must be an int >= {low}, got {value!r}")
        self.slots = slots
        self.slot_bytes = slot_bytes
        self.max_parts = max(1, slots // 8)
        self.max_payload = self.max_parts * slot_bytes
        """Largest payload in bytes: an eighth of the ring."""
        self.ring: Table = Table(
            slots,
            {
                "seq": ("int", 8),
                "nparts": ("int", 4),
                "part": ("int", 4),
                "channel": ("string", _WIRE_MAX),
                "data": ("bytes", slot_bytes),
            },
            name=f"__zeal_bus_ring_{slots}x{slot_bytes}__",
            key_size=16,
        )
        self.head: Atomic = Atomic(0, name="__zeal_bus_head__")
        self.registry: Table = Table(
            registry_rows,
            {
                "pid": ("int", 8),
                "start": ("int", 8),
                "sleeping": ("int", 1),
                "pattern": ("int", 1),
                "channel": ("string", _WIRE_MAX),
            },
            name="__zeal_bus_registry__",
            key_size=64,
        )
        self.regen: Atomic = Atomic(0, name="__zeal_bus_regen__")
        self._keys = [str(i) for i in range(slots)]
        self._snap: _Snapshot | None = None
        self._sender: socket.socket | None = None
        self._sender_pid = 0
        self._addr_prefix = f"zeal.{os.geteuid()}.{server_identity().server_id}.bus."

    # -- names ---------------------------------------------------------------------------------

    def wake_address(self, token: str) -> bytes:
        """Abstract-namespace address of a subscriber's wake-up socket."""
        return b"\0" + (self._addr_prefix + token).encode()

    @staticmethod
    def worker_key(token: str) -> str:
        """Registry row of a subscriber."""
        return f"w:{token}"

    @staticmethod
    def sub_key(token: str, wire: str, pattern: bool) -> str:
        """Registry row of one subscription."""
        return f"s:{token}:{'p' if pattern else 'c'}{_digest(wire)}"

    # -- publishing ----------------------------------------------------------------------------

    def publish(self, wire: str, payload: bytes) -> int:
        """Append ``payload`` for ``wire``; the number of subscribed workers on this host."""
        n = len(payload)
        sb = self.slot_bytes
        nparts = 1 if n <= sb else -(-n // sb)
        if nparts > self.max_parts:
            raise ValueTooLargeError(
                f"pub/sub payload of {n} bytes exceeds the host bus limit of {self.max_payload} "
                f"bytes ({self.max_parts} slots of {sb} bytes; configure_host_bus() sets them)"
            )
        targets = self._snapshot().targets(wire)
        if not targets:
            return 0  # like Redis: nobody listens, nothing is kept
        last = self.head.increment(nparts)
        first = last - nparts + 1
        ring, keys, slots = self.ring, self._keys, self.slots
        for i in range(nparts):
            data = payload[i * sb : (i + 1) * sb] if nparts > 1 else payload
            row = {"seq": first + i, "nparts": nparts, "part": i, "channel": wire, "data": data}
            ring.set(keys[(first + i) % slots], row)
        for tok in targets:
            self._wake(tok)
        return len(targets)

    def _wake(self, token: str) -> None:
        if not self.registry.compare_and_set(self.worker_key(token), "sleeping", 1, 0):
            return
        sock = self._sender
        if sock is None or self._sender_pid != os.getpid():
            if sock is not None:
                sock.close()  # inherited through a fork: this process's copy only
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            sock.setblocking(False)
            self._sender, self._sender_pid = sock, os.getpid()
        try:
            sock.sendto(b"!", self.wake_address(token))
        except BlockingIOError:
            pass  # its queue is full of wake-ups already
        except (ConnectionRefusedError, FileNotFoundError):
            # Nobody listens any more: the worker is gone (its rows go at the next sweep).
            self._snap = None

    def _snapshot(self) -> _Snapshot:
        gen = self.regen.get()
        snap = self._snap
        now = time.monotonic()
        if snap is not None and snap.gen == gen and now - snap.taken < SNAPSHOT_MAX_AGE:
            return snap
        self.prune_dead()
        gen = self.regen.get()
        snap = _Snapshot(gen, now)
        for key, row in self.registry.items():
            if not str(key).startswith("s:"):
                continue
            token = str(key).split(":", 2)[1]
            if row["pattern"]:
                snap.patterns.append((glob_to_regex(row["channel"]), token))
            else:
                snap.exact.setdefault(row["channel"], set()).add(token)
        self._snap = snap
        return snap

    def prune_dead(self) -> int:
        """Remove the registry rows of subscribers whose process died; how many workers."""
        alive = functools.cache(process_alive)  # a process may hold several subscribers
        dead = {
            str(key)[2:]
            for key, row in self.registry.items()
            if str(key).startswith("w:") and not alive(int(row["pid"]), int(row["start"]) or None)
        }
        if not dead:
            return 0
        for key in list(self.registry.keys()):
            parts = str(key).split(":", 2)
            if len(parts) >= 2 and parts[1] in dead:
                self.registry.delete(key)
        self.regen.increment()
        host_stats().incr("pubsub_bus_pruned", len(dead))
        return len(dead)

    def close_sender(self) -> None:
        """Close the wake-up socket of this process (reopened on the next publish)."""
        if self._sender is not None:
            self._sender.close()
            self._sender = None

    def close(self) -> None:
        """Unlink the bus segments (tests and explicit teardown)."""
        self.close_sender()
        for obj in (self.ring, self.head, self.registry, self.regen):
            if not obj.closed:
                destroy(obj)


_bus: HostBus | None = None
_options: dict[str, int] = {}
_lock = threading.Lock()


def configure_host_bus(
    *, slots: int = 2048, slot_bytes: int = 1024, registry_rows: int = 4096
) -> None:
    """Set the ring geometry; call it before the bus is first used (at import time).

    Every worker of a server must use the same values (they name the shared segment).
    """
    with _lock:
        if _bus is not None:
            raise ConfigError("configure_host_bus() must run before the host bus is first used")
        _options.update(slots=slots, slot_bytes=slot_bytes, registry_rows=registry_rows)


def host_bus() -> HostBus:
    """The host bus of this server (allocated on first use, shared by name)."""
    global _bus
    with _lock:
        if _bus is None or _bus.ring.closed:
            _bus = HostBus(**_options)
        return _bus


@atexit.register
def _close_sender_at_exit() -> None:
    if _bus is not None:
        _bus.close_sender()


def close_host_bus() -> None:
    """Unlink the bus of this process (tests)."""
    global _bus
    with _lock:
        if _bus is not None:
            _bus.close()
            _bus = None
