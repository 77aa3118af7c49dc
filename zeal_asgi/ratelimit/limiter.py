"""``RateLimiter``: exact limits shared by every worker (and node), on the Store's backend.

On the table backend each key has one shared row per limit and window, changed by one
:func:`~zeal_asgi.shm.ext.incr_bounded` (the add applies only while the count stays within the
limit), so no worker can slip in between a read and a write: exactly ``amount`` hits pass per
window however many workers race.  On redis and tiered one Lua script per hit checks and charges
every limit of the key together, at the server's clock (:data:`~zeal_asgi._redis.scripts.
RATE_LIMIT`).

Memory is bounded: the table holds ``max_keys`` keys' rows, a fixed number per key and limit
(a window's row holds its window's index above the count, and the first hit of a later window
restarts it in the same locked step).  The table's rows expire a while after their last write
(:meth:`RateLimiter._row_ttl`), decided inside the core under the row's lock, which takes
expired rows back when the table fills: no sweep, so no hit can be lost to one.  A table full of
live keys, like a backend that does not answer, is an error the ``on_backend_error`` policy
answers, counted and logged once, never raised into the request.
"""

from __future__ import annotations

import asyncio
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

from zeal_asgi.errors import (
    BackendError,
    ConfigError,
    InvalidKeyError,
    KeyTooLongError,
    KeyTypeError,
    TableFullError,
    UnsupportedOperationError,
)
from zeal_asgi.ratelimit._fast import FixedWindow, policy_prefix
from zeal_asgi.ratelimit.rates import RateLimit, parse_limits
from zeal_asgi.shm.ext import incr_bounded
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Capability, Store, StoreBackend, StoreBackendKind
from zeal_asgi.store.base import count
from zeal_asgi.store.facade import add_stats_section

if TYPE_CHECKING:
    from zeal_asgi.ratelimit.http import KeyFunc
    from zeal_asgi.shm import Table
    from zeal_asgi.store.services import ServiceHost

log = logging.getLogger("zeal_asgi.ratelimit")

Algorithm = Literal["fixed_window", "sliding_window", "token_bucket"]
ALGORITHMS: tuple[str, ...] = ("fixed_window", "sliding_window", "token_bucket")
EVENTS = ("allowed", "limited", "fail_open", "fail_closed", "backend_errors", "table_full")
"""What each limiter counts, per worker and summed over the host, as
``zeal_ratelimit_<limiter>_<event>_total``."""

_NAME = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
_SEP = "\x1f"  # between a key and its row suffix; the suffix never holds one
_FLUSH_EVERY = 0.25  # seconds: counters reach the host-wide table at most this late
_Charge = tuple[str, str, float, int | None]
"""A row a hit charged, for a refusal by a later limit to give back: ``(row, column, amount,
bound)``, the give-back applying only while the row stays within ``bound`` (``None``: always)."""
_ROW0 = f"{_SEP}0"  # the row suffix of the first limit (windows and token buckets)
_new = tuple.__new__
_time = time.time
_EPOCH = 1_700_000_000.0
"""Token buckets count time from here: smaller numbers keep a double's precision near 1e-8 s;
window indexes too, so they leave room for the count below them."""
_HORIZON = 7_258_118_400.0  # 2200-01-01: a window's index must fit its row until then
_LIMITERS: dict[str, RateLimiter] = {}


class RateLimitResult(NamedTuple):
    """The decision on one hit (or peek) and the state of the limit that decided it."""

    allowed: bool
    """The hit was admitted (and charged)."""
    limit: int
    """``amount`` of the deciding limit: the one that refused, or the one with the fewest
    units left."""
    remaining: int
    """Units left in that limit after this hit."""
    reset_after: float
    """Seconds until that limit is back to full (the end of its window; for a token bucket,
    until the bucket is full again)."""
    retry_after: float
    """Seconds until a hit of the same cost can pass (0 when allowed)."""
    policy: RateLimit
    """The deciding limit itself."""
    error: str | None = None
    """Why the backend could not decide (the ``on_backend_error`` policy decided instead)."""


@dataclass(frozen=True)
class _Binding:
    store: Store
    backend: StoreBackend
    table: Table | None
    """The shared table, on the table backend; ``None`` where Lua runs on Redis."""


