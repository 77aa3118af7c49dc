"""Typed face of the compiled rate-limit path (checked against it by mypy.stubtest)."""

from collections.abc import Callable
from typing import Any

from typing_extensions import disjoint_base

from zeal_asgi.ratelimit.limiter import RateLimitResult
from zeal_asgi.ratelimit.rates import RateLimit

def policy_prefix(name: str) -> bytes: ...
def peer(scope: Any) -> str: ...
def ratelimit_value(prefix: bytes, remaining: int, reset_after: float) -> bytes: ...

@disjoint_base
class FixedWindow:
    due: float
    def __init__(
        self,
        incr_bounded: Callable[..., tuple[Any, bool]],
        suffix: str,
        column: str,
        limit: RateLimit,
        offset: int,
        shift: int,
        key_size: int,
        policy: bytes,
        prefix: bytes,
        schedule: Callable[[], None],
        result: type[RateLimitResult],
        follow: Callable[[], Any] | None,
    ) -> None: ...
    def arm(self, table: Any, store: Any, backend: Any) -> None: ...
    def take(self) -> int: ...
    def hit(self, key: str, headers: list[tuple[bytes, bytes]]) -> RateLimitResult | None: ...
    def hit_at(
        self, key: str, headers: list[tuple[bytes, bytes]], now: float
    ) -> RateLimitResult | None: ...
    def hit_peer(
        self, scope: Any, headers: list[tuple[bytes, bytes]]
    ) -> RateLimitResult | None: ...
