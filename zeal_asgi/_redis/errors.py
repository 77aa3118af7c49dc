"""Translation of redis-py exceptions into the ZealError hierarchy, at the backend boundary.

Nothing above ``zeal_asgi.store`` sees a redis type: every call site does
``raise translate(exc, where) from exc``.  The mapping also decides what is worth a retry
(:func:`retriable`): connection failures and timeouts, never auth, TLS, pool or data errors.
"""

from __future__ import annotations

import ssl

from zeal_asgi.errors import (
    BackendAuthError,
    BackendResponseError,
    BackendTimeoutError,
    BackendTLSError,
    BackendUnavailableError,
    CapacityError,
    IntegerOverflowError,
    PoolTimeoutError,
    ZealError,
)

# Server replies meaning "not now" rather than "no": the node is loading, failing over or
# has no quorum.  They become BackendUnavailableError, so breakers and retries treat them as
# an outage.
_UNAVAILABLE_REPLIES = ("LOADING", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "BUSY")
_AUTH_REPLIES = ("NOAUTH", "WRONGPASS", "NOPERM", "INVALIDUSERNAMEPASSWORD")


def _ssl_cause(exc: BaseException) -> ssl.SSLError | None:
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, ssl.SSLError):
            return cur
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return None


def translate(exc: BaseException, where: str) -> ZealError:
    """The ZealError for ``exc``, with a message naming ``where`` (no password in it)."""
    if isinstance(exc, ZealError):
        return exc
    # Imported here, on the error path: modules that only may talk to Redis (pub/sub, the
    # subscriber) import this one, and must import without the redis extra.
    from redis import exceptions as rx

    text = str(exc) or type(exc).__name__
    tls = _ssl_cause(exc)
    if tls is not None:
        detail = getattr(tls, "verify_message", None)
        if isinstance(tls, ssl.SSLCertVerificationError):
            return BackendTLSError(f"{where}: TLS certificate verify failed: {detail}")
        return BackendTLSError(f"{where}: TLS failed: {detail or tls}")
    code = text.split(" ", 1)[0] if isinstance(exc, rx.ResponseError) else ""
    auth = (rx.AuthenticationError, rx.AuthorizationError, rx.NoPermissionError)
    if code in _AUTH_REPLIES or isinstance(exc, (*auth, rx.AuthenticationWrongNumberOfArgsError)):
        return BackendAuthError(f"{where}: credentials refused: {text}")
    if isinstance(exc, rx.MaxConnectionsError) or (
        isinstance(exc, rx.ConnectionError) and "No connection available" in text
    ):
        return PoolTimeoutError(f"{where}: no pooled connection became free ({text})")
    if isinstance(exc, (rx.TimeoutError, TimeoutError)):  # asyncio's is the builtin
        return BackendTimeoutError(f"{where}: no answer in time ({text})")
    if isinstance(exc, rx.OutOfMemoryError) or text.startswith("OOM"):
        return CapacityError(f"{where}: the server is out of memory (maxmemory): {text}")
    outage = (rx.ConnectionError, rx.ClusterError, rx.ReadOnlyError, OSError)
    # Any other cluster error but a caller's mistake (no reachable startup node, a slot nobody
    # serves, no target) means the topology is down.
    misuse = (rx.CrossSlotTransactionError, rx.InvalidPipelineStack)
    cluster_down = isinstance(exc, rx.RedisClusterException) and not isinstance(exc, misuse)
    if isinstance(exc, outage) or cluster_down or code in _UNAVAILABLE_REPLIES:
        return BackendUnavailableError(f"{where}: {text}")
    # INCRBY/HINCRBY refused, nothing changed (redis-py drops the reply's "ERR ", hiredis not)
    if isinstance(exc, rx.ResponseError) and text.endswith("increment or decrement would overflow"):
        return IntegerOverflowError(
            f"{where}: the result would leave the signed 64-bit range; the value is unchanged"
        )
    return BackendResponseError(f"{where}: {type(exc).__name__}: {text}")


def retriable(err: ZealError) -> bool:
    """Whether a fresh attempt of an idempotent command may succeed where this one failed."""
    if isinstance(err, (BackendTLSError, BackendAuthError, PoolTimeoutError)):
        return False
    return isinstance(err, (BackendUnavailableError, BackendTimeoutError))
