"""The cache's two tiers and the rules that keep them coherent.

On the table backend the memory tier is host-local, so every entry is also written to the file
tier: a memory miss reads the file, which is how values survive a server restart and how a full
table or an oversize value spills.  On the shared backends (redis, tiered, memcached) the memory
row is the authority for every host: an oversize value lives in this host's file tier behind a
pointer row that carries the file's nonce, and a missing row is a miss, so a host's stale or
deleted file is never served after another host changed the key.

The table backend's side lives in :mod:`zeal_asgi.cache.local` (synchronous); this module keeps
the shared backends' side and the parts common to both (binding, sweeps, flush).
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from zeal_asgi.cache.entry import (
    HEAD,
    INLINE,
    LOCAL_KEY_BYTES,
    NONCE_END,
    POINTER,
    RowCodec,
    memory_key,
)
from zeal_asgi.cache.files.tier import FileTier, Owned
from zeal_asgi.cache.keys import SHARED_UNAUTHENTICATED, CacheKeys
from zeal_asgi.cache.local import SPILL_ERRORS, LocalTier, expiries, read_file
from zeal_asgi.cache.lock import CasLock, Lock, RedisLock, ShmLock
from zeal_asgi.cache.memo import DecodeMemo
from zeal_asgi.cache.serializer import PICKLE_ID, Serializer
from zeal_asgi.errors import SerializationError, UnsupportedOperationError
from zeal_asgi.store import Store, StoreBackend, StoreBackendKind

__all__ = ["Binding", "Tiers"]

_LOCK_ROWS = 4096


@dataclass(frozen=True)
class Binding:
    """What the cache uses on the Store it currently follows."""

    store: Store
    backend: StoreBackend
    codec: RowCodec
    lock: Lock
    local: LocalTier | None
    """The synchronous memory tier, on the table backend."""


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
    memo: DecodeMemo = field(init=False)

    def __post_init__(self) -> None:
        self.memo = DecodeMemo(self.serializer)

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
                    "v": (Store.TYPE_BYTES, max(self.memory_value_bytes, 16) + HEAD.size),
                    "exp": (Store.TYPE_FLOAT,),
                    "m": (Store.TYPE_BYTES, 16),
                },
                mode="ttl" if server_side else "tracked",
                ttl=max(1, round(ttl)) if server_side and ttl is not None else None,
                key_size=LOCAL_KEY_BYTES,
                binary_keys=True,
            )
            store.make(lock_table, _LOCK_ROWS, {"owner": (Store.TYPE_INT, 8)})
        lock: Lock
        if local:
            lock = ShmLock(store.table(lock_table), self.lock_lease)
        elif store.backend.redis_link() is not None:
            lock = RedisLock(store, self.namespace, self.lock_lease)
        else:
            lock = CasLock(store, lock_table, self.lock_lease)
        pickle = self.serializer.id == PICKLE_ID
        if local:
            # A private shared-memory segment: a MAC only where a load may run code (pickle).
            codec = RowCodec(self.keys.memory_mac if pickle else None, hmac_sha256=pickle)
        else:
            # Hosts sharing a backend must agree on the memory key: without a secret they use a
            # public one (damage detection only; pickle always has a secret).
            key = self.keys.memory_mac if self.keys.persistent else SHARED_UNAUTHENTICATED
            codec = RowCodec(key, hmac_sha256=pickle)
        tier = (
            LocalTier(
                store.table(self.table),
                codec,
                self.files,
                self.memo,
                self.serializer.id,
                self.memory_value_bytes,
                self.ttl_seconds,
                self.count,
            )
            if local
            else None
        )
        self.memo.clear()  # another store: nothing kept so far describes its rows
        b = self.binding = Binding(store, store.backend, codec, lock, tier)
        return b

    # -- reads ---------------------------------------------------------------------------------

    def _from_file(self, key: bytes, nonce: bytes | None, now: float) -> tuple[bool, Any]:
        return read_file(self.files, self.memo, self.serializer.id, self.count, key, nonce, now)

    async def lookup(self, key: bytes) -> tuple[bool, Any, str]:
        """``(found, value, event)``; every byte used was authenticated (or, on the table
        backend in JSON mode, shape-checked) first."""
        b = self.bind()
        if b.local is not None:
            return b.local.lookup(key)
        mk, raw = memory_key(key)
        now = time.time()
        row = await b.store.get_strict(self.table, mk)
        if row is None:
            return False, None, "misses"  # the row is the authority for every host
        v = b.codec.check(raw, row)
        if v is None:
            self.count("memory_corrupt")
        else:
            kind, ser, exp = HEAD.unpack_from(v)
            if exp and exp <= now:
                self.count("memory_expired")
            elif kind == INLINE:
                if ser == self.serializer.id:
                    try:
                        return True, self.memo.loads(mk, v, HEAD.size), "hits_memory"
                    except SerializationError:
                        self.count("decode_errors")
                else:
                    self.count("serializer_mismatch")
            else:
                found = self._from_file(key, v[HEAD.size : NONCE_END], now)
                if found[0]:
                    return True, found[1], "hits_file"
                return False, None, "misses"  # another host's value: not ours to delete
        await b.store.delete(self.table, mk)
        return False, None, "misses"

    # -- writes --------------------------------------------------------------------------------

    async def put(self, key: bytes, payload: bytes, seconds: float) -> bool:
        """Store a serialized value in the right tier(s); ``False`` when nothing was stored."""
        b = self.bind()
        if b.local is not None:
            return b.local.put(key, payload, seconds)
        # the memory expiry is checked by lookup too (a tiered L1 may lag the server's TTL)
        exp, mexp = expiries(seconds, self.ttl_seconds)
        mk, raw = memory_key(key)
        ser = self.serializer.id
        if len(payload) <= self.memory_value_bytes:
            try:
                await b.store.set(self.table, mk, b.codec.inline(raw, mexp, ser, payload))
            except SPILL_ERRORS:
                self.count("spills_full")
            else:
                self.files.delete(key)  # the row is the authority: no file copy to go stale
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
        except SPILL_ERRORS:
            await b.store.delete(self.table, mk)
            return False
        return True

    async def delete(self, key: bytes) -> bool:
        """Remove ``key`` from both tiers; ``True`` if either held it."""
        b = self.bind()
        if b.local is not None:
            return b.local.delete(key)
        in_memory = await b.store.delete(self.table, memory_key(key)[0])
        return self.files.delete(key) or in_memory

    async def flush(self) -> None:
        """Empty the memory tier and this host's files."""
        await self.bind().store.clear(self.table)
        self.memo.clear()
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
                v = b.codec.check(raw, row) if row is not None else None
                live = v is not None and v[0] == POINTER and v[HEAD.size : NONCE_END] == o.nonce
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