def _has_eval(backend: StoreBackend) -> bool:
    return Capability.EVAL in backend.capabilities


class RateLimiter:
    """Limits on hits per key, exact across every worker of the host (table backend) or every
    node (redis, tiered).

    Example::

        limiter = RateLimiter("100/minute", name="api", algorithm="sliding_window")

        @app.get("/search", dependencies=[Depends(limiter.depends(key=client_ip))])
        async def search(q: str): ...

    Args:
        limits: one limit or several, all applied to every hit: ``"100/minute"``,
            ``"10/second;1000/hour"``, ``RateLimit(100, per=60)`` or a sequence of them.
        name: names the limiter's state (its table, its Redis keys) and its metrics; two
            limiters of one app need two names.
        algorithm: ``fixed_window`` (exactly ``amount`` per aligned window),
            ``sliding_window`` (the weighted two-window counter: the previous window's count,
            weighted by how much of it still overlaps the sliding window, plus the current
            one) or ``token_bucket`` (GCRA: a burst of ``amount``, then one per
            ``per / amount`` seconds).
        max_keys: keys tracked at once on the table backend (its shared memory is sized for
            them); with every row live, the ``on_backend_error`` policy answers new keys.
        key_size: longest key, in UTF-8 bytes (InvalidKeyError above it).
        on_backend_error: ``"allow"`` (default: admit the hit, counted as ``fail_open``) or
            ``"deny"`` (refuse it: the HTTP glue answers 503) when the backend cannot decide.
        x_ratelimit_headers: also send ``X-RateLimit-Limit``, ``-Remaining`` and ``-Reset``.
        store: the Store whose backend keeps the counts (default: ``zeal.store`` when ``zeal``
            is given, else ``Store.default()``, followed when it changes).
        zeal: the app object whose store to use.

    Declare limiters at import time, like ``Store.make``: on the table backend the shared
    table must exist before the workers start.
    """

    def __init__(
        self,
        limits: str | RateLimit | Sequence[str | RateLimit],
        *,
        name: str = "default",
        algorithm: Algorithm = "fixed_window",
        max_keys: int = 100_000,
        key_size: int = 128,
        on_backend_error: Literal["allow", "deny"] = "allow",
        x_ratelimit_headers: bool = False,
        store: Store | None = None,
        zeal: ServiceHost | None = None,
    ) -> None:
        if not isinstance(name, str) or not _NAME.match(name):
            raise ConfigError(f"RateLimiter name must match {_NAME.pattern}, got {name!r}")
        if algorithm not in ALGORITHMS:
            raise ConfigError(
                f"RateLimiter {name!r}: algorithm must be one of {ALGORITHMS}, got {algorithm!r}"
            )
        for what, value, high in (("max_keys", max_keys, 2**28), ("key_size", key_size, 4096)):
            if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= high:
                raise ConfigError(
                    f"RateLimiter {name!r}: {what} must be an int in [1, {high}], got {value!r}"
                )
        if on_backend_error not in ("allow", "deny"):
            raise ConfigError(
                f"RateLimiter {name!r}: on_backend_error must be 'allow' or 'deny', got "
                f"{on_backend_error!r}"
            )
        self.name = name
        self.limits: tuple[RateLimit, ...] = parse_limits(limits)
        self.algorithm: Algorithm = algorithm
        self.max_keys = max_keys
        self.key_size = key_size
        self.on_backend_error = on_backend_error
        self.x_ratelimit_headers = bool(x_ratelimit_headers)
        self.max_cost = min(lim.amount for lim in self.limits)
        self._single_fixed = algorithm == "fixed_window" and len(self.limits) == 1
        # a Zeal's store never changes: resolved once, not per hit
        self._store = store if store is not None or zeal is None else zeal.store
        self._zeal = zeal
        self._binding: _Binding | None = None
        self._shifts = [lim.amount.bit_length() for lim in self.limits]
        """Bits of each limit's count in its window rows (the window's index is above them)."""
        self._window0: tuple[float, float, int] = (0.0, 0.0, 0)
        self._counts = dict.fromkeys(EVENTS, 0)
        self._host_keys = {e: f"ratelimit_{name}_{e}_total" for e in EVENTS}
        self._flush_handle: asyncio.TimerHandle | None = None
        self._flush_due = 0.0
        """When the pending flush should have run; past it (by a second), its loop is gone."""
        self._logged: set[str] = set()
        self._lua: str | None = None
        self._lua_args: list[str | int] = []
        self._policies = self._policy_names()
        self.policy_header = ", ".join(
            f'"{p}";q={lim.amount};w={lim.window}'
            for p, lim in zip(self._policies, self.limits, strict=True)
        )
        """``RateLimit-Policy`` of every response this limiter decides (it never changes)."""
        self.policy_header_bytes = self.policy_header.encode("ascii")
        """The same, as the bytes of an ASGI header."""
        self.ratelimit_prefix = {
            id(lim): policy_prefix(p) for p, lim in zip(self._policies, self.limits, strict=True)
        }
        """The start of each limit's ``RateLimit`` header value, by ``id`` of the limit (a
        frozen dataclass hashes in Python: an ``id`` is a tenth of the time per request)."""
        other = _LIMITERS.get(name)
        if other is not None and (other.limits, other.algorithm) != (self.limits, algorithm):
            raise ConfigError(
                f"RateLimiter {name!r} already exists with {other.describe()}; a second limiter "
                f"with other limits needs another name (got {self.describe()})"
            )
        _LIMITERS[name] = self
        self.compiled: FixedWindow | None = None
        """The compiled path of an admitted hit of cost 1 on the table backend, with one
        fixed-window limit and no ``X-RateLimit-*`` headers (else ``None``): its ``hit(key,
        headers)`` appends the RateLimit headers and returns the result, or returns ``None``
        (nothing charged, nothing appended) where :meth:`hit_now` must decide."""
        if self._single_fixed and not self.x_ratelimit_headers:  # else: more headers to send
            lim = self.limits[0]
            self.compiled = FixedWindow(
                incr_bounded,
                _ROW0,
                "n",
                lim,
                int(_EPOCH / lim.per),
                self._shifts[0],
                self.key_size,
                self.policy_header_bytes,
                self.ratelimit_prefix[id(lim)],
                self._schedule_flush,
                RateLimitResult,
                Store.default if self._store is None else None,
            )
        self._bind()  # declare the shared table now: before the workers start

    # -- configuration -----------------------------------------------------------------------

    def describe(self) -> str:
        """``"100 per 1 minute, fixed_window"``."""
        return f"{'; '.join(str(lim) for lim in self.limits)}, {self.algorithm}"

    def __repr__(self) -> str:
        return f"RateLimiter({self.name!r}: {self.describe()})"

    def policy_name(self, limit: RateLimit) -> str:
        """The policy identifier of ``limit`` in the RateLimit headers."""
        return self._policies[self.limits.index(limit)]

    def _policy_names(self) -> list[str]:
        if len(self.limits) == 1:
            return [self.name]
        return [f"{self.name}-{i}" for i in range(1, len(self.limits) + 1)]

    @property
    def store(self) -> Store:
        """The Store whose backend keeps the counts."""
        if self._store is not None:
            return self._store
        return self._zeal.store if self._zeal is not None else Store.default()

    @property
    def table_name(self) -> str:
        """The Store table of this limiter on the table backend."""
        return f"__ratelimit_{self.name}"

    def _bind(self) -> _Binding:
        store = self.store
        b = self._binding
        if b is not None and b.store is store and b.backend is store.backend:
            return b
        backend = store.backend
        table: Table | None = None
        if store.kind is StoreBackendKind.TABLE:
            rows_per_key = len(self.limits) * (2 if self.algorithm == "sliding_window" else 1)
            column = (
                {"t": (Store.TYPE_FLOAT,)}
                if self.algorithm == "token_bucket"
                else {"n": (Store.TYPE_INT, 8)}
            )
            if self.algorithm != "token_bucket":
                self._check_horizon()
            if self.table_name not in store.names():
                store.make(
                    self.table_name,
                    min(self.max_keys * rows_per_key, 2**32 - 2),
                    column,
                    mode="ttl",
                    ttl=self._row_ttl(),
                    key_size=self.key_size + 24,  # room for the row suffix
                )
            table = store.table(self.table_name)
        elif _has_eval(backend):
            from zeal_asgi._redis import scripts

            self._lua = scripts.RATE_LIMIT.source
            self._lua_reset = scripts.RATE_LIMIT_RESET.source
            self._key_format = scripts.RATE_LIMIT_KEY
            longest = max(lim.per for lim in self.limits)
            keep = 2 * longest if self.algorithm == "sliding_window" else longest
            args: list[str | int] = [self.algorithm[0], 0, math.ceil(keep * 1000) + 1000]
            for lim in self.limits:
                args += [lim.amount, max(1, round(lim.per * 1000))]
            self._lua_args = args
        else:
            raise UnsupportedOperationError(
                f"RateLimiter {self.name!r} needs a backend that can count atomically: the "
                f"table backend (one host) or redis / tiered (Lua); this store's backend is "
                f"{store.kind}"
            )
        self._binding = b = _Binding(store, backend, table)
        if self.compiled is not None:
            self.compiled.arm(table, store, backend)
        return b

    def _row_ttl(self) -> int:
        """Seconds a row of the table lives after its last write (the core then reclaims it).

        A row's state must outlive every read that needs it:

        - fixed window: a window's row is read and written only during its window; its last
          write falls inside the window, so it is needed at most ``per`` seconds after that
          write.
        - sliding window: a window's row is also read, as the previous window, during the next
          window: needed at most ``2 * per`` seconds after its last write.
        - token bucket (GCRA): a hit leaves the row's theoretical arrival time at most ``per``
          (and a rounding slack) ahead of the hit; once the clock passes it the bucket is full,
          which an absent row reads as too: needed at most ``per`` seconds after the last write.

        One table serves every limit of the limiter, so the longest of them decides (a row of a
        shorter limit lives longer than it must; each key keeps a fixed number of rows, so this
        costs no rows).  The extra second covers the rounding up and a small step of the wall
        clock, which places the windows, against the core's monotonic clock, which expires rows.
        """
        longest = max(lim.per for lim in self.limits)
        keep = 2 * longest if self.algorithm == "sliding_window" else longest
        return math.ceil(keep) + 1

    def _check_horizon(self) -> None:
        for lim, shift in zip(self.limits, self._shifts, strict=True):
            if (_HORIZON - _EPOCH) / lim.per >= 2 ** (63 - shift):
                raise ConfigError(
                    f"RateLimiter {self.name!r}: the limit {lim} has too short a window for its "
                    "amount on the table backend (a row holds the window's index and the count "
                    "in 63 bits); use a longer window or a smaller amount"
                )

    # -- the API -------------------------------------------------------------------------------

    def _check(self, key: object, cost: object) -> None:
        if type(key) is not str and not isinstance(key, str):
            raise KeyTypeError(
                f"rate limiter {self.name!r}: a key is a str, got {type(key).__name__}"
            )
        if not key or len(key) > self.key_size or not key.isascii():
            if not key:
                raise InvalidKeyError(f"rate limiter {self.name!r}: empty key")
            try:
                size = len(key.encode("utf-8"))
            except UnicodeEncodeError:
                raise InvalidKeyError(
                    f"rate limiter {self.name!r}: the key is not encodable as UTF-8"
                ) from None
            if size > self.key_size:
                raise KeyTooLongError(
                    f"rate limiter {self.name!r}: the key is {size} bytes, over key_size="
                    f"{self.key_size} (never truncated)"
                )
        if cost != 1 or type(cost) is not int:
            if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
                raise ConfigError(f"rate limiter {self.name!r}: cost is an int >= 1, got {cost!r}")
            if cost > self.max_cost:
                raise ConfigError(
                    f"rate limiter {self.name!r}: cost {cost} is above the limit "
                    f"{self.max_cost} (such a hit could never pass)"
                )

    async def hit(self, key: str, cost: int = 1) -> RateLimitResult:
        """Charge ``cost`` to ``key`` if every limit admits it; the decision and what is left.

        Raises:
            KeyTypeError, InvalidKeyError: ``key`` is not a non-empty str within ``key_size``.
            ConfigError: ``cost`` is not an int in [1, the smallest amount].
        """
        result = self.hit_now(key, cost)
        if result is not None:
            return result
        assert self._binding is not None  # bound by hit_now
        return self._after(await self._redis(self._binding.store, key, cost, "h"))

    def hit_now(self, key: str, cost: int) -> RateLimitResult | None:
        """:meth:`hit` decided without awaiting, on the table backend; ``None`` where the
        backend must be awaited (redis, tiered): the HTTP edge then awaits :meth:`hit`, and
        spares a coroutine per request on this host's table."""
        if (
            cost != 1
            or type(cost) is not int
            or type(key) is not str
            or not 0 < len(key) <= self.key_size
            or not key.isascii()
        ):
            self._check(key, cost)
        b = self._binding
        store = self._store if self._store is not None else self.store
        if b is None or b.store is not store or b.backend is not store.backend:
            b = self._bind()
        table = b.table
        if table is None:
            return None
        if not self._single_fixed:
            return self._after(self._table_hit(table, key, cost, True))
        # The common case inline (one fixed-window limit): a hit costs under a microsecond,
        # and every call or division below would add a tenth of one.
        lim = self.limits[0]
        amount = lim.amount
        now = _time()
        window = self._window0
        if not window[0] <= now < window[1]:
            window = self._next_window0(now)
        base = window[2]
        try:
            value, ok = incr_bounded(table, key + _ROW0, "n", cost, base + amount, base)
        except TableFullError:
            return self._after(self._table_full())
        count = value - base
        if count > amount:  # a later window's row (see _window)
            return self._after(self._table_hit(table, key, cost, True))
        reset = window[1] - now
        if ok:
            self._counts["allowed"] += 1
            result = _new(RateLimitResult, (True, amount, amount - count, reset, 0.0, lim, None))
        else:
            self._counts["limited"] += 1
            left = max(0, amount - count)
            result = _new(RateLimitResult, (False, amount, left, reset, reset, lim, None))
        if self._flush_handle is None or now > self._flush_due:
            self._schedule_flush()
        return result

    def _after(self, result: RateLimitResult) -> RateLimitResult:
        """Count a decision of :meth:`hit`."""
        if result.error is None:
            self._counts["allowed" if result.allowed else "limited"] += 1
        if self._flush_handle is None or _time() > self._flush_due:
            self._schedule_flush()
        return result

    async def peek(self, key: str, cost: int = 1) -> RateLimitResult:
        """Whether a hit of ``cost`` on ``key`` would pass now, and what is left now (nothing
        is charged)."""
        self._check(key, cost)
        b = self._bind()
        if b.table is not None:
            return self._table_hit(b.table, key, cost, False)
        return await self._redis(b.store, key, cost, "p")

    async def reset(self, key: str) -> None:
        """Forget everything counted for ``key`` (every limit, every window)."""
        self._check(key, 1)
        b = self._bind()
        if b.table is None:
            await self._redis_reset(b.store, key)
            return
        for i in range(len(self.limits)):
            if self.algorithm == "sliding_window":
                for parity in (0, 1):
                    b.table.delete(f"{key}{_SEP}{i}.{parity}")
            else:
                b.table.delete(f"{key}{_SEP}{i}")

    def depends(self, key: KeyFunc, cost: int = 1) -> Callable[..., Awaitable[RateLimitResult]]:
        """A FastAPI dependency charging ``cost`` to ``key(connection)`` per request or
        WebSocket handshake: ``Depends(limiter.depends(key=client_ip))``.

        An admitted request's response gets the RateLimit headers (when the endpoint returns a
        value, not a ``Response`` of its own); a refused one raises ``HTTPException`` 429 with
        ``Retry-After`` (503 when the backend could not decide and the policy is ``deny``), a
        refused handshake ``WebSocketException`` 1008.  The dependency returns the
        :class:`RateLimitResult`.
        """
        from zeal_asgi.ratelimit.http import depends

        return depends(self, key, cost)

    # -- the table backend ---------------------------------------------------------------------

    def _next_window0(self, now: float) -> tuple[float, float, int]:
        """``(start, end, base)`` of the first limit's window at ``now`` (see :meth:`_base`)."""
        per = self.limits[0].per
        w = int(now / per)
        self._window0 = window = (w * per, (w + 1) * per, self._base(0, w))
        return window

    def _base(self, i: int, w: int) -> int:
        """The value of limit ``i``'s row when window ``w`` has counted nothing yet: the
        window's index above the count's bits.  An earlier window's row is below it, so
        ``incr_bounded`` with it as the floor restarts such a row at this window's first hit."""
        return (w - int(_EPOCH / self.limits[i].per)) << self._shifts[i]

    def _table_hit(self, table: Table, key: str, cost: int, charge: bool) -> RateLimitResult:
        try:
            return self._decide(table, key, cost, charge, _time())
        except TableFullError:
            return self._table_full()

    def _table_full(self) -> RateLimitResult:
        """The core found no expired row to take back: every row is live."""
        self._count("table_full")
        return self._on_error(
            "table_full",
            f"the shared table of rate limiter {self.name!r} is full of live keys "
            f"(max_keys={self.max_keys}); raise max_keys",
        )

    def _decide(
        self, table: Table, key: str, cost: int, charge: bool, now: float
    ) -> RateLimitResult:
        best: RateLimitResult | None = None
        charged: list[_Charge] = []
        for i, lim in enumerate(self.limits):
            if self.algorithm == "token_bucket":
                r, done = self._gcra(table, key, i, lim, cost, charge, now)
            else:
                r, done = self._window(table, key, i, lim, cost, charge, now)
            if not r[0]:
                for row, column, by, bound in charged:  # give back what earlier limits took
                    if bound is None:
                        table.incr(row, column, -by)
                    else:
                        incr_bounded(table, row, column, -by, bound)
                return r
            if done is not None:
                charged.append(done)
            if best is None or r[2] < best[2]:
                best = r
        assert best is not None
        return best

    def _window(
        self,
        table: Table,
        key: str,
        i: int,
        lim: RateLimit,
        cost: int,
        charge: bool,
        now: float,
    ) -> tuple[RateLimitResult, _Charge | None]:
        per = lim.per
        amount = lim.amount
        w = int(now / per)
        while True:
            start = w * per
            base = self._base(i, w)
            bound = amount
            prev = 0
            if self.algorithm == "sliding_window":
                # Two rows per key, for even and odd windows; the other one holds the previous
                # window's count if it was hit at all.
                row = f"{key}{_SEP}{i}.{w & 1}"
                before = table.get(f"{key}{_SEP}{i}.{(w - 1) & 1}", "n") or 0
                prev_base = self._base(i, w - 1)
                if 0 < before - prev_base <= amount:
                    prev = before - prev_base
                    bound = amount - math.floor(prev * (1.0 - (now - start) / per))
            else:
                row = key + (_ROW0 if i == 0 else f"{_SEP}{i}")
            if charge:
                value, ok = incr_bounded(table, row, "n", cost, base + bound, base)
            else:  # a peek: would the hit pass, and what is left now
                value = table.get(row, "n") or 0
                ok = max(value, base) + cost <= base + bound
            count = max(0, value - base)  # an earlier window's row counts nothing now
            if count <= amount:
                break
            # A later window's row: a worker whose clock read after ours started it; the hit
            # belongs to that window (an ended window is never charged).
            w = (value >> self._shifts[i]) + int(_EPOCH / per)
            now = max(now, w * per)
        reset = start + per - now
        if ok:
            # Given back only while the row still counts this window: another worker's hit in
            # the next window restarts it above base + amount, and that count must stay whole.
            done = (row, "n", cost, base + amount - cost) if charge else None
            return _new(RateLimitResult, (True, amount, bound - count, reset, 0.0, lim, None)), done
        retry = reset
        if prev or self.algorithm == "sliding_window":
            retry = _sliding_retry(amount, per, start, now, prev, count, cost)
        left = max(0, bound - count)
        return _new(RateLimitResult, (False, amount, left, reset, retry, lim, None)), None

    def _gcra(
        self,
        table: Table,
        key: str,
        i: int,
        lim: RateLimit,
        cost: int,
        charge: bool,
        now: float,
    ) -> tuple[RateLimitResult, _Charge | None]:
        per = lim.per
        step = per / lim.amount
        row = f"{key}{_SEP}{i}"
        now -= _EPOCH
        bound = now + per + step * 1e-3  # float slack: the amount-th hit of a burst must pass
        if charge:
            tat, ok = incr_bounded(table, row, "t", cost * step, bound, now)
        else:  # a peek: would the hit pass, and what is left now
            tat = max(table.get(row, "t") or 0.0, now)
            ok = tat + cost * step <= bound
        if ok:
            left = math.floor((now + per - tat + 1e-6) / step)
            # The arrival time only moves forward past ours: giving the step back is always due.
            done = (row, "t", cost * step, None) if charge else None
            return _new(RateLimitResult, (True, lim.amount, left, tat - now, 0.0, lim, None)), done
        tat = max(tat, now)
        left = max(0, math.floor((now + per - tat + 1e-6) / step))
        retry = tat + cost * step - now - per
        return _new(RateLimitResult, (False, lim.amount, left, tat - now, retry, lim, None)), None

    # -- redis and tiered ------------------------------------------------------------------------

    async def _redis(self, store: Store, key: str, cost: int, mode: str) -> RateLimitResult:
        assert self._lua is not None
        args = [mode, *self._lua_args]
        args[2] = cost
        try:
            reply = await store.eval(self._lua, [self._key_format % (self.name, key)], args)
        except UnsupportedOperationError:
            raise
        except BackendError as exc:
            self._count("backend_errors")
            return self._on_error(
                type(exc).__name__, f"rate limiter {self.name!r}: the backend failed: {exc}"
            )
        allowed, index, left, reset_ms, retry_ms = (int(x) for x in reply)
        lim = self.limits[index - 1]
        return _new(
            RateLimitResult,
            (allowed == 1, lim.amount, left, reset_ms / 1000, retry_ms / 1000, lim, None),
        )

    async def _redis_reset(self, store: Store, key: str) -> None:
        await store.eval(self._lua_reset, [self._key_format % (self.name, key)], [])

    # -- errors and counters ---------------------------------------------------------------------

    def _on_error(self, reason: str, message: str) -> RateLimitResult:
        if reason not in self._logged:
            self._logged.add(reason)  # once per reason and process: a flood must not flood logs
            log.warning("%s; on_backend_error=%r decides", message, self.on_backend_error)
        lim = self.limits[0]
        allow = self.on_backend_error == "allow"
        self._count("fail_open" if allow else "fail_closed")
        return _new(
            RateLimitResult,
            (
                allow,
                lim.amount,
                lim.amount if allow else 0,
                lim.per,
                0.0 if allow else 1.0,
                lim,
                reason,
            ),
        )

    def _count(self, event: str) -> None:
        self._counts[event] += 1
        if self._flush_handle is None or _time() > self._flush_due:
            self._schedule_flush()

    def _schedule_flush(self) -> None:
        if self._flush_handle is not None:  # its loop closed before it ran: flush here
            self._flush_handle.cancel()
            self.flush()
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        self._flush_handle = loop.call_later(_FLUSH_EVERY, self.flush)
        self._flush_due = _time() + _FLUSH_EVERY + 1.0
        if self.compiled is not None:
            self.compiled.due = self._flush_due

    def flush(self) -> None:
        """Add this worker's counts since the last flush to the host-wide counters (done
        within a quarter second of each hit, and before every stats read)."""
        self._flush_handle = None
        if self.compiled is not None:
            self.compiled.due = 0.0  # the next hit schedules the next flush
            self._counts["allowed"] += self.compiled.take()
        for event, n in self._counts.items():
            if n:
                count("ratelimit", f"{self.name}_{event}", n)
                self._counts[event] = 0

    def stats(self) -> dict[str, int]:
        """This limiter's counters summed over the host's workers."""
        self.flush()
        host = host_stats().host()
        return {e: host.get(k, 0) for e, k in self._host_keys.items()}


def _sliding_retry(
    amount: int, per: float, start: float, now: float, prev: int, cur: int, cost: int
) -> float:
    """Seconds until a hit of ``cost`` fits the weighted count of a sliding window."""
    room = amount - cur - cost
    if room >= 0 and prev > 0:
        # floor(prev * weight) <= room once prev * weight < room + 1
        at = start + per * (1.0 - (room + 1) / prev)
        if at < start + per:
            return max(0.0, at - now)
    at = start + per  # next window: this one's count becomes the weighted one
    if cur > 0:
        at += per * max(0.0, 1.0 - (amount - cost + 1) / cur)
    return at - now


def ratelimit_stats() -> dict[str, Any]:
    """Every limiter of this process: its counters summed over the host (``Store.stats()``)."""
    limiters = {name: lim.stats() for name, lim in _LIMITERS.items()}
    return {"ratelimit": limiters} if limiters else {}


add_stats_section(ratelimit_stats)
