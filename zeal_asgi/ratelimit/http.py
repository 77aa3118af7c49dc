"""The HTTP edge of rate limiting: keys from connections, headers, the FastAPI dependency and the
pure-ASGI middleware.

Headers follow the IETF httpapi WG's draft "RateLimit header fields for HTTP"
(draft-ietf-httpapi-ratelimit-headers-11, May 2026; the field syntax is that of -09 and -10):
``RateLimit-Policy`` is a Structured Fields list of quota policies, ``"<name>";q=<quota>;
w=<window seconds>``, and ``RateLimit`` the service limit of the policy that decided the request,
``"<name>";r=<remaining quota>;t=<seconds until it resets>`` (non-negative integers).  A refused
request is ``429`` with ``Retry-After`` in whole seconds (at least 1) and a JSON body; a request
the backend could not decide under ``on_backend_error="deny"`` is ``503`` with ``Retry-After: 1``.
"""

from __future__ import annotations

import inspect
import ipaddress
import json
import math
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from starlette.requests import HTTPConnection, Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send
from starlette.websockets import WebSocket

from zeal_asgi.errors import ConfigError, require
from zeal_asgi.ratelimit._fast import peer, ratelimit_value
from zeal_asgi.ratelimit.limiter import RateLimiter, RateLimitResult

if TYPE_CHECKING:
    from fastapi import Response

KeyFunc = Callable[[HTTPConnection], "str | Awaitable[str]"]
"""A key: a callable taking the connection (``Request`` or ``WebSocket``), sync or async."""

_Net = ipaddress.IPv4Network | ipaddress.IPv6Network


class ClientIP:
    """The client's address as a rate-limit key.

    The socket peer, unless the peer is one of ``trusted_proxies`` (addresses or networks):
    then the rightmost address of ``X-Forwarded-For`` (or ``Forwarded: for=``) that is not a
    trusted proxy itself (the peer's own, when that hop is not an address).  A header from any
    other peer is ignored, so a client cannot pick its own key by sending one.  (A server that
    already rewrites the peer from these headers, like uvicorn's ``--forwarded-allow-ips``,
    needs no trusted proxies here.)

    Example::

        key = ClientIP(trusted_proxies=("10.0.0.0/8",))
        limiter.depends(key=key)
    """

    def __init__(self, trusted_proxies: Iterable[str] = ()) -> None:
        nets: list[_Net] = []
        for entry in trusted_proxies if not isinstance(trusted_proxies, str) else [trusted_proxies]:
            try:
                nets.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                raise ConfigError(
                    f"trusted_proxies holds addresses or networks, got {entry!r}"
                ) from None
        self.trusted_proxies: tuple[_Net, ...] = tuple(nets)

    def _trusted(self, address: str) -> bool:
        try:
            ip = ipaddress.ip_address(address)
        except ValueError:
            return False
        return any(ip in net for net in self.trusted_proxies)

    def of_scope(self, scope: Scope) -> str:
        """The key of an ASGI ``scope`` (what :meth:`__call__` returns for its connection)."""
        address = peer(scope)
        if not self.trusted_proxies or not self._trusted(address):
            return address
        hops: list[str] = []
        for name, value in scope.get("headers", ()):
            if name == b"x-forwarded-for":
                hops += [h.strip() for h in value.decode("latin-1").split(",")]
            elif name == b"forwarded":
                hops += _forwarded_for(value.decode("latin-1"))
        for hop in reversed(hops):
            if not hop:
                continue
            try:
                ip = ipaddress.ip_address(hop)
            except ValueError:
                # "unknown", an obfuscated name, or whatever a proxy passed on unchecked: the
                # clients behind it share the proxy's key rather than choose their own.
                return address
            if not any(ip in net for net in self.trusted_proxies):
                return str(ip)
        return address

    def __call__(self, conn: HTTPConnection) -> str:
        """The client address of ``conn``."""
        return self.of_scope(conn.scope)


def _forwarded_for(value: str) -> list[str]:
    """The ``for=`` addresses of a ``Forwarded`` header (RFC 7239), in order."""
    out = []
    for element in value.split(","):
        for pair in element.split(";"):
            name, _, v = pair.strip().partition("=")
            if name.lower() == "for":
                v = v.strip('"')
                if v.startswith("["):  # "[2001:db8::1]:4711"
                    v = v[1 : v.find("]")]
                elif v.count(":") == 1:  # "192.0.2.1:4711"
                    v = v.partition(":")[0]
                out.append(v)
    return out


client_ip = ClientIP()
"""The socket peer's address (no proxy trusted); ``ClientIP(trusted_proxies=...)`` behind one."""


# -- headers and bodies ------------------------------------------------------------------------


