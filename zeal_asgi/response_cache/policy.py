"""What a cached route (or the middleware) stores, checked once when it is declared.

A request is looked up under ``path + sorted query + the vary headers`` (plus the
``Authorization`` header itself with ``private=True``); see :mod:`zeal_asgi.response_cache.tokens`
for the invalidation tokens that complete the key.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zeal_asgi.errors import ConfigError

if TYPE_CHECKING:
    from zeal_asgi.cache import Cache

DEFAULT_MAX_BODY = 1 << 20
MAX_TTL = 365 * 86400
"""A year: HTTP caches cap ``max-age`` there too; a longer TTL is a unit mistake."""
PASS_TTL = 5.0
"""Longest time a key stays marked "not cacheable" before the next request tries again."""

_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")  # RFC 9110 field-name (token)
_FIELD = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_NOT_STORABLE = frozenset({206, 304})


@dataclass(frozen=True, slots=True)
class Policy:
    """A validated ``cache_response`` / ``ResponseCacheMiddleware`` configuration."""

    ttl: float
    vary: frozenset[bytes]
    """Request header names (lower case) whose values are part of the key."""
    tags: tuple[str, ...]
    """Tag templates, formatted with the route's arguments (``"item:{item_id}"``)."""
    private: bool
    statuses: frozenset[int]
    max_body_bytes: int
    cache: Cache | None
    cache_control: bytes
    """``public`` or ``private``; ``max-age`` is added per answer."""
    vary_header: bytes
    """The ``Vary`` value of every answer (empty when nothing varies)."""

    @property
    def pass_ttl(self) -> float:
        """How long a not-cacheable marker lives."""
        return min(self.ttl, PASS_TTL)


def _names(value: object, what: str, where: str) -> list[str]:
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigError(f"{where}: {what} must be a list or tuple of str, got {value!r}")
    items = list(value)
    for item in items:
        if not isinstance(item, str) or not item:
            raise ConfigError(f"{where}: every {what} entry must be a non-empty str, got {item!r}")
    return items


def tag_fields(tag: str, where: str) -> list[str]:
    """Names of the ``{fields}`` of a tag template (simple names only)."""
    try:
        parts = list(string.Formatter().parse(tag))
    except ValueError as exc:
        raise ConfigError(f"{where}: tag {tag!r} is not a valid template: {exc}") from None
    fields = []
    for _, field, _, _ in parts:
        if field is None:
            continue
        if not _FIELD.match(field):
            raise ConfigError(
                f"{where}: tag {tag!r} may only use {{name}} fields naming the route's "
                f"parameters, got {{{field}}}"
            )
        fields.append(field)
    return fields


def make_policy(
    where: str,
    ttl: float,
    vary: Collection[str],
    tags: Collection[str],
    private: bool,
    statuses: Collection[int],
    max_body_bytes: int,
    cache: Cache | None,
) -> Policy:
    """Validate the arguments of ``cache_response`` / the middleware (ConfigError naming
    ``where``, the argument and its limit)."""
    if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or not math.isfinite(ttl):
        raise ConfigError(f"{where}: ttl must be a number of seconds, got {ttl!r}")
    if not 0 < ttl <= MAX_TTL:
        raise ConfigError(f"{where}: ttl must be in (0, {MAX_TTL}] seconds, got {ttl!r}")
    varied = []
    for name in _names(vary, "vary", where):
        if not _TOKEN.match(name):
            raise ConfigError(f"{where}: vary entry {name!r} is not an HTTP header name")
        if name.lower() not in varied:
            varied.append(name.lower())
    tag_list = _names(tags, "tags", where)
    for tag in tag_list:
        tag_fields(tag, where)
    if not isinstance(private, bool):
        raise ConfigError(f"{where}: private must be a bool, got {private!r}")
    if isinstance(statuses, (str, bytes)) or not isinstance(statuses, Iterable):
        raise ConfigError(f"{where}: statuses must be a list or tuple of int, got {statuses!r}")
    codes = list(statuses)
    if not codes:
        raise ConfigError(f"{where}: statuses must name at least one status")
    for code in codes:
        if isinstance(code, bool) or not isinstance(code, int) or not 200 <= code <= 599:
            raise ConfigError(f"{where}: statuses must be ints in [200, 599], got {code!r}")
        if code in _NOT_STORABLE:
            raise ConfigError(f"{where}: a {code} response cannot be stored and replayed")
    if (
        isinstance(max_body_bytes, bool)
        or not isinstance(max_body_bytes, int)
        or not 1 <= max_body_bytes <= 1 << 30
    ):
        raise ConfigError(
            f"{where}: max_body_bytes must be an int in [1, {1 << 30}], got {max_body_bytes!r}"
        )
    listed = [*varied, "authorization"] if private and "authorization" not in varied else varied
    return Policy(
        ttl=float(ttl),
        vary=frozenset(v.encode() for v in varied),
        tags=tuple(tag_list),
        private=private,
        statuses=frozenset(codes),
        max_body_bytes=max_body_bytes,
        cache=cache,
        cache_control=b"private" if private else b"public",
        vary_header=", ".join(listed).encode(),
    )


@dataclass(frozen=True, slots=True)
class RequestParts:
    """What a GET/HEAD request contributes to its key and to the answer."""

    authorization: bytes | None = None
    if_none_match: bytes | None = None
    varied: tuple[bytes, ...] = ()
    """``name=value`` of the vary headers present, in header order."""

    @classmethod
    def read(cls, headers: Iterable[tuple[bytes, bytes]], vary: frozenset[bytes]) -> RequestParts:
        """One pass over the request's raw headers (names are lower case in ASGI); the shared
        :data:`NO_PARTS` when none of them matters, as for most requests."""
        auth = inm = None
        varied: list[bytes] | None = None
        for name, value in headers:
            if name == b"authorization":
                auth = value
            elif name == b"if-none-match":
                inm = value if inm is None else inm + b"," + value
            if name in vary:
                if varied is None:
                    varied = []
                varied.append(name + b"=" + value)
        if auth is None and inm is None and varied is None:
            return NO_PARTS
        return cls(auth, inm, () if varied is None else tuple(varied))


NO_PARTS = RequestParts()
"""A request without ``Authorization``, ``If-None-Match`` or a varied header."""
