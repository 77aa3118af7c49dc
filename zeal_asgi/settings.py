"""``ZealSettings``: configuration from arguments, else ``ZEAL_*`` environment variables.

Validated when read: a bad value fails the boot with the variable's name and the reason.
"""

from __future__ import annotations

import contextlib
import enum
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from zeal_asgi.errors import ConfigError

__all__ = ["REDIS_URL_SCHEMES", "StoreBackendKind", "ZealSettings"]

ENV_PREFIX = "ZEAL_"
REDIS_URL_SCHEMES = frozenset({"redis", "rediss", "tls", "valkey", "valkeys", "unix"})
"""URL schemes ``ZEAL_REDIS_URL`` accepts (``rediss``/``valkeys``: TLS)."""


class StoreBackendKind(enum.StrEnum):
    """The four backends; plain strings ``"table"``, ``"redis"``, ... are accepted too."""

    TABLE = "table"
    REDIS = "redis"
    TIERED = "tiered"
    MEMCACHED = "memcached"

    @classmethod
    def parse(cls, kind: StoreBackendKind | str) -> StoreBackendKind:
        """Accept an enum member or its (case-insensitive) value (a member is a str too)."""
        if isinstance(kind, str):
            with contextlib.suppress(ValueError):
                return cls(kind.strip().lower())
        raise ConfigError(
            f"unknown Store backend kind {kind!r} (use 'table', 'redis', 'tiered' or 'memcached')"
        )


class ZealSettings(BaseModel):
    """Every setting of a Zeal app; each field reads ``ZEAL_<FIELD>`` (upper case)."""

    # hide_input_in_errors: a refused URL may carry a password; messages never echo values
    model_config = ConfigDict(frozen=True, extra="forbid", hide_input_in_errors=True)

    store_backend: StoreBackendKind = StoreBackendKind.TABLE
    """``table`` (default, one host), ``redis``, ``tiered`` or ``memcached``."""
    redis_url: str | None = None
    """``redis://host:port/db``, ``rediss://`` (TLS, verified) or ``unix:///path``."""
    redis_pool_size: int = Field(64, ge=1, le=1024)
    """Redis calls in flight at once per worker (``pool_size``)."""
    key_prefix: str = Field("zeal", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    """Prefix of every Redis/Memcached key and channel."""
    memcached_servers: str | None = None
    """``host:port[,host:port...]`` or a ``memcached://`` URL."""
    tiered_invalidation_secret: str | None = None
    """Shared secret that signs tiered-backend invalidations (HMAC-SHA256)."""
    l1_ttl: float = Field(5.0, gt=0, le=86400)
    on_error: Literal["fallback_table"] | None = None
    """``fallback_table``: wrap the backend in the circuit breaker.  Its state (the seed's
    ``state()``) is the property ``Store.default().backend.state``: ``closed``, ``open`` or
    ``half-open``; ``/health/store`` shows it too."""
    breaker_failure_threshold: int | None = Field(None, ge=1, le=1_000_000)
    """Breaker: failures within the window that open it (default 5)."""
    breaker_failure_window_sec: float | None = Field(None, ge=0.01, le=86400, allow_inf_nan=False)
    """Breaker: length of the rolling failure window (default 10 s)."""
    breaker_open_seconds: float | None = Field(None, ge=0, le=86400, allow_inf_nan=False)
    """Breaker: how long it stays open before one probe (default 30 s)."""
    breaker_probe_lease_sec: float | None = Field(None, ge=0.01, le=86400, allow_inf_nan=False)
    """Breaker: a probe unfinished after this long is handed to another worker (default 10 s)."""
    cache_dir: str = ".cache"
    cache_secret: str | None = None
    """Key of the file tier's HMAC; without it entries only survive while the server runs."""
    shm_backend: Literal["posix", "memfd"] = "posix"
    workers: int = Field(1, ge=1, le=512)
    metrics_max_series: int = Field(10_000, ge=1, le=10_000_000)
    """Rows of shared memory for the default metrics registry (``zeal_asgi.metrics``)."""
    gc_freeze: bool = False
    """Move what is alive once a worker has started into the collector's permanent generation
    (``gc.freeze``), so full collections stop walking the app's modules and models; on in the
    workers of ``zeal-asgi run`` unless ``ZEAL_GC_FREEZE`` says otherwise."""

    def __init__(self, **data: Any) -> None:
        """Validate ``data``.

        Raises:
            ConfigError: naming the setting, its variable and why its value is refused.
        """
        try:
            super().__init__(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            msg = first["msg"].removeprefix("Value error, ")
            if not first["loc"]:  # a rule across fields: its message names them
                raise ConfigError(f"invalid settings: {msg}") from exc
            field = str(first["loc"][0])
            raise ConfigError(
                f"invalid setting {field} ({ENV_PREFIX}{field.upper()}): {msg}"
            ) from exc

    @field_validator("store_backend", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> StoreBackendKind:
        return StoreBackendKind.parse(v)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, v: str | None) -> str | None:
        scheme = v.partition("://")[0].lower() if v is not None and "://" in v else ""
        if v is not None and scheme not in REDIS_URL_SCHEMES:
            schemes = ", ".join(f"{s}://" for s in sorted(REDIS_URL_SCHEMES))
            got = f"{scheme}://" if scheme else "no scheme"
            raise ValueError(f"a Redis URL starts with one of {schemes}; got {got}")
        return v

    @model_validator(mode="after")
    def _breaker_needs_on_error(self) -> ZealSettings:
        given = self.breaker_options()
        if self.on_error is None and given:
            names = ", ".join(f"{ENV_PREFIX}BREAKER_{n.upper()}" for n in given)
            raise ValueError(
                f"{names}: breaker settings without a breaker; set "
                f"{ENV_PREFIX}ON_ERROR=fallback_table too"
            )
        return self

    def breaker_options(self) -> dict[str, Any]:
        """The ``breaker`` options that were set (``BreakerOptions`` defaults the rest)."""
        return {
            name.removeprefix("breaker_"): value
            for name in type(self).model_fields
            if name.startswith("breaker_") and (value := getattr(self, name)) is not None
        }

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ZealSettings:
        """Read ``ZEAL_*`` variables (an empty one counts as unset); explicit ``overrides`` win.

        Raises:
            ConfigError: naming the variable and why its value is refused.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {
            name: raw for name in cls.model_fields if (raw := env.get(ENV_PREFIX + name.upper()))
        }
        data.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**data)

    def backend_conn(self) -> str | dict[str, Any] | None:
        """The connection options of the configured backend, for ``Store.default_backend``."""
        kind = self.store_backend
        if kind is StoreBackendKind.TABLE:
            return None
        if kind is StoreBackendKind.MEMCACHED:
            conn: dict[str, Any] = {"servers": self.memcached_servers}
        else:
            conn = {"url": self.redis_url, "pool_size": self.redis_pool_size}
        conn["prefix"] = self.key_prefix
        if kind is StoreBackendKind.TIERED:
            conn.update(l1_ttl=self.l1_ttl, invalidation_secret=self.tiered_invalidation_secret)
        if self.on_error:
            conn.update(on_error=self.on_error, breaker=self.breaker_options())
        return conn
