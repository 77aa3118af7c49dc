"""Reliable messaging over Redis Streams: consumer groups, at-least-once, reclaim, dead letters.

``await Store.publish_reliable(stream, payload)`` appends an entry (``XADD``);
``zeal.subscribe_reliable(stream, handler)`` runs ``handler(payload, entry)`` for every entry,
once per consumer group, in whichever worker of whichever node reads it first:

* the group is created at id ``0`` with ``MKSTREAM``, so entries published before the first
  consumer started are delivered too;
* a consumer reads its own pending entries (``0``) first, then new ones (``>``); several
  handler tasks per worker (``concurrency``) run at once, fed by a bounded queue, and the reader
  only asks for as many entries as there is room for;
* the handler returning ``True`` acknowledges (``XACK``); ``False`` or an exception leaves the
  entry pending;
* a reaper in every worker claims entries idle for more than ``min_idle_ms`` (``XAUTOCLAIM``,
  following the cursor to the end) from any consumer, dead or slow, and runs them again;
  ``min_idle_ms`` must exceed the slowest handler, or a live consumer's entry runs twice;
* an entry delivered ``max_deliveries`` times without success goes to the dead-letter stream
  ``<stream>:dead`` (with its id, group and delivery count), then is acknowledged.

Handlers must be idempotent: an entry may run again after a crash.  :func:`apply_once` makes a
Redis-side effect exactly-once (claim and effect in one Lua script); :func:`idempotent` claims a
key for effects outside Redis.
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from zeal_asgi._redis.scripts import APPLY_ONCE, IDEM_CLAIM
from zeal_asgi.errors import ConfigError, InvalidKeyError, InvalidTTLError
from zeal_asgi.messaging.stats import RUNNERS, Counters
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Store
from zeal_asgi.store.base import Capability, positive_int, seconds, unsupported
from zeal_asgi.store.channels import validate_channel

if TYPE_CHECKING:
    from zeal_asgi.messaging.consumer import Consumer

log = logging.getLogger("zeal_asgi.streams")

_COUNTERS = "received acked failed reclaimed dead_lettered lost reconnects"


@dataclass(frozen=True)
class StreamEntry:
    """What a reliable handler gets besides the payload."""

    stream: str
    id: str
    group: str
    consumer: str
    deliveries: int
    """How many times this entry was delivered, this time included."""
    fields: dict[str, bytes] = field(repr=False)


StreamHandler = Callable[[Any, StreamEntry], "bool | Awaitable[bool]"]
"""``handler(payload, entry) -> bool`` (sync or async): ``True`` acknowledges."""


@dataclass(eq=False)
class ReliableSubscription:
    """One handler on one stream and group, with its options."""

    stream: str
    handler: StreamHandler
    group: str
    consumer: str
    batch: int = 16
    block_ms: int = 1000
    concurrency: int = 4
    min_idle_ms: int = 30_000
    reclaim_interval: float = 5.0
    max_deliveries: int = 5
    dead_letter: str | None = None
    raw: bool = False
    fixed_consumer: bool = False
    """The consumer name was given; otherwise each worker takes its own at start."""

    def __post_init__(self) -> None:
        validate_channel(self.stream, "stream")
        for name in ("batch", "block_ms", "concurrency", "min_idle_ms", "max_deliveries"):
            positive_int(name, getattr(self, name))
        self.reclaim_interval = seconds("reclaim_interval", self.reclaim_interval, 86400)
        for name in ("group", "consumer"):
            value = getattr(self, name)
            if not isinstance(value, str) or not value or len(value) > 200:
                raise InvalidKeyError(f"{name} must be a non-empty str of <= 200 chars")
        if self.dead_letter is None:
            self.dead_letter = f"{self.stream}:dead"
        validate_channel(self.dead_letter, "dead-letter stream")


def default_consumer() -> str:
    """``host:pid:nonce``: unique per process, so two workers never share a pending list."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


def _default_group(handler: Callable[..., Any]) -> str:
    # Stable on every node and worker running the same code, distinct per handler: each
    # handler sees every entry once, and the workers running it share the work.
    name = f"{getattr(handler, '__module__', '?')}.{getattr(handler, '__qualname__', '?')}"
    return name[-200:]


