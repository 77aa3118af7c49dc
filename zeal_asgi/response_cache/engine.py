"""The lookup/compute/answer cycle shared by ``@cache_response`` and the middleware.

A GET or HEAD request becomes a :class:`Plan` (its key, or a bypass); the key is looked up
with :meth:`Cache.get_or_compute`, so concurrent misses of one key run the handler once per
host (table backend) or per cluster (redis/tiered) and every other request gets the stored
entry.  A handler whose response may not be stored leaves :data:`~.entry.PASS` under the key:
the requests that waited run their own handler (no queue behind a lock), and so does every
request until the marker expires or one of them produces a storable response again.

Failures of the backend never fail a request: the handler's response is served uncached,
counted as ``response_cache_errors`` and logged once per worker.  Exceptions of the handler
itself propagate unchanged.
"""

from __future__ import annotations

import hashlib
import logging
import os
import struct
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zeal_asgi.cache import Cache
from zeal_asgi.errors import ConfigError, TableFullError, ZealError
from zeal_asgi.response_cache.entry import (
    PASS,
    Captured,
    Entry,
    Headers,
    RawResponse,
    answer_headers,
    decode,
    encode,
    etag_matches,
    vary_names,
)
from zeal_asgi.response_cache.policy import NO_PARTS, Policy, RequestParts
from zeal_asgi.response_cache.tokens import Tokens, path_name, tag_name, tokens_of
from zeal_asgi.shm.hoststats import host_stats

if TYPE_CHECKING:
    from zeal_asgi.shm.ext import Tally

log = logging.getLogger("zeal_asgi.response_cache")

_ENTRY_OVERHEAD = 4096
"""Room kept for the entry's head and headers below the Cache's ``max_entry_bytes``."""


@dataclass(frozen=True, slots=True)
class Plan:
    """How one request is looked up."""

    key: str
    parts: RequestParts


@dataclass(frozen=True, slots=True)
class Passthrough:
    """The handler's own response, not cacheable: to be answered unchanged."""

    captured: Captured | None
    """The complete response, or ``None`` when it was a stream (already on its way)."""
    original: Any
    """What the handler returned (the decorator returns it as it is)."""


Produce = Callable[[], Awaitable[tuple[Captured | None, Any]]]
"""Runs the handler: ``(complete response or None for a stream, what the handler returned)``."""


class _Uncacheable(Exception):
    """Raised inside ``get_or_compute``'s function: store nothing (the marker is set)."""


class _Stats:
    """Host-wide counters (``zeal_response_cache_<event>_total`` in the metrics)."""

    def __init__(self) -> None:
        self.names = {
            e: f"response_cache_{e}"
            for e in (
                "hits",
                "misses",
                "not_modified",
                "uncacheable",
                "passes",
                "bypass",
                "errors",
            )
        }
        self.logged: set[str] = set()
        self.tallies: dict[str, Tally | None] = {}
        """Each event's counter row of this process (a forked child makes its own)."""
        os.register_at_fork(after_in_child=self.tallies.clear)

    def incr(self, event: str) -> None:
        tally = self.tallies.get(event)
        if tally is None:
            if event in self.tallies:  # the counters are full: incr copes
                host_stats().incr(self.names[event])
                return
            try:
                tally = host_stats().tally(self.names[event])
            except TableFullError:
                self.tallies[event] = None
                host_stats().incr(self.names[event])
                return
            self.tallies[event] = tally
        tally.add()

    def failed(self, exc: BaseException, when: str) -> None:
        self.incr("errors")
        kind = type(exc).__name__
        if kind not in self.logged:  # once per worker and kind: a backend outage is one event
            self.logged.add(kind)
            log.warning("response cache: %s %s; serving uncached: %s", kind, when, exc)


STATS = _Stats()

# Decoded entries by key, used while the Cache hands back the very same bytes object.
_MEMO: dict[str, tuple[bytes, Entry]] = {}
_MEMO_ROWS = 4096
_MEMO_VALUE_BYTES = 256 << 10


def _entry(key: str, blob: bytes) -> Entry | None:
    kept = _MEMO.get(key)
    if kept is not None and kept[0] is blob:
        return kept[1]
    entry = decode(blob)
    if entry is not None and len(blob) <= _MEMO_VALUE_BYTES:
        if len(_MEMO) >= _MEMO_ROWS:
            _MEMO.clear()
        _MEMO[key] = (blob, entry)
    return entry


