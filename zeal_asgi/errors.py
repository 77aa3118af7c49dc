"""The one exception hierarchy of zeal_asgi.

Every leaf also inherits the builtin a caller would naturally catch (``ValueError``,
``KeyError``, ``TypeError``, ``OverflowError``, ``TimeoutError``, ``ConnectionError``), so
``except ValueError`` keeps working, while ``except ZealError`` catches everything we raise.
Client-library exceptions (redis, aiomcache) are translated at the backend boundary with
``raise ... from exc``; nothing above a backend sees them.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from types import ModuleType
from typing import Any


class ZealError(Exception):
    """Base class of every exception raised by zeal_asgi."""


# -- configuration ---------------------------------------------------------------------------


class ConfigError(ZealError, ValueError):
    """Bad settings or connection string; raised when the configuration is read."""


class MissingExtraError(ConfigError):
    """A feature needs an optional dependency that is not installed; names the extra to add."""

    def __init__(self, feature: str, extra: str, missing: str) -> None:
        super().__init__(
            f"{feature} needs the {missing!r} package, which is not installed: "
            f'pip install "zeal-asgi[{extra}]"'
        )
        self.extra = extra
        self.missing = missing


class SchemaError(ZealError, ValueError):
    """A table schema that cannot be built: non-positive sizes, unknown types, bad names."""


# -- bad input to a table, a counter or a cache ------------------------------------------------


class InvalidKeyError(ZealError, ValueError):
    """A key that is empty, not encodable as UTF-8, or unsafe for the backend."""


class KeyTypeError(ZealError, TypeError):
    """A key that is neither ``str`` nor ``bytes``."""


class KeyTooLongError(InvalidKeyError):
    """A key longer than the table's key limit (never truncated)."""


class ValueTooLargeError(ZealError, ValueError):
    """A string or cache value longer than the column or entry limit (never truncated)."""


class _NamedKeyError(ZealError, KeyError):
    def __str__(self) -> str:
        # KeyError.__str__ repr()s the argument; keep the message readable.
        return str(self.args[0]) if self.args else ""


class UnknownColumnError(_NamedKeyError):
    """A column name that the table's schema does not have."""


class UnknownTableError(_NamedKeyError):
    """A table name that was never declared with ``Store.make``."""


class ColumnTypeError(ZealError, TypeError):
    """A value of the wrong Python type for its column (no silent ``int(1.9)``)."""


class IntegerOverflowError(ZealError, OverflowError):
    """An integer outside the column's or counter's range; the stored value is unchanged."""


class NonFiniteFloatError(ZealError, ValueError):
    """NaN or an infinity written to a FLOAT column that does not allow them."""


class MetricError(ZealError, ValueError):
    """A metric against Prometheus' rules: a bad name, label or bucket, a wrong label count, a
    counter stepped down."""


class InvalidTTLError(ZealError, ValueError):
    """A TTL that is negative, NaN, infinite or absurdly large."""


class ModelValidationError(ZealError, ValueError):
    """A row breaking a limit of the pydantic model its table was made from (``Field(ge=...)``)."""


class SerializationError(ZealError, TypeError):
    """A value the configured serializer cannot encode (raised before any I/O)."""


# -- shared memory ---------------------------------------------------------------------------


class ShmError(ZealError, OSError):
    """A shared-memory segment could not be created or attached."""


class ShmCapacityError(ShmError):
    """The segment does not fit in the shared-memory filesystem (bytes needed / free given)."""


class ShmPermissionError(ShmError, PermissionError):
    """The segment is not owned by this user or is readable by others."""


class ShmNameTakenError(ShmError, FileExistsError):
    """The segment name exists but was not created by this server (squatted or foreign)."""


class ShmAbiMismatchError(ShmError):
    """The segment was made by an incompatible build (layout, libc, schema)."""


class PrivateCopyError(ZealError, RuntimeError):
    """A worker holds its own copy of a table that its siblings share (misconfigured server)."""


class LockTimeoutError(ZealError, TimeoutError):
    """A lock was not obtained in time: a table row's (its holder is stuck) or ``zeal.lock``'s
    (its ``timeout``)."""


class LockLostError(ZealError, RuntimeError):
    """A ``zeal.lock`` lease could not be renewed while its body ran (another holder may have it
    now): the body was cancelled."""


class TableFullError(ZealError, OverflowError):
    """The table already holds ``capacity`` rows and a new key was written."""


# -- backends --------------------------------------------------------------------------------


class BackendError(ZealError):
    """A backend (Redis, Memcached, ...) failed to serve a request."""


class BackendUnavailableError(BackendError, ConnectionError):
    """The backend cannot be reached, or the circuit breaker is open."""


class BackendTimeoutError(BackendError, TimeoutError):
    """The backend did not answer within the configured timeout."""


class ContentionError(BackendTimeoutError):
    """An optimistic update (compare-and-swap) kept losing to other writers until its deadline.

    The backend is up and answering: a circuit breaker does not count this as an outage.
    """


class PoolTimeoutError(BackendTimeoutError):
    """No pooled connection became free within the acquire timeout."""


class BackendTLSError(BackendUnavailableError):
    """The TLS handshake or certificate verification failed."""


class BackendAuthError(BackendUnavailableError, PermissionError):
    """The backend refused our credentials."""


class BackendResponseError(BackendError, RuntimeError):
    """The backend answered with an error or with data that does not fit the table's schema.

    E.g. a Lua error in ``Store.eval``, a key of the wrong type, or a stored field written by
    another program that does not decode as its column's type.  Not an outage: retrying or
    opening a circuit breaker does not help.
    """


class CapacityError(BackendError, OverflowError):
    """The backend refused a value or a row because of its size limits."""


class UnsupportedOperationError(BackendError, NotImplementedError):
    """The selected backend cannot do this (e.g. ``eval`` on the table backend)."""


class MessageRejectedError(ZealError, ValueError):
    """A signed message failed verification; ``reason`` names why."""

    def __init__(self, reason: str, message: str | None = None) -> None:
        super().__init__(message or f"message rejected: {reason}")
        self.reason = reason


class InsecureCacheDirError(ZealError, PermissionError):
    """The cache directory is a symlink, not ours, or open to other users."""


def require(module: str, *, extra: str, feature: str) -> ModuleType:
    """Import ``module`` from an optional extra, or raise :class:`MissingExtraError`.

    Only a missing top-level package counts; an error inside an installed one propagates.
    """
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        top = module.partition(".")[0]
        if exc.name != top:
            raise
        raise MissingExtraError(feature, extra, top) from exc


def built_on_first_use(
    namespace: dict[str, Any], **makers: Callable[[], Any]
) -> Callable[[str], Any]:
    """A module ``__getattr__`` that builds each name of ``makers`` on first use and keeps it.

    For attributes that need an optional extra (a FastAPI router), so the module itself imports
    without it: ``__getattr__ = built_on_first_use(globals(), router=make_router)``.
    """

    def __getattr__(name: str) -> Any:
        make = makers.get(name)
        if make is None:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        value = namespace[name] = make()
        return value

    return __getattr__