def decision_headers(limiter: RateLimiter, result: RateLimitResult) -> list[tuple[str, str]]:
    """The response headers of a decision: ``RateLimit-Policy`` and ``RateLimit``, on a refusal
    ``Retry-After``, and the ``X-RateLimit-*`` trio when the limiter asks for it."""
    reset = max(0, math.ceil(result.reset_after))
    remaining = max(0, result.remaining)
    prefix = limiter.ratelimit_prefix[id(result.policy)]
    out = [
        ("RateLimit-Policy", limiter.policy_header),
        ("RateLimit", ratelimit_value(prefix, remaining, result.reset_after).decode("ascii")),
    ]
    if not result.allowed:
        out.append(("Retry-After", str(retry_seconds(result))))
    if limiter.x_ratelimit_headers:
        out += [
            ("X-RateLimit-Limit", str(result.limit)),
            ("X-RateLimit-Remaining", str(remaining)),
            ("X-RateLimit-Reset", str(reset)),
        ]
    return out


def raw_headers(limiter: RateLimiter, result: RateLimitResult) -> list[tuple[bytes, bytes]]:
    """:func:`decision_headers` as ASGI raw headers (lower-case names, latin-1 bytes): what the
    middleware sends, built without formatting strings first."""
    allowed, _, remaining, reset, _, policy, _ = result  # one unpacking, not five lookups
    if not allowed or limiter.x_ratelimit_headers:
        return [
            (n.lower().encode("latin-1"), v.encode("latin-1"))
            for n, v in decision_headers(limiter, result)
        ]
    return [
        (b"ratelimit-policy", limiter.policy_header_bytes),
        (b"ratelimit", ratelimit_value(limiter.ratelimit_prefix[id(policy)], remaining, reset)),
    ]


def retry_seconds(result: RateLimitResult) -> int:
    """``Retry-After`` of a refusal: whole seconds, at least 1."""
    return max(1, math.ceil(result.retry_after - 1e-9))


def refusal_status(result: RateLimitResult) -> int:
    """429 for a limit reached, 503 when the backend could not decide (policy ``deny``)."""
    return 503 if result.error is not None else 429


def refusal_body(limiter: RateLimiter, result: RateLimitResult) -> dict[str, Any]:
    """The JSON body of a refusal (under ``detail``, like FastAPI's HTTPException)."""
    if result.error is not None:
        return {
            "detail": "rate limit backend unavailable; retry later",
            "limiter": limiter.name,
            "retry_after": retry_seconds(result),
        }
    return {
        "detail": f"rate limit exceeded: {result.policy}",
        "limiter": limiter.name,
        "policy": limiter.policy_name(result.policy),
        "limit": result.limit,
        "window": result.policy.window,
        "retry_after": retry_seconds(result),
    }


_Hit = Callable[[Any, list[tuple[bytes, bytes]]], "RateLimitResult | None"]


def _compiled_hits(
    limiter: RateLimiter, key: KeyFunc, cost: int
) -> tuple[_Hit | None, _Hit | None]:
    """``(by_peer, by_key)``: the compiled call deciding the common admitted hit, on the
    scope's peer address itself when that is the key (a ClientIP trusting no proxy), else on
    the key; neither where the limiter has no compiled path or the cost is not 1."""
    compiled = limiter.compiled if cost == 1 else None
    if compiled is None:
        return None, None
    if isinstance(key, ClientIP) and not key.trusted_proxies:
        return compiled.hit_peer, None
    return None, compiled.hit


async def _key_of(key: KeyFunc, conn: HTTPConnection) -> str:
    value = key(conn)
    if inspect.isawaitable(value):
        value = await value
    return value  # the limiter checks it is a str


# -- the FastAPI dependency ---------------------------------------------------------------------


def depends(
    limiter: RateLimiter, key: KeyFunc, cost: int = 1
) -> Callable[..., Awaitable[RateLimitResult]]:
    """A FastAPI dependency charging ``cost`` to ``key(connection)`` on every request (or
    WebSocket handshake): see :meth:`RateLimiter.depends`."""
    if not callable(key):
        raise ConfigError(f"key must be a callable taking the connection, got {key!r}")
    limiter._check("k", cost)  # a bad cost fails at declaration, not at the first request
    fastapi = require("fastapi", extra="fastapi", feature="RateLimiter.depends")

    hit_now = limiter.hit_now
    by_scope = key.of_scope if isinstance(key, ClientIP) else None
    by_peer, by_key = _compiled_hits(limiter, key, cost)

    async def rate_limit(connection: HTTPConnection, response: Response) -> RateLimitResult:
        if by_peer is not None:
            result = by_peer(connection.scope, response.raw_headers)
            if result is not None:
                return result
        k = by_scope(connection.scope) if by_scope is not None else await _key_of(key, connection)
        if by_key is not None:
            result = by_key(k, response.raw_headers)
            if result is not None:
                return result
        result = hit_now(k, cost)  # decided in place on the table backend
        if result is None:
            result = await limiter.hit(k, cost)
        if result.allowed:
            response.raw_headers.extend(raw_headers(limiter, result))
            return result
        headers = decision_headers(limiter, result)
        if isinstance(connection, WebSocket):
            raise fastapi.WebSocketException(code=1008, reason="rate limit exceeded")
        raise fastapi.HTTPException(
            status_code=refusal_status(result),
            detail=refusal_body(limiter, result)["detail"],
            headers=dict(headers),
        )

    # FastAPI reads the annotations: real classes, not the strings of postponed evaluation.
    rate_limit.__annotations__ = {
        "connection": HTTPConnection,
        "response": fastapi.Response,
        "return": RateLimitResult,
    }
    return rate_limit


