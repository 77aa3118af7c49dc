"""Limits: ``RateLimit(100, per=60)`` and the ``limits``-style strings that spell them."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass

from zeal_asgi.errors import ConfigError

MAX_AMOUNT = 2**31 - 1
"""Largest ``amount`` of one limit (counts are 64-bit; costs add up below 2^63)."""
MAX_PERIOD = 10 * 366 * 86400.0
"""Longest window: ten years, in seconds."""

# The granularities of the ``limits`` library (a month is 30 days, a year 12 months).
_UNITS = {
    "second": 1,
    "minute": 60,
    "hour": 3600,
    "day": 86400,
    "month": 30 * 86400,
    "year": 12 * 30 * 86400,
}
_ONE = re.compile(
    r"^\s*(?P<amount>\d+)\s*(?:/|per)\s*(?P<n>\d+)?\s*(?P<unit>second|minute|hour|day|month|year)s?\s*$",
    re.IGNORECASE,
)
_SEPARATORS = re.compile(r"[;,|]")


@dataclass(frozen=True, slots=True)
class RateLimit:
    """At most ``amount`` units (requests, by default one per hit) per ``per`` seconds.

    Example::

        RateLimit(100, per=60)          # the same as "100/minute"
    """

    amount: int
    per: float

    def __post_init__(self) -> None:
        a = self.amount
        if isinstance(a, bool) or not isinstance(a, int) or not 1 <= a <= MAX_AMOUNT:
            raise ConfigError(f"a rate limit's amount is an int in [1, {MAX_AMOUNT}], got {a!r}")
        p = self.per
        if (
            isinstance(p, bool)
            or not isinstance(p, (int, float))
            or not math.isfinite(p)
            or not 0.001 <= p <= MAX_PERIOD
        ):
            raise ConfigError(
                f"a rate limit's window 'per' is a number of seconds in [0.001, {MAX_PERIOD:g}], "
                f"got {p!r}"
            )
        object.__setattr__(self, "per", float(p))

    @classmethod
    def parse(cls, text: str) -> RateLimit:
        """One limit from ``"5/second"``, ``"100/minute"``, ``"1000 per 2 hours"``."""
        m = _ONE.match(text) if isinstance(text, str) else None
        if m is None:
            raise ConfigError(
                f"cannot parse the rate limit {text!r}: write '<amount>/<unit>' or '<amount> per "
                "<n> <unit>s' with a unit of second, minute, hour, day, month or year "
                "(e.g. '100/minute', '1000 per 2 hours')"
            )
        n = int(m["n"]) if m["n"] else 1
        if n == 0:
            raise ConfigError(f"rate limit {text!r}: the window must be at least one {m['unit']}")
        return cls(int(m["amount"]), per=n * _UNITS[m["unit"].lower()])

    @property
    def window(self) -> int:
        """The window in whole seconds (at least 1), as the ``w`` of ``RateLimit-Policy``."""
        return max(1, math.ceil(self.per - 1e-9))

    def __str__(self) -> str:
        per = int(self.per) if self.per == int(self.per) else self.per
        for unit, seconds in reversed(_UNITS.items()):
            if isinstance(per, int) and per % seconds == 0:
                n = per // seconds
                return f"{self.amount} per {n} {unit}{'s' if n != 1 else ''}"
        return f"{self.amount} per {per} seconds"


def parse_limits(spec: str | RateLimit | Sequence[str | RateLimit]) -> tuple[RateLimit, ...]:
    """Every limit of ``spec``: one limit, a string of several (``"10/second;100/minute"``,
    separated by ``;``, ``,`` or ``|``) or a sequence of either."""
    items: list[str | RateLimit] = [spec] if isinstance(spec, (str, RateLimit)) else list(spec)
    out: list[RateLimit] = []
    for item in items:
        if isinstance(item, RateLimit):
            out.append(item)
        elif isinstance(item, str):
            out.extend(RateLimit.parse(part) for part in _SEPARATORS.split(item) if part.strip())
        else:
            raise ConfigError(
                f"a rate limit is a string like '100/minute' or RateLimit(100, per=60), got "
                f"{type(item).__name__}"
            )
    if not out:
        raise ConfigError(f"no rate limit given in {spec!r}")
    return tuple(out)
