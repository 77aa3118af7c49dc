"""Invalidation tokens: the tag index of the response cache, one row per path and per tag.

Every path and every tag in use has a random token in a small Store table beside the cache's
own (``__<namespace>_response_tags``; ``..._ttl`` off the table backend), and the cache key of a
response is a hash of the request *and the current tokens of its path and tags*.  ``invalidate``
deletes token rows; the next request of any worker or node (they all read the same table) finds
the row missing, makes a new random token and so looks under a new key: a miss.  The old entries
are never read again and expire with their TTL.

Why this is safe whatever is lost: a missing token is never read as "not invalidated"; it is
replaced by a fresh random one (compare-and-set from 0, so concurrent requests agree on one).
A token row that expires, is evicted, or is lost with a restarted server only costs a miss, and
an entry can never come back after its tag was invalidated.  When the table is full it is
cleared, which is a miss for every key (logged, and counted as ``token_resets``).

One Store row per path or tag, one read per request (one round trip on Redis); nothing is kept
per worker, so an invalidation is seen by the very next request everywhere.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
import weakref
from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from zeal_asgi.errors import InvalidKeyError, KeyTypeError, TableFullError
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Store, StoreBackendKind

if TYPE_CHECKING:
    from zeal_asgi.cache import Cache
    from zeal_asgi.shm import Table

log = logging.getLogger("zeal_asgi.response_cache")

TOKEN_TTL = 86400
"""Seconds a token row lives on Redis and memcached: then one miss makes a new one."""
_KEY_BYTES = 64
_INLINE = _KEY_BYTES - 1
_MIN_ROWS = 4096


def _row_key(kind: str, name: str) -> str:
    raw = kind + name
    if len(raw) <= _INLINE and raw.isascii():
        return raw
    # long or non-ASCII names: a fixed-size digest (the '#' kind never collides with p/t)
    return "#" + hashlib.blake2b(raw.encode("utf-8", "surrogatepass"), digest_size=24).hexdigest()


def path_name(path: str) -> str:
    """Row key of a path's token."""
    return _row_key("p", path)


def tag_name(tag: str) -> str:
    """Row key of a tag's token."""
    return _row_key("t", tag)


class Tokens:
    """The token table of one Cache, declared on whatever Store the cache follows.

    On the table backend it is a tracked table (a shared-memory row read without a coroutine
    in between) whose size is bounded by clearing it when full; elsewhere a TTL table whose rows
    the server expires (``TOKEN_TTL``), since Redis has no row limit and memcached evicts anyway.
    """

    def __init__(self, cache: Cache) -> None:
        self.cache = cache
        self.max_rows = max(_MIN_ROWS, 4 * cache.max_rows)
        self.table = ""
        self._bound: tuple[Store, Any] | None = None
        self._local: Table | None = None
        """The token table itself on the table backend: read without a coroutine."""

    def store(self) -> Store:
        """The cache's Store, with the token table declared on its current backend."""
        store = self.cache.store
        bound = self._bound
        if bound is None or bound[0] is not store or bound[1] is not store.backend:
            local = store.kind is StoreBackendKind.TABLE
            # one name per mode: a Store keeps a table's declaration across a backend switch
            self.table = f"__{self.cache.namespace}_response_tags" + ("" if local else "_ttl")
            store.make(
                self.table,
                self.max_rows,
                {"v": (Store.TYPE_INT, 8)},
                mode="tracked" if local else "ttl",
                ttl=None if local else TOKEN_TTL,
                key_size=_KEY_BYTES,
            )
            self._local = store.table(self.table) if local else None
            self._bound = (store, store.backend)
        return store

    async def current(self, names: Sequence[str]) -> list[int] | None:
        """The token of each row key (made when missing); ``None`` if the table stayed full."""
        store = self.store()
        local = self._local
        if len(names) == 1:  # the usual case (a path, no tags): one read
            name = names[0]
            if local is not None:
                v = local.get(name, "v")
            else:  # the whole row: one plain command (one field would take a script)
                row = await store.get_strict(self.table, name)
                v = None if row is None else row["v"]
            if v:
                return [int(v)]
            out = [0]
        elif local is not None:
            out = [local.get(name, "v") or 0 for name in names]
        else:
            rows = await store.mget(self.table, names)
            out = [0 if row is None else int(row["v"]) for row in rows]
        for i, token in enumerate(out):
            if not token:
                made = await self._make(store, names[i])
                if made is None:
                    return None
                out[i] = made
        return out

    async def _make(self, store: Store, name: str) -> int | None:
        for attempt in (1, 2):
            token = secrets.randbits(62) + 1
            try:
                if await store.compare_and_set(self.table, name, "v", 0, token):
                    return token
            except TableFullError:
                if attempt == 2:
                    return None
                await self._reset(store)
                continue
            row = await store.get_strict(self.table, name)
            if row is not None and row["v"]:
                return int(row["v"])  # another request made it first: use that one
        return None

    async def _reset(self, store: Store) -> None:
        # Clearing every token is a miss for every key: safe, never a stale answer.
        host_stats().incr("response_cache_token_resets")
        log.warning(
            "response cache: the token table %r is full (%d rows); cleared it, every cached "
            "response is a miss once (raise the Cache's max_rows to avoid this)",
            self.table,
            self.max_rows,
        )
        await store.clear(self.table)

    async def drop(self, names: Iterable[str]) -> int:
        """Delete the rows of ``names``; how many existed."""
        store = self.store()
        dropped = 0
        for name in names:
            if await store.delete(self.table, name):
                dropped += 1
        return dropped


_TOKENS: weakref.WeakKeyDictionary[Cache, Tokens] = weakref.WeakKeyDictionary()


def tokens_of(cache: Cache) -> Tokens:
    """The token table of ``cache`` (one per Cache object)."""
    t = _TOKENS.get(cache)
    if t is None:
        t = _TOKENS[cache] = Tokens(cache)
    return t


def check_names(values: object, what: str) -> list[str]:
    """``tags`` / ``paths`` of ``invalidate``: a list of non-empty str (a bare str is refused:
    it would be taken letter by letter)."""
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable):
        raise KeyTypeError(f"invalidate({what}=...) takes a list of str, got {values!r:.80}")
    out = []
    for v in values:
        if not isinstance(v, str):
            raise KeyTypeError(f"invalidate({what}=...): every entry must be a str, got {v!r:.80}")
        if not v:
            raise InvalidKeyError(f"invalidate({what}=...): an empty {what[:-1]} names nothing")
        if what == "paths" and not v.startswith("/"):
            raise InvalidKeyError(f"invalidate(paths=...): {v!r:.80} is not a path (no leading /)")
        out.append(v)
    return out
