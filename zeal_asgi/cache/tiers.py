"""The cache's tier engine: memory-tier rows in a Store table, the file tier beside them, and the
rules that keep the two coherent, written once for every backend.

Where the memory tier is this host's own (the table backend), the file tier mirrors it: every
entry is also written to a file, a memory miss reads the file, and that is how values survive a
server restart and how a full table or an oversize value spills.  A write holds the key's
host-wide write lock around the row and the file, so concurrent writers of one key leave both
tiers with the same value: the last writer's.

Where the memory tier is shared by hosts (redis, tiered, memcached), the row is the authority for
every host: an oversize value lives in this host's file tier behind a pointer row that carries
the file's nonce, and a missing row is a miss, so a host's stale or deleted file is never served
after another host changed the key.

On the table backend the engine calls the shared table directly: :meth:`Tiers.get_local`
answers a read synchronously, so nothing awaits between ``Cache.get`` and the row.  A repeated
hit there is cheaper still (:attr:`Tiers.hot`): once a row was read, checked and decoded
the usual way, the worker keeps its exact bytes, expiry and decoded value by key (a compiled
``FieldMemo``), and the next read of that key only checks, in place, that the row still holds
those very bytes (without copying the ~8 KiB row) and that they have not expired.  In pickle
mode those are bytes whose MAC checked out (the same bytes under the same key and MAC key check
out again), and nothing is loaded: the value is a copy of the one decoded then.

A memory-tier row has one column, ``v`` = ``head ‖ mac ‖ body``.  ``head`` packs the row kind,
the serializer id and the expiry; ``body`` is the serialized value (``INLINE``) or the 16-byte
nonce of the file-tier entry holding it (``POINTER``).

Where rows are authenticated, ``mac`` is 16 bytes of a keyed BLAKE2b (HMAC-SHA256 in pickle mode,
where what is loaded may run code) over the row key, ``head`` and ``body``, checked before the
body is used:

* on the shared backends (redis, tiered, memcached), where other hosts write the rows;
* on the table backend in pickle mode.

On the table backend with the JSON serializer rows carry no MAC (``mac`` is empty).  The memory
tier is then a shared-memory segment of this server, mode 0600: only the server's own user (or
root) can write it, and that user can also read the MAC key (it lives in the same process memory,
or in a segment beside it when no secret is configured), attach a debugger to the workers or
rewrite the application, so a MAC there would detect nothing it could not forge.  What can reach
the segment by accident is ruled out by the table itself (no torn reads, typed writes), and the
JSON serializer runs no code whatever the bytes (beyond the validators of pydantic models the
application already imported, as for any JSON it receives).  Rows are still checked for shape (a
bad head, kind or length is counted as ``memory_corrupt`` and dropped), and decoding errors are
misses, never errors.  The file tier is different: its directory outlives the server and may be
restored, copied or shared, so every file keeps its HMAC-SHA256 (reliability §3).

Row keys: on shared backends ``blake2b(key)`` as 32 hex chars; on the table backend the key
itself when it is shorter than ``LOCAL_KEY_BYTES`` (no hashing on the hot path), else a 64-byte
BLAKE2b of it, a length no direct key has, so the two kinds never collide.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import inspect
import math
import os
import random
import secrets
import struct
import time
import weakref
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zeal_asgi.cache.files.tier import Entry, FileTier, Owned
from zeal_asgi.cache.keys import SHARED_UNAUTHENTICATED, CacheKeys
from zeal_asgi.cache.lock import NO_LOCK, Lock, ShmLock, lock_for
from zeal_asgi.cache.memo import DecodeMemo
from zeal_asgi.cache.serializer import PICKLE_ID
from zeal_asgi.errors import (
    CapacityError,
    InvalidKeyError,
    InvalidTTLError,
    KeyTooLongError,
    KeyTypeError,
    LockTimeoutError,
    SerializationError,
    TableFullError,
    ValueTooLargeError,
)
from zeal_asgi.shm.ext import FieldMemo, Tally
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Capability, Key, Store, StoreBackend, StoreBackendKind
from zeal_asgi.store.base import seconds

if TYPE_CHECKING:
    from zeal_asgi.cache.facade import Cache
    from zeal_asgi.shm import Table

MAX_KEY_BYTES = 4096
MAX_TTL = 10 * 365 * 86400
"""Ten years: a longer TTL is a unit mistake (milliseconds?), refused rather than stored."""

INLINE = 1
POINTER = 2
HEAD = struct.Struct("<BBd")
"""Head of ``v``: kind, serializer id (0 in a pointer), expires_at (0.0 = never)."""
LOCAL_KEY_BYTES = 64
"""Row keys of the table backend are at most this long (the table's default key limit)."""
MAC_BYTES = 16
NONCE_BYTES = 16

Mac = Callable[[bytes], bytes]
"""A row MAC: 16 bytes over the given bytes."""
StoreRef = Callable[[], Store]
"""The Store a cache follows now (its own, its app's, or the default)."""
HOT_ENTRIES = 4096
"""Most rows kept in :attr:`Tiers.hot` (it starts over when full, or when the bytes it added
reach the memo's ``max_bytes``; they are mostly the memo's own objects)."""
_HEAD = HEAD.size
_unpack_head = HEAD.unpack_from
_time = time.time


def _bytes(key: str | bytes) -> bytes:
    return key.encode() if isinstance(key, str) else key


def check_key(key: object) -> bytes:
    """The bytes of a valid cache key (``str`` as UTF-8, or ``bytes``), or a typed error."""
    if isinstance(key, str):
        try:
            raw = key.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise InvalidKeyError(
                f"cache key {key[:40]!r} is not encodable as UTF-8 (lone surrogate?)"
            ) from exc
    elif isinstance(key, bytes):
        raw = key
    else:
        raise KeyTypeError(f"cache keys are str or bytes, got {type(key).__name__}")
    if not raw:
        raise InvalidKeyError("empty cache key")
    if len(raw) > MAX_KEY_BYTES:
        raise KeyTooLongError(
            f"cache key of {len(raw)} bytes exceeds the limit of {MAX_KEY_BYTES} bytes "
            "(never truncated)"
        )
    return raw


def check_ttl(ttl: object, what: str = "ttl") -> float:
    """``ttl`` as float seconds (0 = no expiry), or InvalidTTLError naming the limit."""
    return seconds(what, ttl, MAX_TTL, zero=True, error=InvalidTTLError)


def memory_key(key: bytes) -> str:
    """Row key of a cache key on shared backends, and name of its locks: 32 hex chars."""
    return hashlib.blake2b(key, digest_size=16, person=b"zeal-cache-key").hexdigest()


def local_key(key: bytes) -> bytes:
    """Row key of a cache key on the table backend: itself if shorter than 64 bytes."""
    if len(key) < LOCAL_KEY_BYTES:
        return key
    return hashlib.blake2b(key, digest_size=LOCAL_KEY_BYTES, person=b"zeal-cache-key").digest()


def row_mac(key: bytes, hmac_sha256: bool) -> Mac:
    """The MAC of rows under ``key``: keyed BLAKE2b (a MAC by design, twice as fast as
    HMAC-SHA256 on short rows), or HMAC-SHA256 truncated to the same 16 bytes (pickle mode)."""
    if hmac_sha256:
        return lambda data: hmac.digest(key, data, "sha256")[:MAC_BYTES]
    return lambda data: hashlib.blake2b(data, key=key, digest_size=MAC_BYTES).digest()


def seal(mac: Mac | None, rk: Key, kind: int, serializer: int, exp: float, body: bytes) -> bytes:
    """The ``v`` of a row at ``rk``: an ``INLINE`` value or a ``POINTER`` nonce."""
    head = HEAD.pack(kind, serializer, exp)
    return head + (mac(_bytes(rk) + head + body) if mac else b"") + body


def unseal(mac: Mac, rk: Key, v: bytes) -> int:
    """Where the body of ``v`` starts if ``v`` has a head and an authentic MAC; -1 otherwise."""
    start = _HEAD + MAC_BYTES
    if len(v) < start:
        return -1
    authentic = hmac.compare_digest(v[_HEAD:start], mac(_bytes(rk) + v[:_HEAD] + v[start:]))
    return start if authentic else -1


_LIVE: weakref.WeakSet[Tiers] = weakref.WeakSet()


def _after_fork() -> None:
    for tiers in list(_LIVE):
        tiers.hit_tally = None  # a tally adds to its pid's row: the child counts in its own
        tiers.hot.clear()  # (each holds the tally)


os.register_at_fork(after_in_child=_after_fork)

SPILL_ERRORS = (TableFullError, CapacityError)
"""What a memory-tier write raises when the value must spill to the file tier instead."""
ZERO_NONCE = b"\0" * 16
"""Nonce of the file copy of an inline row (no pointer row names it)."""
_WRITE = b"w"
"""Prefix of a key's write lock: its row key (its stampede lock is a hex name)."""
_WRITE_LEASE = 2.0
"""A write holds its lock for microseconds (an fsync: milliseconds); a holder stalled longer
(stopped, swapped out) stops blocking the other writers of its key after this."""


async def _renew(lock: Lock, name: str, holder: list[Any], every: float) -> None:
    """Renew the stampede lock ``name`` every ``every`` seconds (``holder[0]``: its token)."""
    while True:
        await asyncio.sleep(every)
        token = await lock.renew(name, holder[0])
        if token is None:
            return  # lost it (our lease ran out while we were stalled): nothing to keep
        holder[0] = token


@dataclass(frozen=True)
class Binding:
    """What the cache uses on the Store it currently follows."""

    store: Store
    backend: StoreBackend
    lock: Lock
    """The stampede lock of ``get_or_compute``."""
    mac: Mac | None
    """The rows' MAC (``None``: shape checks only; see the module doc)."""
    table: Table | None = None
    """The rows' shared table on the table backend (host-local: the file tier mirrors it)."""
    writes: ShmLock | None = None
    """The write locks of the table backend (one per key, held around the row and the file)."""


class Tiers:
    """The memory tier (a Store table of the Store ``store_ref`` returns) and the file tier of
    ``cache``, whose settings (validated there) it reads; its events are counted in the host's
    counters as ``<metrics><event>``, ``metrics`` being ``cache.`` (``cache_<namespace>.`` for
    another namespace)."""

    def __init__(
        self, cache: Cache, keys: CacheKeys, cache_dir: str, fsync: bool, store_ref: StoreRef
    ) -> None:
        _LIVE.add(self)
        self.cache = cache
        self.keys = keys
        self.store_ref = store_ref
        ns = cache.namespace
        # counters map to zeal_cache_<what>_total (zeal_cache_<namespace>_... for another one)
        self.metrics = "cache." if ns == "cache" else f"cache_{ns}."
        self.files = FileTier(
            cache_dir,
            mac_key=keys.file_mac,
            name_key=keys.file_name,
            max_entry_bytes=cache.max_entry_bytes,
            max_key_bytes=MAX_KEY_BYTES,
            fsync=fsync,
            count=self.count,
        )
        self.table = f"__{ns}"
        self.binding: Binding | None = None
        self.memo = DecodeMemo(cache.serializer)
        self._loads = self.memo.loads  # bound once: every lookup shows on a 1.4 µs hit
        self._ser = cache.serializer.id
        self.hits_memory, self._hits_file, self._misses = (
            self.metrics + e for e in ("hits_memory", "hits_file", "misses")
        )
        self.hot: dict[str, FieldMemo] = {}
        """Rows of ``binding.table`` verified and decoded by this worker, by ``str`` key (table
        backend): ``hot[key].get(miss)`` is a copy of the value, counted as a memory hit, while
        the row holds the same bytes, unexpired.  Cleared when the binding changes."""
        self._hot_bytes = 0
        self.hot_backend: StoreBackend | None = None
        """The backend whose table :attr:`hot` describes (``binding.backend``)."""
        self.hit_tally: Tally | None = None
        """This worker's ``hits_memory`` counter (one lock-free add); made by :meth:`tally`."""

    def bind(self) -> Binding:
        """The binding to the current Store and backend (declaring the tables when new)."""
        store = self.store_ref()
        b = self.binding
        if b is not None and b.store is store and b.backend is store.backend:
            return b
        c = self.cache
        local = store.kind is StoreBackendKind.TABLE
        lock_table = f"{self.table}_lock"
        if self.table not in store.names():
            server_side = c.ttl_seconds is not None and not local
            body = HEAD.size + MAC_BYTES + max(c.memory_value_bytes, 16)
            store.make(
                self.table,
                c.max_rows,
                {"v": (Store.TYPE_BYTES, body)},
                mode="ttl" if server_side else "tracked",
                ttl=max(1, round(c.ttl_seconds or 0)) if server_side else None,
                key_size=LOCAL_KEY_BYTES,
                binary_keys=True,
            )
            store.make(
                lock_table,
                4096,
                {"owner": (Store.TYPE_INT, 8)},
                key_size=len(_WRITE) + LOCAL_KEY_BYTES,
                binary_keys=True,
            )
        pickle = self._ser == PICKLE_ID
        lock = lock_for(store, lock_table, c.namespace, c.lock_lease)
        self.memo.clear()  # another store: nothing kept so far describes its rows
        self.hot.clear()
        if local:
            # A private shared-memory segment: a MAC only where a load may run code (pickle).
            mac = row_mac(self.keys.memory_mac, True) if pickle else None
            writes = ShmLock(store.table(lock_table), _WRITE_LEASE)
            b = Binding(store, store.backend, lock, mac, store.table(self.table), writes)
        else:
            # Hosts sharing a backend must agree on the memory key: without a secret they use a
            # public one (damage detection only; pickle always has a secret).
            key = self.keys.memory_mac if self.keys.persistent else SHARED_UNAUTHENTICATED
            b = Binding(store, store.backend, lock, row_mac(key, pickle))
        self.binding = b
        self.hot_backend = b.backend
        return b

    def tally(self) -> Tally | None:
        """:attr:`hit_tally`, made now if need be; ``None`` when the counters are full."""
        if self.hit_tally is None:
            with contextlib.suppress(TableFullError):
                self.hit_tally = host_stats().tally(self.hits_memory)
        return self.hit_tally

    def count_hit(self) -> None:
        """Count a memory-tier hit (through :attr:`hit_tally`)."""
        tally = self.tally()
        if tally is None:
            host_stats().incr(self.hits_memory)  # it copes with a full table
        else:
            tally.add()

    def count(self, event: str) -> None:
        """Count ``event`` in this host's counters, under the cache's ``metrics`` prefix."""
        host_stats().incr(self.metrics + event)

    # -- reads ---------------------------------------------------------------------------------

    def get_local(
        self, table: Table, b: Binding, key: str | bytes, record: bool = True
    ) -> tuple[bool, Any]:
        """``(found, value)`` from ``b.table``, synchronously (validates ``key``)."""
        if type(key) is str and 0 < len(key) < LOCAL_KEY_BYTES and key.isascii():
            rk: str | bytes = key  # the same row as its UTF-8 bytes, without encoding it
        else:
            rk = local_key(check_key(key))
        found, value, drop = self._answer(b, key, rk, table.get(rk, "v"), record)
        if drop:
            table.delete(rk)
        return found, value

    async def lookup(self, key: str | bytes, record: bool = True) -> tuple[bool, Any]:
        """``(found, value)`` of a valid key; every byte used was authenticated (or, on the
        table backend in JSON mode, shape-checked) first.  ``record=False`` leaves the hit/miss
        counters alone.  (A str key's row is kept for the next hit on the table backend.)"""
        b = self.bind()
        if b.table is not None:
            return self.get_local(b.table, b, key, record)
        rk = memory_key(_bytes(key))
        v = await b.store.get_strict(self.table, rk, "v")
        found, value, drop = self._answer(b, key, rk, v, record)
        if drop:
            await self._delete_row(b, rk)
        return found, value

    def _answer(
        self, b: Binding, key: str | bytes, rk: Key, v: bytes | None, record: bool
    ) -> tuple[bool, Any, bool]:
        """``(found, value, drop the row)`` for ``key`` whose row holds ``v``; with ``record``,
        the hit or miss is counted."""
        now = _time()
        nonce = None
        drop = False
        if v is not None:
            start = unseal(b.mac, rk, v) if b.mac else (_HEAD if len(v) >= _HEAD else -1)
            problem = "memory_corrupt"
            if start >= 0:
                kind, ser, exp = _unpack_head(v)
                if exp and exp <= now:
                    problem = "memory_expired"
                elif kind == INLINE and ser == self._ser:
                    try:
                        value = self._loads(rk, v, start)
                    except SerializationError:
                        problem = "decode_errors"
                    else:
                        if b.table is not None and type(rk) is str:
                            self._keep(b.table, rk, v, start, exp)
                        if record:
                            self.count_hit()
                        return True, value, False
                elif kind == POINTER and len(v) == start + NONCE_BYTES:
                    problem, nonce = "", v[start:]
                elif kind == INLINE and ser:
                    problem = "serializer_mismatch"
            if problem:
                self.count(problem)
                drop = True
        found, value, drop = self._from_file(b, key, nonce, drop, now)
        if record:
            host_stats().incr(self._hits_file if found else self._misses)
        return found, value, drop

    def _keep(self, table: Table, rk: str, v: bytes, start: int, exp: float) -> None:
        """Keep the row just decoded in :attr:`hot` when the memo kept its value."""
        kept = self.memo.kept(rk, v, start)  # None: a value decoded every time (nested, large)
        tally = self.tally() if kept is not None else None
        if kept is None or tally is None:
            self.hot.pop(rk, None)
            return
        blob, copier = kept
        self._hot_bytes += len(blob)
        if len(self.hot) >= HOT_ENTRIES or self._hot_bytes > self.memo.max_bytes:
            self.hot.clear()
            self._hot_bytes = len(blob)
        self.hot[rk] = FieldMemo(table, rk, "v", blob, exp, copier, tally)

    def _from_file(
        self, b: Binding, key: str | bytes, nonce: bytes | None, drop: bool, now: float
    ) -> tuple[bool, Any, bool]:
        """The file tier's answer after the row's (``nonce``: the row points to a file)."""
        local = b.table is not None
        if nonce is None and not local:
            return False, None, drop  # the row is the authority for every host
        raw = key if type(key) is bytes else _bytes(key)
        entry = self.files.read(raw, now)
        if nonce is not None and (entry is None or entry.nonce != nonce):
            if not local:
                return False, None, False  # another host's value: not ours to drop
            drop = True  # a stale pointer: the file this host holds decides
        if entry is None:
            return False, None, drop
        found, value = self._use(raw, entry)
        return found, value, drop or (local and nonce is not None and not found)

    def _use(self, key: bytes, entry: Entry) -> tuple[bool, Any]:
        """``(True, value)`` of an authentic file entry; an unusable one is dropped."""
        if entry.serializer != self._ser:
            self.count("serializer_mismatch")  # e.g. a pickle entry read by a JSON cache
        else:
            try:
                return True, self.memo.loads((key, 0), entry.payload)
            except SerializationError:
                self.count("decode_errors")
        self.files.drop(self.files.name(key), None, "undecodable")
        return False, None

    # -- writes --------------------------------------------------------------------------------

    def encode(self, key: str | bytes, value: Any) -> bytes:
        """``value`` serialized (SerializationError if it cannot be), refused with
        ValueTooLargeError above ``max_entry_bytes`` (never truncated)."""
        payload = self.cache.serializer.dumps(value)
        limit = self.cache.max_entry_bytes
        if len(payload) > limit:
            raise ValueTooLargeError(
                f"cache value for {key!r:.60} is {len(payload)} bytes serialized; the limit is "
                f"max_entry_bytes={limit} (never truncated)"
            )
        return payload

    async def _set_row(self, b: Binding, rk: Key, v: bytes) -> None:
        """Write the row (TableFullError / CapacityError when it does not fit); the shared
        table directly on the table backend, without yielding."""
        if b.table is not None:
            b.table.set(rk, {"v": v})
        else:
            await b.store.set(self.table, rk, {"v": v})

    async def _delete_row(self, b: Binding, rk: Key) -> bool:
        """Remove the row; ``True`` if it existed."""
        return b.table.delete(rk) if b.table is not None else await b.store.delete(self.table, rk)

    async def _write(self, key: bytes, op: Callable[[Binding, Key], Awaitable[bool]]) -> bool:
        """``op(binding, row key)``, under the key's write lock on the table backend: another
        writer of the key never interleaves its row and file with these."""
        b = self.bind()
        if b.writes is None:
            return await op(b, memory_key(key))
        rk = local_key(key)
        name = _WRITE + rk
        token = b.writes.take(name) or await b.writes.hold(name)
        try:
            return await op(b, rk)
        finally:
            b.writes.give(name, token)

    async def put(self, key: bytes, payload: bytes, ttl: float) -> bool:
        """Store a serialized value in the right tier(s); ``False`` when nothing was stored."""
        return await self._write(key, lambda b, rk: self._put(b, key, rk, payload, ttl))

    async def _put(self, b: Binding, key: bytes, rk: Key, payload: bytes, ttl: float) -> bool:
        now = _time()
        exp = now + ttl if ttl else 0.0
        # the memory tier's own ttl_seconds may end the row before the file
        row_ttl = self.cache.ttl_seconds
        mexp = min(exp or math.inf, now + row_ttl) if row_ttl else exp
        if len(payload) <= self.cache.memory_value_bytes:
            try:
                await self._set_row(b, rk, seal(b.mac, rk, INLINE, self._ser, mexp, payload))
            except SPILL_ERRORS:
                self.count("spills_full")
            else:
                if b.table is None:
                    self.files.delete(key)  # the row is the authority: no file copy to go stale
                elif not self.files.write(key, self._ser, exp, payload, ZERO_NONCE):
                    self.files.delete(key)  # an older copy must not be served after a restart
                return True
        else:
            self.count("spills_oversize")
        nonce = secrets.token_bytes(16)
        if not self.files.write(key, self._ser, exp, payload, nonce):
            await self._delete_row(b, rk)  # nothing may keep serving an older value of this key
            self.files.delete(key)
            return False
        try:
            await self._set_row(b, rk, seal(b.mac, rk, POINTER, 0, mexp, nonce))
        except SPILL_ERRORS:
            await self._delete_row(b, rk)
            return b.table is not None  # on this host the file alone serves it
        return True

    async def delete(self, key: bytes) -> bool:
        """Remove ``key`` from both tiers; ``True`` if either held it."""

        async def remove(b: Binding, rk: Key) -> bool:
            in_memory = await self._delete_row(b, rk)
            return self.files.delete(key) or in_memory

        return await self._write(key, remove)

    async def compute(
        self, key: str | bytes, fn: Callable[[], Any | Awaitable[Any]], ttl: float, wait: float
    ) -> Any:
        """The cached value of ``key`` (valid: checked by the caller), computing it with ``fn``
        at most once at a time (``get_or_compute``).

        The first caller to take the key's stampede lock checks the cache again, runs ``fn``,
        stores the value and releases the lock; its lease is renewed while ``fn`` runs.  Every
        other caller polls the cache with a growing backoff (2 ms to 50 ms, jittered) and returns
        the value as soon as it appears; when the lock is free again without a value (``fn``
        raised, or the value could not be stored) the next caller computes.  A waiter gives up
        with LockTimeoutError after ``wait`` seconds.
        """
        found, value = await self.lookup(key)  # a str key's row is kept for the next hit
        if found:
            return value
        raw = _bytes(key)
        lock = self.bind().lock
        name = memory_key(raw)
        deadline = time.monotonic() + wait
        delay = 0.002
        while (token := await lock.acquire(name)) is None:
            left = deadline - time.monotonic()
            if left <= 0:
                self.count("compute_timeouts")
                raise LockTimeoutError(
                    f"get_or_compute({raw!r:.60}): another worker has been computing it for more "
                    f"than {wait} s (max_wait=)"
                )
            await asyncio.sleep(min(delay, left) * random.uniform(0.5, 1.0))
            delay = min(delay * 1.5, 0.05)
            found, value = await self.lookup(key, record=False)
            if found:
                self.count("stampede_blocked")
                return value
        holder = [token]
        renewer = None
        if token is NO_LOCK:
            self.count("lock_table_full")
        else:
            every = self.cache.lock_lease / 3
            renewer = asyncio.create_task(_renew(lock, name, holder, every))
        try:
            found, value = await self.lookup(key, record=False)
            if found:  # the previous holder stored it just before we took the lock
                self.count("stampede_blocked")  # another caller's computation served this one
                return value
            self.count("computations")
            result = fn()
            if inspect.isawaitable(result):
                result = await result
            await self.put(raw, self.encode(raw, result), ttl)
            return result
        finally:
            if renewer is not None:
                renewer.cancel()
                await asyncio.gather(renewer, return_exceptions=True)
            await lock.release(name, holder[0])

    async def flush(self) -> None:
        """Empty the memory tier and this host's files."""
        await self.bind().store.clear(self.table)
        self.memo.clear()
        self.hot.clear()
        self.files.flush()

    # -- counts and sweeps ---------------------------------------------------------------------

    async def _rows(self, now: float) -> tuple[int, list[Key]]:
        """How many rows are live at ``now``, and the keys of the expired ones."""
        live = 0
        expired: list[Key] = []
        async for rk, row in self.bind().store.iterate(self.table):
            v = row["v"]
            if len(v) >= _HEAD and 0 < _unpack_head(v)[2] <= now:
                expired.append(rk)
            else:
                live += 1
        return live, expired

    async def live_rows(self) -> int:
        """Unexpired memory-tier rows."""
        return (await self._rows(_time()))[0]

    async def sweep(self, max_files: int) -> dict[str, int]:
        """One GC pass: expired memory rows, dead lock rows, then (in a thread) expired and
        damaged files and, on shared backends, files no row points to any more."""
        now = _time()
        b = self.bind()
        expired: list[Key] = []
        if Capability.LISTING in b.backend.capabilities:  # memcached expires rows itself
            expired = (await self._rows(now))[1]
        for rk in expired:
            await self._delete_row(b, rk)
        owners: list[Owned] | None = None if b.table is not None else []
        out = await asyncio.to_thread(self.files.sweep, now, max_files, owners)
        out["orphans"] = await self._drop_orphans(b, owners) if owners else 0
        out["memory_expired"] = len(expired)
        out["dead_locks"] = b.lock.sweep() if isinstance(b.lock, ShmLock) else 0  # others expire
        return out

    async def _drop_orphans(self, b: Binding, owned: list[Owned]) -> int:
        """Unlink files that no row points to any more (another host overwrote or deleted the
        key); how many."""
        dropped = 0
        for i in range(0, len(owned), 256):
            chunk = owned[i : i + 256]
            rks = [memory_key(o.key) for o in chunk]
            for o, rk, row in zip(chunk, rks, await b.store.mget(self.table, rks), strict=True):
                v = b"" if row is None else row["v"]
                start = unseal(b.mac, rk, v) if b.mac else -1  # shared rows always have one
                live = start >= 0 and v[0] == POINTER and v[start:] == o.nonce
                if not live and self.files.drop(o.name, o.ino, "orphan"):
                    dropped += 1
        return dropped