# -- the ASGI middleware ------------------------------------------------------------------------


class RateLimitMiddleware:
    """Pure-ASGI rate limiting of every HTTP request and WebSocket handshake of an app.

    Example::

        app.add_middleware(RateLimitMiddleware, limiter=limiter, key=client_ip,
                           exempt=("/health",))

    Args:
        limiter: the limiter to charge.
        key: the key of a connection (``client_ip`` by default).
        exempt: paths never limited: an exact path, or every path below it (``"/health"``
            exempts ``/health/store``).
        cost: units each request costs.

    An admitted request's response carries the RateLimit headers; a refused one gets 429 (503
    when the backend could not decide and the policy is ``deny``) with a JSON body, and a
    refused WebSocket handshake gets the same answer where the server supports the
    ``websocket.http.response`` extension, else a close (code 1008: the server answers 403).
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: RateLimiter,
        key: KeyFunc | None = None,
        exempt: Sequence[str] = (),
        cost: int = 1,
    ) -> None:
        if not isinstance(limiter, RateLimiter):
            raise ConfigError(f"RateLimitMiddleware needs a RateLimiter, got {limiter!r}")
        if isinstance(exempt, str):
            exempt = (exempt,)
        for path in exempt:
            if not isinstance(path, str) or not path.startswith("/"):
                raise ConfigError(f"exempt paths start with '/', got {path!r}")
        limiter._check("k", cost)
        self.app = app
        self.limiter = limiter
        self.key: KeyFunc = client_ip if key is None else key
        if not callable(self.key):
            raise ConfigError(f"key must be a callable taking the connection, got {key!r}")
        self.exempt = frozenset(p.rstrip("/") or "/" for p in exempt)
        self.cost = cost
        self._by_scope = self.key.of_scope if isinstance(self.key, ClientIP) else None
        self._by_peer, self._by_key = _compiled_hits(limiter, self.key, cost)

    def _exempt(self, path: str) -> bool:
        if not self.exempt:
            return False
        if path in self.exempt:
            return True
        return any(path.startswith(p + "/") for p in self.exempt if p != "/")

    async def _key(self, scope: Scope, receive: Receive, send: Send) -> str:
        conn: HTTPConnection = (
            Request(scope, receive) if scope["type"] == "http" else WebSocket(scope, receive, send)
        )
        return await _key_of(self.key, conn)

    async def _decide(
        self, scope: Scope, receive: Receive, send: Send
    ) -> tuple[RateLimitResult, list[tuple[bytes, bytes]]]:
        """The decision and its headers, where the compiled call on the peer's address did not
        decide."""
        by_scope = self._by_scope  # the usual key: no connection object to build
        key = by_scope(scope) if by_scope is not None else await self._key(scope, receive, send)
        raw: list[tuple[bytes, bytes]] = []
        result = self._by_key(key, raw) if self._by_key is not None else None
        if result is not None:
            return result, raw
        result = self.limiter.hit_now(key, self.cost)  # decided in place on the table backend
        if result is None:
            result = await self.limiter.hit(key, self.cost)
        return result, raw_headers(self.limiter, result)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if (kind != "http" and kind != "websocket") or (
            self.exempt and self._exempt(scope["path"])
        ):
            await self.app(scope, receive, send)
            return
        limiter = self.limiter
        raw: list[tuple[bytes, bytes]] = []
        result = self._by_peer(scope, raw) if self._by_peer is not None else None
        if result is None:
            result, raw = await self._decide(scope, receive, send)
        if result.allowed:
            first = "http.response.start" if kind == "http" else "websocket.accept"

            def send_with_headers(message: Message) -> Awaitable[None]:
                # not a coroutine: ``send``'s own awaitable is handed back, so each message
                # the app sends costs no frame of ours
                if message["type"] == first:
                    message = {**message, "headers": [*message.get("headers", ()), *raw]}
                return send(message)

            await self.app(scope, receive, send_with_headers)
            return
        body = json.dumps(refusal_body(limiter, result)).encode()
        headers = [
            *raw,
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ]
        status = refusal_status(result)
        if kind == "http":
            await send({"type": "http.response.start", "status": status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        message = await receive()  # websocket.connect
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            start = {"type": "websocket.http.response.start", "status": status}
            await send({**start, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:
            await send({"type": "websocket.close", "code": 1008, "reason": "rate limited"})
