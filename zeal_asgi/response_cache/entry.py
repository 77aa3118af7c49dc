"""A cached response as bytes, and the HTTP headers every answer built from it carries.

An entry is one ``bytes`` value in the :class:`~zeal_asgi.cache.Cache` (any serializer stores
``bytes`` as they are)::

    head (version, status, created, expires, length of the header block) | etag | headers | body

``headers`` are the stored response's own header lines (``name:value\\n``; ASGI servers refuse
a newline inside a value); the ones this package owns (``ETag``, ``Cache-Control``, ``Vary``,
``Age``, ``Content-Length``) are never stored but written per answer, so ``max-age`` and ``Age``
always tell the remaining time.  :data:`PASS` is the marker a computer leaves under a key whose
response may not be stored (a ``Set-Cookie``, a status not listed, a body too large, a stream,
an exception): the requests that waited for it run their own handler instead of waiting in turn.

The ``ETag`` is a unkeyed BLAKE2b of the status, content type and encoding and the body, so
every worker and every node computes the same strong tag for the same representation.
"""

from __future__ import annotations

import hashlib
import struct
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from starlette.background import BackgroundTask
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

PASS = b"\x00"
"""Stored under a key whose response is not cacheable (see the module doc)."""

_VERSION = 1
_HEAD = struct.Struct("<BHddI")
_ETAG_LEN = 34  # a quoted 32-hex-digit tag
Headers = list[tuple[bytes, bytes]]

# Written per answer (never stored), or meaningless once stored.
_OWN = frozenset(
    {
        b"etag",
        b"cache-control",
        b"vary",
        b"age",
        b"content-length",
        b"date",
        b"server",
        b"expires",
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
    }
)


@dataclass(frozen=True, slots=True)
class Captured:
    """A complete (non-streaming) response as the handler produced it."""

    status: int
    headers: Headers
    body: bytes


@dataclass(frozen=True, slots=True)
class Entry:
    """A decoded entry: what every answer for its key is built from."""

    status: int
    created: float
    expires: float
    etag: bytes
    headers: Headers
    body: bytes


def etag_of(status: int, headers: Sequence[tuple[bytes, bytes]], body: bytes) -> bytes:
    """The strong, quoted ETag of a representation (the same on every worker and node)."""
    h = hashlib.blake2b(digest_size=16)
    h.update(status.to_bytes(2, "little"))
    for name, value in headers:
        if name in (b"content-type", b"content-encoding"):
            h.update(name + b":" + value + b"\n")
    h.update(b"\n")
    h.update(body)
    return b'"' + h.hexdigest().encode() + b'"'


def encode(captured: Captured, ttl: float) -> bytes:
    """The entry of ``captured``, created now and fresh for ``ttl`` seconds."""
    kept = [(n, v) for n, v in captured.headers if n not in _OWN]
    block = b"".join(n + b":" + v + b"\n" for n, v in kept)
    now = time.time()
    etag = etag_of(captured.status, kept, captured.body)
    head = _HEAD.pack(_VERSION, captured.status, now, now + ttl, len(block))
    return b"".join((head, etag, block, captured.body))


def decode(blob: bytes) -> Entry | None:
    """The entry in ``blob``; ``None`` for anything else (an older format, damage)."""
    if len(blob) < _HEAD.size + _ETAG_LEN or blob[0] != _VERSION:
        return None
    _, status, created, expires, hlen = _HEAD.unpack_from(blob)
    at = _HEAD.size + _ETAG_LEN
    if at + hlen > len(blob):
        return None
    headers: Headers = []
    for line in blob[at : at + hlen].split(b"\n")[:-1]:
        name, sep, value = line.partition(b":")
        if not sep:
            return None
        headers.append((name, value))
    return Entry(status, created, expires, blob[_HEAD.size : at], headers, blob[at + hlen :])


def etag_matches(if_none_match: bytes, etag: bytes) -> bool:
    """``If-None-Match`` (``*`` or a list of tags) matches ``etag`` (weak comparison, RFC 9110
    13.1.2: ``W/"x"`` matches ``"x"``)."""
    value = if_none_match.strip()
    if value == b"*":
        return True
    for tag in value.split(b","):
        tag = tag.strip()
        if tag.startswith(b"W/"):
            tag = tag[2:]
        if tag == etag:
            return True
    return False


class RawResponse(Response):
    """A response from ready-made raw headers and body; to ``HEAD`` it sends no body."""

    def __init__(
        self,
        status: int,
        headers: Headers,
        body: bytes,
        background: BackgroundTask | None = None,
    ) -> None:
        # Response.__init__ would render and add headers: everything is ready here.
        self.status_code = status
        self.raw_headers = headers
        self.body = body
        self.background = background

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Send the response (no body to a ``HEAD`` request; its length is the GET's)."""
        await send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        body = b"" if scope.get("method") == "HEAD" else self.body
        await send({"type": "http.response.body", "body": body})
        if self.background is not None:
            await self.background()


def answer_headers(
    entry: Entry, cache_control: bytes, vary: bytes, age: int | None, full: bool
) -> Headers:
    """The headers of an answer from ``entry``: the stored ones (when ``full``, i.e. not a 304)
    plus ETag, Cache-Control with the remaining time, Vary and, on a hit, Age."""
    ttl = int(entry.expires - entry.created)
    max_age = max(0, ttl - (age or 0))
    out: Headers = []
    if full:
        out += entry.headers
        out.append((b"content-length", str(len(entry.body)).encode()))
    out.append((b"etag", entry.etag))
    out.append((b"cache-control", cache_control + b", max-age=" + str(max_age).encode()))
    if vary:
        out.append((b"vary", vary))
    if age is not None:
        out.append((b"age", str(age).encode()))
    return out


def vary_names(headers: Iterable[tuple[bytes, bytes]]) -> set[bytes]:
    """Header names listed by the ``Vary`` headers of a response (lower case)."""
    names: set[bytes] = set()
    for name, value in headers:
        if name == b"vary":
            names.update(v.strip().lower() for v in value.split(b",") if v.strip())
    return names