class Streams:
    """The per-worker reliable consumers of a :class:`~zeal_asgi.Zeal` app (a ``Zeal`` service).

    Args:
        store: the Store whose backend holds the streams (default: ``Store.default()``).
        max_attempts: consecutive failures of a reader or reaper before it gives up; 0 = never.
            One that gave up makes ``state`` (and ``Store.stats()["streams"]["state"]``)
            ``failed``.
        backoff_base: first step of the full-jitter backoff ``uniform(0, min(cap, base * 2**n))``.
        backoff_cap: its longest wait.
        liveness_timeout: seconds past ``block_ms`` a blocking read may go unanswered.
    """

    def __init__(
        self,
        store: Store | None = None,
        *,
        max_attempts: int = 0,
        backoff_base: float = 0.1,
        backoff_cap: float = 5.0,
        liveness_timeout: float = 5.0,
    ) -> None:
        self._store = store
        self.max_attempts = positive_int("max_attempts", max_attempts, 0)
        self.backoff_base = seconds("Streams backoff_base", backoff_base, 86400, zero=True)
        self.backoff_cap = seconds("Streams backoff_cap", backoff_cap, 86400, zero=True)
        self.liveness_timeout = seconds("Streams liveness_timeout", liveness_timeout, 86400)
        self.subscriptions: list[ReliableSubscription] = []
        self._consumers: list[Consumer] = []
        self.counters = Counters("streams", _COUNTERS)
        self.count = self.counters.incr
        """Add to a counter of this worker and of the host (``streams_<name>``)."""
        self.state = "stopped"
        RUNNERS.add(self)

    @property
    def store(self) -> Store:
        """The Store whose backend holds the streams."""
        return Store.default() if self._store is None else self._store

    @property
    def started(self) -> bool:
        """True between ``start()`` and ``stop()`` in this worker."""
        return bool(self._consumers)

    def subscribe(
        self,
        stream: str,
        handler: StreamHandler | None = None,
        *,
        group: str | None = None,
        consumer: str | None = None,
        **options: Any,
    ) -> Any:
        """Run ``handler(payload, entry)`` at least once per entry of ``stream`` for ``group``.

        ``group`` defaults to the handler's qualified name; ``consumer`` (unique per process!)
        to ``host:pid:nonce``.  ``options`` are the other fields of :class:`ReliableSubscription`
        (``batch``, ``block_ms``, ``concurrency``, ``min_idle_ms``, ``reclaim_interval``,
        ``max_deliveries``, ``dead_letter``, ``raw``), with its defaults.  Without ``handler``
        it is a decorator.
        """

        def register(fn: StreamHandler) -> StreamHandler:
            if not callable(fn):
                raise ConfigError(f"a stream handler must be callable, got {fn!r}")
            sub = ReliableSubscription(
                stream,
                fn,
                group if group is not None else _default_group(fn),
                consumer if consumer is not None else default_consumer(),
                fixed_consumer=consumer is not None,
                **options,
            )
            self.subscriptions.append(sub)
            host_stats()  # allocated now, in the process that declares (before workers start)
            return fn

        return register if handler is None else register(handler)

    async def start(self) -> None:
        """Create the groups and start every consumer in this worker."""
        if self._consumers or not self.subscriptions:
            return
        from zeal_asgi.messaging.consumer import Consumer

        backend = self.store.backend
        redis = backend.redis_link()
        if redis is None:
            raise unsupported(backend, "reliable messaging", Capability.STREAMS)
        for sub in self.subscriptions:
            if not sub.fixed_consumer:
                sub.consumer = default_consumer()  # declared before a fork: take our own pid
            consumer = Consumer(sub, redis, self)
            self._consumers.append(consumer)
            await consumer.start()
        self.state = "running"

    async def stop(self) -> None:
        """Stop every consumer (tasks cancelled and awaited; unacked entries stay pending)."""
        consumers, self._consumers = self._consumers, []
        for c in consumers:
            await c.stop()
        self.state = "stopped"

    def stats(self) -> dict[str, Any]:
        """This worker's state and counters."""
        out = {"state": self.state, "subscriptions": len(self.subscriptions)}
        return out | self.counters.values


# -- idempotency helpers -------------------------------------------------------------------------

_WRITES = (
    "SET INCR INCRBY INCRBYFLOAT DECR DECRBY HSET HINCRBY HINCRBYFLOAT HDEL SADD SREM ZADD "
    "ZINCRBY ZREM RPUSH LPUSH DEL UNLINK EXPIRE PEXPIRE XADD APPEND SETBIT PFADD"
)
_ALLOWED = frozenset(_WRITES.split())


def _ttl_ms(ttl: float) -> int:
    return max(1, int(seconds("idempotency ttl", ttl, 365 * 86400, error=InvalidTTLError) * 1000))


def _idem_key(key: str) -> str:
    if not isinstance(key, str) or not key or len(key.encode("utf-8", "surrogatepass")) > 512:
        raise InvalidKeyError(f"idempotency key must be a non-empty str of <= 512 bytes: {key!r}")
    return f"idem:{key}"


async def idempotent(key: str, ttl: float = 86400.0, *, store: Store | None = None) -> bool:
    """``True`` the first time ``key`` is claimed within ``ttl`` seconds (``SET NX PX``).

    Claim-then-act: a crash between the claim and the effect loses that effect (at most once).
    For effects in Redis use :func:`apply_once`, which applies them with the claim atomically.
    """
    st = store if store is not None else Store.default()
    return bool(await st.eval(IDEM_CLAIM.source, [_idem_key(key)], [_ttl_ms(ttl)]))


async def apply_once(
    key: str,
    commands: Sequence[Sequence[str | bytes | int | float]],
    ttl: float = 86400.0,
    *,
    store: Store | None = None,
) -> bool:
    """Run Redis write ``commands`` exactly once per ``key`` (claim and effect in one script).

    Each command is ``(NAME, key, *args)``; keys are prefixed like every Store key.  Returns
    ``False`` (and changes nothing) when ``key`` was already applied within ``ttl`` seconds.
    A command that fails (e.g. WRONGTYPE) aborts the script after its earlier commands; the key
    is then not marked, so keep commands simple.

    Example::

        await apply_once(f"order:{entry.id}", [("HINCRBY", "totals", "eur", 12)])
    """
    st = store if store is not None else Store.default()
    keys = [_idem_key(key)]
    args: list[Any] = [_ttl_ms(ttl)]
    for cmd in commands:
        if len(cmd) < 2:
            raise ConfigError(f"a command is (NAME, key, *args), got {cmd!r}")
        name = str(cmd[0]).upper()
        if name not in _ALLOWED:
            raise ConfigError(f"apply_once: {name} is not an allowed write command")
        key_arg = cmd[1]
        if not isinstance(key_arg, str) or not key_arg:
            raise InvalidKeyError(f"apply_once: the key of {name} must be a non-empty str")
        keys.append(key_arg)
        args += [name, len(cmd) - 2, *cmd[2:]]
    return bool(await st.eval(APPLY_ONCE.source, keys, args))
