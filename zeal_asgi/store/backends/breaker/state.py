"""The circuit breaker's state machine, shared by every worker of the host through shared memory.

One state word holds the state, since-when and a transition count (``ms << 22 | n << 2 |
code``, so no two words repeat and a stale probe token never matches); it only changes by
compare-and-set, which is also what admits exactly one probe when the open period is over.  Ten
failure buckets of ``(epoch << 20) | count`` make the rolling failure window.  Both live in one
small shared table allocated when the breaker is built, before workers start.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from zeal_asgi.errors import ConfigError, ContentionError, LockTimeoutError, PoolTimeoutError
from zeal_asgi.shm.ext import Table
from zeal_asgi.store.base import count, counters

if TYPE_CHECKING:
    from zeal_asgi.shm import Table as TableT

_EVENTS = "opened closed probes failures short_circuited fallback_reads mirror_skipped"
"""The breaker's counters (``count("breaker", ...)``), reported from 0 on."""

log = logging.getLogger("zeal_asgi.breaker")

_BUCKETS = 10
_COUNT_BITS = 20
_COUNT_MASK = (1 << _COUNT_BITS) - 1


class BreakerState(enum.StrEnum):
    """The three states, as shown in ``Store.stats()`` and ``/health/store``."""

    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half-open"


_CODES = {0: BreakerState.CLOSED, 1: BreakerState.OPEN, 2: BreakerState.HALF_OPEN}
_CLOSED, _OPEN, _HALF = 0, 1, 2


class BreakerOptions(BaseModel):
    """Validated breaker options (``Store.default_backend(..., {"breaker": {...}})``)."""

    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)

    failure_threshold: int = Field(default=5, ge=1, le=_COUNT_MASK)
    """Failures within the window that open the breaker."""
    failure_window_sec: float = Field(default=10.0, ge=0.01, le=86400, allow_inf_nan=False)
    """Length of the rolling failure window."""
    open_seconds: float = Field(default=30.0, ge=0, le=86400, allow_inf_nan=False)
    """How long the breaker stays open before one probe is let through (0: the next call)."""
    probe_lease_sec: float = Field(default=10.0, ge=0.01, le=86400, allow_inf_nan=False)
    """A probe that has not finished after this long (its worker died) is handed to another."""
    name: str | None = Field(default=None, min_length=1, max_length=64)
    """Name of the shared state; by default derived from the wrapped backend."""

    @classmethod
    def parse(cls, options: Mapping[str, Any] | BreakerOptions | None) -> BreakerOptions:
        """Check ``options``; a bad or unknown one raises ConfigError naming it and the limit."""
        if options is None or isinstance(options, BreakerOptions):
            return options or cls()
        if not isinstance(options, Mapping):
            raise ConfigError(f"breaker options must be a dict, got {type(options).__name__}")
        try:
            return cls.model_validate(dict(options))
        except ValidationError as exc:
            err = exc.errors()[0]
            raise ConfigError(
                f"breaker option {err['loc'][0]}: {err['msg']}, got {err['input']!r}"
            ) from None


def is_outage(exc: BaseException) -> bool:
    """Does ``exc`` mean "the backend cannot be reached"?  Only those count as failures.

    Connection errors and timeouts do; a full local pool does not (that is this worker's own
    saturation: if the backend is slow, the calls holding the connections time out and count).
    """
    return isinstance(exc, (ConnectionError, TimeoutError)) and not isinstance(
        exc, (LockTimeoutError, PoolTimeoutError, ContentionError)
    )


_SINCE_SHIFT = 22
_GEN_MASK = (1 << 20) - 1


def _next(word: int, since_ms: int, code: int) -> int:
    """The state word after ``word``: new state and time, transition count + 1."""
    gen = ((word >> 2) + 1) & _GEN_MASK
    return (max(0, since_ms) << _SINCE_SHIFT) | (gen << 2) | code


def _now_ms() -> int:
    # CLOCK_MONOTONIC is one clock for every process of the host, and never jumps.
    return time.monotonic_ns() // 1_000_000


