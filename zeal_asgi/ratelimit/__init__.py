"""Exact rate limiting across every worker (one host, table backend) or node (redis, tiered).

``RateLimiter`` counts; ``limiter.depends(key=client_ip)`` is the FastAPI dependency and
``RateLimitMiddleware`` the pure-ASGI middleware; ``LimitsStorage`` is a storage for the
``limits`` library (scheme ``zeal://``), so a slowapi app becomes exact across workers with
``Limiter(..., storage_uri="zeal://")``: importing this package registers the scheme when
``limits`` is installed.
"""

from __future__ import annotations

import importlib.util
from typing import TYPE_CHECKING, Any

from zeal_asgi.ratelimit.http import ClientIP, RateLimitMiddleware, client_ip
from zeal_asgi.ratelimit.limiter import RateLimiter, RateLimitResult
from zeal_asgi.ratelimit.rates import RateLimit

if TYPE_CHECKING:
    from zeal_asgi.ratelimit.limits_storage import LimitsStorage

__all__ = [
    "ClientIP",
    "LimitsStorage",
    "RateLimit",
    "RateLimitMiddleware",
    "RateLimitResult",
    "RateLimiter",
    "client_ip",
]

if importlib.util.find_spec("limits") is not None:
    # Defining the class registers the zeal:// scheme with limits' storage_from_string.
    from zeal_asgi.ratelimit.limits_storage import LimitsStorage


def __getattr__(name: str) -> Any:
    if name == "LimitsStorage":  # only reached without the limits package
        from zeal_asgi.errors import require

        require("limits", extra="limits", feature="zeal_asgi.ratelimit.LimitsStorage")
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
