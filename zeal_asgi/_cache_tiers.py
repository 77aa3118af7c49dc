"""The cache's two tiers and the rules that keep them coherent.

On the table backend the memory tier is host-local, so every entry is also written to the file
tier: a memory miss reads the file, which is how values survive a server restart and how a full
table or an oversize value spills.  On the shared backends (redis, tiered, memcached) the memory
row is the authority for every host: an oversize value lives in this host's file tier behind a
pointer row that carries the file's nonce, and a missing row is a miss, so a host's stale or
deleted file is never served after another host changed the key.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ._cache_entry import INLINE, POINTER, RowCodec, memory_key
from ._cache_keys import SHARED_UNAUTHENTICATED, CacheKeys
from ._cache_lock import CasLock, Lock, RedisLock, ShmLock
from .errors import CapacityError, SerializationError, TableFullError, UnsupportedOperationError
from .filetier import FileTier, Owned
from .serializer import PICKLE_ID, Serializer
from .store import EvalCapable, Store, StoreBackend, StoreBackendKind

__all__ = ["Binding", "Tiers"]

_LOCK_ROWS = 4096
_SPILL_ERRORS = (TableFullError, CapacityError)
_ZERO_NONCE = b"\0" * 16


@dataclass(frozen=True)
class Binding:
    """What the cache uses on the Store it currently follows."""

    store: Store
    backend: StoreBackend
    local: bool
    codec: RowCodec
    lock: Lock


@dataclass
class Tiers:
    """Memory-tier rows in a Store table plus the file tier, for one cache."""

    namespace: str
    max_rows: int
    memory_value_bytes: int
    ttl_seconds: float | None
    lock_lease: float
    keys: CacheKeys
    files: FileTier
    serializer: Serializer
    store_ref: Callable[[], Store]
    count: Callable[[str], None]
    binding: Binding | None = None

    @property
    def table(self) -> str:
        """Name of the memory-tier table."""
        return f"__{self.namespace}"

    def bind(self) -> Binding:
        """The binding to the current Store and backend (declaring the tables when new)."""
        store = self.store_ref()
        b = self.binding
        if b is not None and b.store is store and b.backend is store.backend:
            return b
        local = store.kind is StoreBackendKind.TABLE
        lock_table = f"__{self.namespace}_lock"
        if self.table not in store.names():
            ttl = self.ttl_seconds
            server_side = ttl is not None and not local
            store.make(
                self.table,
                self.max_rows,
                {
                    "v": (Store.TYPE_BYTES, max(self.memory_value_bytes + 2, 17)),
                    "exp": (Store.TYPE_FLOAT,),
                    "m": (Store.TYPE_BYTES, 16),
                },
                mode="ttl" if server_side else "tracked",
                ttl=max(1, round(ttl)) if server_side and ttl is not None else None,
            )
            store.make(lock_table, _LOCK_ROWS, {"owner": (Store.TYPE_INT, 8)})
        lock: Lock
        if local:
            lock = ShmLock(store.table(lock_table), self.lock_lease)
        elif isinstance(store.backend, EvalCapable):
            lock = RedisLock(store, self.namespace, self.lock_lease)
        else:
            lock = CasLock(store, lock_table, self.lock_lease)
        # Hosts sharing a backend must agree on the memory key: without a secret they use a
        # public one (damage detection only; pickle always has a secret).
        key = self.keys.memory_mac if local or self.keys.persistent else SHARED_UNAUTHENTICATED
        codec = RowCodec(key, hmac_sha256=self.serializer.id == PICKLE_ID)
        b = self.binding = Binding(store, store.backend, local, codec, lock)
        return b

    # -- reads ---------------------------------------------------------------------------------

    def _decode(self, serializer: int, payload: bytes) -> tuple[bool, Any]:
        if serializer != self.serializer.id:
            self.count("serializer_mismatch")  # e.g. a pickle entry read by a JSON cache
            return False, None
        try:
            return True, self.serializer.loads(payload)
        except SerializationError:
            self.count("decode_errors")
            return False, None

    def _from_file(self, key: bytes, nonce: bytes | None, now: float) -> tuple[bool, Any]:
        entry = self.files.read(key, now)
        if entry is None or (nonce is not None and entry.nonce != nonce):
            return False, None
        found = self._decode(entry.serializer, entry.payload)
        if not found[0]:
            self.files.discard(key, "undecodable")
        return found

    async def lookup(self, key: bytes) -> tuple[bool, Any, str]:
        """``(found, value, event)``; every byte used was authenticated first."""
        b = self.bind()
        mk, raw = memory_key(key)
        now = time.time()
        row = await b.store.get_strict(self.table, mk)
        if row is not None:
            opened = b.codec.open(raw, row)
            if opened is None:
                self.count("memory_corrupt")
                await b.store.delete(self.table, mk)
            else:
                kind, exp, rest = opened
                if exp and exp <= now:
                    self.count("memory_expired")
                    await b.store.delete(self.table, mk)
                elif kind == INLINE:
                    found = self._decode(rest[0], rest[1:])
                    if found[0]:
                        return True, found[1], "hits_memory"
                    await b.store.delete(self.table, mk)
                else:
                    found = self._from_file(key, rest, now)
                    if found[0]:
                        return True, found[1], "hits_file"
                    if b.local:
                        await b.store.delete(self.table, mk)  # stale pointer: the file decides
            if not b.local:
                return False, None, "misses"
        elif not b.local:
            return False, None, "misses"
        found = self._from_file(key, None, now)
        return found[0], found[1], "hits_file" if found[0] else "misses"

    # -- writes --------------------------------------------------------------------------------

    async def put(self, key: bytes, payload: bytes, seconds: float) -> bool:
        """Store a serialized value in the right tier(s); ``False`` when nothing was stored."""
        b = self.bind()
        now = time.time()
        exp = now + seconds if seconds else 0.0
        mexp = exp
        if self.ttl_seconds:  # enforced by our expiry check too (a tiered L1 may lag the server)
            mexp = min(exp or float("inf"), now + self.ttl_seconds)
        mk, raw = memory_key(key)
        ser = self.serializer.id
        if len(payload) <= self.memory_value_bytes:
            try:
                await b.store.set(self.table, mk, b.codec.inline(raw, mexp, ser, payload))
            except _SPILL_ERRORS:
                self.count("spills_full")
            else:
                # On the table backend the file is the copy served after a restart; if it cannot
                # be written, an older file of this key must not be served later instead.
                if not b.local or not self.files.write(key, ser, exp, payload, _ZERO_NONCE):
                    self.files.delete(key)
                return True
        else:
            self.count("spills_oversize")
        nonce = secrets.token_bytes(16)
        if not self.files.write(key, ser, exp, payload, nonce):
            # nothing may keep serving an older value of this key
            await b.store.delete(self.table, mk)
            self.files.delete(key)
            return False
        try:
            await b.store.set(self.table, mk, b.codec.pointer(raw, mexp, nonce))
        except _SPILL_ERRORS:
            await b.store.delete(self.table, mk)
            return b.local  # the file alone serves it on the table backend
        return True

    async def delete(self, key: bytes) -> bool:
        """Remove ``key`` from both tiers; ``True`` if either held it."""
        b = self.bind()
        in_memory = await b.store.delete(self.table, memory_key(key)[0])
        return self.files.delete(key) or in_memory

    async def flush(self) -> None:
        """Empty the memory tier and this host's files."""
        await self.bind().store.clear(self.table)
        self.files.flush()

    async def live_rows(self) -> int:
        """Unexpired memory-tier rows."""
        b = self.bind()
        now = time.time()
        n = 0
        async for _, row in b.store.iterate(self.table):
            exp = row.get("exp")
            if not exp or exp > now:
                n += 1
        return n

    def sweep_locks(self) -> int:
        """Delete lock rows of dead owners (table backend; elsewhere locks expire by lease)."""
        lock = self.bind().lock
        return lock.sweep() if isinstance(lock, ShmLock) else 0

    async def drop_orphans(self, owned: list[Owned]) -> int:
        """Unlink files that no memory-tier row points to any more (shared backends: another
        host overwrote or deleted the key); how many."""
        b = self.bind()
        dropped = 0
        for i in range(0, len(owned), 256):
            chunk = owned[i : i + 256]
            keys = [memory_key(o.key) for o in chunk]
            rows = await b.store.mget(self.table, [mk for mk, _ in keys])
            for o, (_, raw), row in zip(chunk, keys, rows, strict=True):
                opened = b.codec.open(raw, row) if row is not None else None
                live = opened is not None and opened[0] == POINTER and opened[2] == o.nonce
                if not live and self.files.drop_if(o.name, o.ino, "orphan"):
                    dropped += 1
        return dropped

    async def sweep_memory(self, now: float) -> int:
        """Delete expired memory-tier rows; how many."""
        b = self.bind()
        expired: list[Any] = []
        try:
            async for mk, row in b.store.iterate(self.table):
                exp = row.get("exp")
                if exp and exp <= now:
                    expired.append(mk)
        except UnsupportedOperationError:
            return 0  # a backend that cannot iterate expires its rows itself (memcached)
        for mk in expired:
            await b.store.delete(self.table, mk)
        return len(expired)