class SharedBreaker:
    """The state machine, in shared memory (one per wrapped backend and host).

    :meth:`admit` answers ``None`` (refused), ``0`` (a normal call) or a probe token; the caller
    then reports the outcome with :meth:`succeeded`, :meth:`failed` or :meth:`abandoned`.
    """

    def __init__(self, name: str, options: BreakerOptions) -> None:
        self.name = name
        self.options = options
        self._open_ms = int(options.open_seconds * 1000)
        self._lease_ms = int(options.probe_lease_sec * 1000)
        self._width_ms = max(1, int(options.failure_window_sec * 1000) // _BUCKETS)
        self._table: TableT = Table(_BUCKETS + 1, {"w": ("int", 8)}, name=f"breaker:{name}")

    # -- shared words --------------------------------------------------------------------------

    def _word(self) -> int:
        w = self._table.get("state", "w")
        return 0 if w is None else int(w)

    def _cas(self, old: int, new: int) -> bool:
        return bool(self._table.compare_and_set("state", "w", old, new))

    @property
    def state(self) -> BreakerState:
        """The current state (host-wide)."""
        return _CODES[self._word() & 3]

    # -- admission and outcomes -----------------------------------------------------------------

    def admit(self) -> int | None:
        """``0``: go ahead; a positive token: go ahead as the single probe; ``None``: refused."""
        w = self._word()
        code = w & 3
        if code == _CLOSED:
            return 0
        now = _now_ms()
        wait = self._open_ms if code == _OPEN else self._lease_ms
        if now - (w >> _SINCE_SHIFT) < wait:
            return None
        token = _next(w, now, _HALF)
        if self._cas(w, token):
            count("breaker", "probes")
            return token
        return None

    def succeeded(self, token: int) -> None:
        """The call admitted with ``token`` got an answer from the backend."""
        if token and self._cas(token, _next(token, _now_ms(), _CLOSED)):
            for i in range(_BUCKETS):
                self._table.set(f"b{i}", {"w": 0})
            count("breaker", "closed")
            log.warning("circuit breaker %s closed: the probe succeeded", self.name)

    def abandoned(self, token: int) -> None:
        """The probe was cancelled before an answer: let the next call probe at once."""
        if token:
            self._cas(token, _next(token, _now_ms() - self._open_ms, _OPEN))

    def failed(self, token: int) -> None:
        """The call admitted with ``token`` could not reach the backend."""
        now = _now_ms()
        if token:
            self._trip(token, now, "re-opened: the probe failed")
            return
        count("breaker", "failures")
        epoch = now // self._width_ms
        key = f"b{epoch % _BUCKETS}"
        while True:
            cur = int(self._table.get(key, "w") or 0)
            n = (cur & _COUNT_MASK) + 1 if cur >> _COUNT_BITS == epoch else 1
            if self._table.compare_and_set(
                key, "w", cur, (epoch << _COUNT_BITS) | min(n, _COUNT_MASK)
            ):
                break
        w, o = self._word(), self.options
        if w & 3 == _CLOSED and self.failures_in_window(epoch) >= o.failure_threshold:
            self._trip(
                w, now, f"opened: {o.failure_threshold} failures within {o.failure_window_sec:g} s"
            )

    def _trip(self, word: int, now: int, why: str) -> None:
        """Open the breaker if its state is still ``word`` (another worker may have moved it)."""
        if self._cas(word, _next(word, now, _OPEN)):
            count("breaker", "opened")
            log.warning("circuit breaker %s %s", self.name, why)

    def failures_in_window(self, epoch: int | None = None) -> int:
        """Failures counted in the rolling window that ends now."""
        if epoch is None:
            epoch = _now_ms() // self._width_ms
        words = (int(self._table.get(f"b{i}", "w") or 0) for i in range(_BUCKETS))
        return sum(w & _COUNT_MASK for w in words if 0 <= epoch - (w >> _COUNT_BITS) < _BUCKETS)

    def stats(self) -> dict[str, Any]:
        """State and host-wide counters (``opened_total``, ``short_circuited_total``, ...), and
        the seconds since the last transition (0 when never opened)."""
        since = self._word() >> _SINCE_SHIFT
        return {
            **counters("breaker", _EVENTS),
            "state": str(self.state),
            "name": self.name,
            "failures_in_window": self.failures_in_window(),
            "seconds_in_state": round(max(0.0, (_now_ms() - since) / 1000), 3) if since else 0.0,
            "options": self.options.model_dump(),
        }

    def close(self) -> None:
        """Unmap and unlink the shared state (tests; workers keep theirs until exit)."""
        from zeal_asgi.shm.segments import destroy

        destroy(self._table)