_TOKENS = struct.Struct("<q")


class Engine:
    """One policy's view of the cache."""

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self._static_tags = [tag_name(t) for t in policy.tags] if _static(policy.tags) else None
        self._tokens: Tokens | None = None
        # the plan of a request (without headers that matter) and its tokens: made once
        self._plans: dict[tuple[Any, ...], Plan] = {}
        # the token rows of a path (with the fixed tags)
        self._names: dict[str, list[str]] = {}
        # the headers of the last answer per key, valid for its entry and its age in seconds
        self._answers: dict[str, tuple[Entry, int | None, bool, Headers]] = {}

    def cache(self) -> Cache:
        """The cache this policy stores in (the default one unless given)."""
        return self.policy.cache if self.policy.cache is not None else Cache.default()

    def declare(self) -> None:
        """Declare the token table now (import time, before workers start) when the cache is
        already known; otherwise it is declared on first use."""
        cache = self.policy.cache
        if cache is None:
            try:
                cache = Cache.default()
            except ConfigError:
                return
        tokens_of(cache).store()

    # -- lookup --------------------------------------------------------------------------------

    async def plan(self, scope: Mapping[str, Any], fields: Mapping[str, Any]) -> Plan | None:
        """The lookup of a GET/HEAD request, or ``None`` to serve it uncached (a request with
        ``Authorization`` without ``private=True``, or the token table unavailable)."""
        p = self.policy
        parts = RequestParts.read(scope["headers"], p.vary)
        if parts.authorization is not None and not p.private:
            STATS.incr("bypass")
            return None
        path: str = scope["path"]
        names = self._names.get(path)
        if names is None or self._static_tags is None:
            names = [path_name(path)]
            if self._static_tags is not None:
                names += self._static_tags
                if len(self._names) >= _MEMO_ROWS:
                    self._names.clear()
                self._names[path] = names
            else:
                names += [tag_name(_format(t, fields)) for t in p.tags]
        cache = self.cache()
        t = self._tokens
        if t is None or t.cache is not cache:
            t = self._tokens = tokens_of(cache)
        try:
            tokens = await t.current(names)
        except ZealError as exc:
            STATS.failed(exc, "reading the invalidation tokens")
            return None
        if tokens is None:
            STATS.incr("bypass")
            return None
        query = scope.get("query_string") or b""
        varied = tuple(sorted(parts.varied)) if parts.varied else ()
        if p.private and parts.authorization is not None:  # no credential kept in memory
            return Plan(_key(path, query, varied, parts.authorization, tokens), parts)
        memo = (path, query, varied, *tokens)
        plan = self._plans.get(memo)
        if plan is None:
            plan = Plan(_key(path, query, varied, None, tokens), NO_PARTS)
            if len(self._plans) >= _MEMO_ROWS:
                self._plans.clear()
            self._plans[memo] = plan
        return plan if parts is NO_PARTS else Plan(plan.key, parts)

    # -- the cycle -----------------------------------------------------------------------------

    def storable(self, captured: Captured, cache: Cache) -> bytes | None:
        """The entry of ``captured``, or ``None`` when it may not be stored."""
        p = self.policy
        if captured.status not in p.statuses or len(captured.body) > p.max_body_bytes:
            return None
        for name, value in captured.headers:
            if name == b"set-cookie":
                return None
            if name == b"cache-control" and b"no-store" in value.lower():
                return None
        extra = vary_names(captured.headers) - p.vary
        if extra and not (p.private and extra == {b"authorization"}):
            return None  # it varies on a header the key does not hold (or on '*')
        if len(captured.body) + _ENTRY_OVERHEAD > cache.max_entry_bytes:
            return None
        return encode(captured, p.ttl)

    async def mark_pass(self, cache: Cache, key: str) -> None:
        """Leave the not-cacheable marker under ``key`` (best effort)."""
        try:
            await cache.set(key, PASS, ttl=self.policy.pass_ttl)
        except ZealError as exc:
            STATS.failed(exc, "marking a response not cacheable")

    async def run(self, plan: Plan, produce: Produce) -> RawResponse | Passthrough:
        """Answer ``plan``: from the cache, by running ``produce`` once for every request that
        waits on the same key, or (not cacheable) with the handler's own response."""
        cache = self.cache()
        ran: list[Any] = []

        async def compute() -> bytes:
            try:
                captured, original = await produce()
            except Exception as exc:
                ran.append(exc)
                await self.mark_pass(cache, plan.key)
                raise
            ran.append((captured, original))
            blob = None if captured is None else self.storable(captured, cache)
            if blob is None:
                await self.mark_pass(cache, plan.key)
                raise _Uncacheable
            return blob

        try:
            value = await cache.get_or_compute(plan.key, compute, ttl=self.policy.ttl)
        except _Uncacheable:
            STATS.incr("uncacheable")
            return Passthrough(*ran[0])
        except Exception as exc:
            if ran and ran[0] is exc:
                raise  # the handler's own exception
            STATS.failed(exc, "looking up or storing a response")
            if ran:
                return Passthrough(*ran[0])
            return Passthrough(*await produce())
        entry = _entry(plan.key, value) if type(value) is bytes and value != PASS else None
        if entry is None:  # the marker (or bytes of no entry we know): run the handler
            return await self._pass(cache, plan, produce)
        if ran:
            STATS.incr("misses")
            return self.answer(plan, entry, hit=False, original=ran[0][1])
        STATS.incr("hits")
        return self.answer(plan, entry, hit=True, original=None)

    async def _pass(self, cache: Cache, plan: Plan, produce: Produce) -> RawResponse | Passthrough:
        """Under a not-cacheable marker: run the handler; store its response if it can be."""
        STATS.incr("passes")
        captured, original = await produce()
        blob = None if captured is None else self.storable(captured, cache)
        if blob is None:
            return Passthrough(captured, original)
        try:
            await cache.set(plan.key, blob, ttl=self.policy.ttl)
        except ZealError as exc:
            STATS.failed(exc, "storing a response")
        entry = decode(blob)
        assert entry is not None  # just encoded
        return self.answer(plan, entry, hit=False, original=original)

    def answer(self, plan: Plan, entry: Entry, *, hit: bool, original: Any) -> RawResponse:
        """The response to ``plan`` from a stored entry (a 304 when ``If-None-Match`` matches)."""
        age = max(0, int(time.time() - entry.created)) if hit else None
        p = self.policy
        inm = plan.parts.if_none_match
        background = getattr(original, "background", None)
        full = inm is None or not 200 <= entry.status < 300 or not etag_matches(inm, entry.etag)
        kept = self._answers.get(plan.key)
        if kept is not None and kept[0] is entry and kept[1] == age and kept[2] == full:
            headers = kept[3]
        else:
            headers = answer_headers(entry, p.cache_control, p.vary_header, age, full=full)
            if len(self._answers) >= _MEMO_ROWS:
                self._answers.clear()
            self._answers[plan.key] = (entry, age, full, headers)
        # a copy: middleware outside may append to an answer's header list in place
        if not full:
            STATS.incr("not_modified")
            return RawResponse(304, list(headers), b"", background)
        return RawResponse(entry.status, list(headers), entry.body, background)


def _key(
    path: str, query: bytes, varied: tuple[bytes, ...], auth: bytes | None, tokens: list[int]
) -> str:
    """The cache key of a request: its path, sorted query, varied headers, credential (when
    private) and the current tokens of its path and tags."""
    h = hashlib.blake2b(digest_size=16)
    h.update(path.encode("utf-8", "surrogateescape") + b"\0")
    if query:
        h.update(b"&".join(sorted(query.split(b"&"))))
    h.update(b"\0")
    if varied:
        h.update(b"\0".join(varied))
    if auth is not None:
        h.update(b"\0a" + hashlib.blake2b(auth).digest())
    for token in tokens:
        h.update(_TOKENS.pack(token))
    return "rc:" + h.hexdigest()


def _static(tags: tuple[str, ...]) -> bool:
    return all("{" not in t for t in tags)


def _format(tag: str, fields: Mapping[str, Any]) -> str:
    try:
        return tag.format_map(fields)
    except (KeyError, IndexError, ValueError) as exc:
        raise ConfigError(
            f"response cache: cannot fill tag {tag!r} from the request: {exc}"
        ) from exc
