"""Keys of the cache: the configured secret (or a random one per server) and the subkeys derived
from it, plus the small host-wide control table that shares the random key and the GC lease.

The random key lives in a shared-memory segment of this server (0600, removed with the server),
never in the cache directory, so a cache directory alone never lets anyone forge entries.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import logging
import os
import secrets
import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zeal_asgi.errors import ConfigError

if TYPE_CHECKING:
    from zeal_asgi.shm import Table

log = logging.getLogger("zeal_asgi.cache")

MIN_SECRET = 16
MIN_PICKLE_SECRET = 32
ENV_SECRET = "ZEAL_CACHE_SECRET"
_CONTROL_NAME = "__zeal_cache_ctl"
_RANDOM_ROW = "random-key"


def resolve_secret(secret: str | bytes | None, *, pickle: bool) -> bytes | None:
    """The configured secret (argument, else ``ZEAL_CACHE_SECRET``) as bytes, validated.

    Raises:
        ConfigError: too short, not str/bytes, or missing while ``pickle`` needs one.
    """
    source = "secret="
    if secret is None and os.environ.get(ENV_SECRET):
        secret, source = os.environ[ENV_SECRET], ENV_SECRET
    if secret is None:
        if pickle:
            raise ConfigError(
                "serializer='pickle' needs a secret of at least "
                f"{MIN_PICKLE_SECRET} bytes (secret= or {ENV_SECRET}): pickles are only loaded "
                "behind a MAC made with it"
            )
        return None
    if not isinstance(secret, (str, bytes)):
        raise ConfigError(f"cache secret must be str or bytes, got {type(secret).__name__}")
    raw = secret.encode("utf-8") if isinstance(secret, str) else secret
    need = MIN_PICKLE_SECRET if pickle else MIN_SECRET
    if len(raw) < need:
        raise ConfigError(
            f"cache secret ({source}) is {len(raw)} bytes; at least {need} are needed"
            + (" with serializer='pickle'" if pickle else "")
            + " (e.g. python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return raw


_control: Table | None = None
_control_lock = threading.Lock()


def control_table() -> Table:
    """This server's host-wide control table (random key row, GC lease rows)."""
    global _control
    with _control_lock:
        if _control is None or _control.closed:
            from zeal_asgi.shm.ext import Table

            _control = Table(64, {"key": ("bytes", 32), "owner": ("int", 8)}, name=_CONTROL_NAME)
        return _control


@functools.cache  # once per process
def _warn_ephemeral() -> None:
    log.info(
        "zeal_asgi cache: no secret configured (secret= or %s): using a random key per server "
        "run, so file-tier entries do not survive a restart",
        ENV_SECRET,
    )


@dataclass(frozen=True)
class CacheKeys:
    """Subkeys of one master key: each use gets its own, so none can stand in for another."""

    file_mac: bytes
    file_name: bytes
    memory_mac: bytes
    persistent: bool
    """True when derived from a configured secret (entries survive a server restart)."""

    @classmethod
    def load(cls, secret: bytes | None) -> CacheKeys:
        """Keys from ``secret``, or from this server's random key (logged once)."""
        master = secret
        if master is None:
            _warn_ephemeral()
            # The first worker to get here publishes its key; every other worker adopts it.
            control_table().compare_and_set(_RANDOM_ROW, "key", b"", secrets.token_bytes(32))
            master = control_table().get(_RANDOM_ROW, "key")

        def sub(label: bytes) -> bytes:
            return hmac.digest(master, b"zeal-asgi cache v1 " + label, hashlib.sha256)

        return cls(sub(b"file-mac"), sub(b"file-name"), sub(b"memory-mac"), secret is not None)


SHARED_UNAUTHENTICATED = hashlib.sha256(b"zeal-asgi cache: no secret configured").digest()
"""Memory-tier key on a backend shared by several hosts when no secret is configured: the hosts
must agree on it, so it only detects damage, not forgery (configure a secret for that)."""
