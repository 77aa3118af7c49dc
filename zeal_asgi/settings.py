"""``ZealSettings``: configuration from arguments, else ``ZEAL_*`` environment variables.

Validated when read: a bad value fails the boot with the variable's name and the reason.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

from .errors import ConfigError
from .store.base import StoreBackendKind

__all__ = ["ZealSettings"]

ENV_PREFIX = "ZEAL_"


class ZealSettings(BaseModel):
    """Every setting of a Zeal app; each field reads ``ZEAL_<FIELD>`` (upper case)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    store_backend: StoreBackendKind = StoreBackendKind.TABLE
    """``table`` (default, one host), ``redis``, ``tiered`` or ``memcached``."""
    redis_url: str | None = None
    """``redis://host:port/db`` or ``rediss://`` (TLS, verified)."""
    redis_pool_size: int = Field(default=8, ge=1, le=1024)
    key_prefix: str = Field(
        default="zeal", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$"
    )
    """Prefix of every Redis/Memcached key and channel."""
    memcached_servers: str | None = None
    """``host:port[,host:port...]`` or a ``memcached://`` URL."""
    tiered_invalidation_secret: str | None = None
    """Shared secret that signs tiered-backend invalidations (HMAC-SHA256)."""
    l1_ttl: float = Field(default=5.0, gt=0, le=86400)
    on_error: Literal["fallback_table"] | None = None
    """``fallback_table``: wrap the backend in the circuit breaker."""
    cache_dir: str = ".cache"
    cache_secret: str | None = None
    """Key of the file tier's HMAC; without it entries only survive while the server runs."""
    shm_backend: Literal["posix", "memfd"] = "posix"
    workers: int = Field(default=1, ge=1, le=512)

    @field_validator("store_backend", mode="before")
    @classmethod
    def _kind(cls, v: Any) -> StoreBackendKind:
        return StoreBackendKind.parse(v)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> ZealSettings:
        """Read ``ZEAL_*`` variables; explicit ``overrides`` win.

        Raises:
            ConfigError: naming the variable and why its value is refused.
        """
        env = os.environ if environ is None else environ
        data: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(ENV_PREFIX + name.upper())
            if raw is not None and raw != "":
                data[name] = raw
        data.update({k: v for k, v in overrides.items() if v is not None})
        try:
            return cls(**data)
        except ValidationError as exc:
            first = exc.errors()[0]
            field = str(first["loc"][0]) if first["loc"] else "?"
            source = (
                f"{ENV_PREFIX}{field.upper()}" if field not in overrides else f"argument {field}"
            )
            raise ConfigError(f"invalid setting {source}: {first['msg']}") from exc

    def backend_conn(self) -> str | dict[str, Any] | None:
        """The connection options of the configured backend, for ``Store.default_backend``."""
        kind = self.store_backend
        if kind is StoreBackendKind.TABLE:
            return None
        if kind is StoreBackendKind.MEMCACHED:
            mc: dict[str, Any] = {"servers": self.memcached_servers, "prefix": self.key_prefix}
            if self.on_error:
                mc["on_error"] = self.on_error
            return mc
        conn: dict[str, Any] = {
            "url": self.redis_url,
            "pool_size": self.redis_pool_size,
            "prefix": self.key_prefix,
        }
        if kind is StoreBackendKind.TIERED:
            conn["l1_ttl"] = self.l1_ttl
            conn["invalidation_secret"] = self.tiered_invalidation_secret
        if self.on_error:
            conn["on_error"] = self.on_error
        return conn
