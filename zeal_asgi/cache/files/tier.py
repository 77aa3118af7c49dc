"""The cache's file tier: one authenticated file per key, written atomically, under a checked dir.

Layout of an entry file (little-endian)::

    magic "ZC\\x01\\x00" | version u16 | serializer u8 | flags u8 | key id u32 |
    created_at f64 | expires_at f64 (0 = never) | nonce 16 B | key_len u32 | payload_len u64 |
    HMAC-SHA256 32 B | key bytes | payload

The HMAC covers the header, the original key and the payload, and is checked before anything is
decoded; the stored key is compared with the requested one (a file copied under another name is
refused).  File names are a keyed BLAKE2b of the key, so keys never become paths.  Writes go to
``.tmp.<pid>.<hex>`` and are renamed over the entry, so a reader sees the old file or the new
one, never a mix.  Torn, zeroed, forged, swapped or expired files are misses: they are unlinked
and counted by reason, never raised to the caller.  I/O errors (a full disk) make a write return
``False`` and are logged at most once a minute.

Every read opens and reads the file.  A worker keeps the bytes of the files it verified (bounded:
``VERIFIED_BYTES``); a file whose bytes are *identical* to verified ones is authentic without
computing the HMAC again (on 10 KiB, a 0.3 µs compare instead of a 7 µs HMAC-SHA256), and since
its size is then known, the ``fstat`` is skipped too.  Any other file, a changed byte included,
takes the full path: ``fstat`` (regular, ours, size limits), read, header checks, HMAC.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import secrets
import stat
import threading
import time
import weakref
from collections.abc import Callable
from typing import NamedTuple

from zeal_asgi.cache.files.directory import open_cache_dir, remove_stale_temp, scan
from zeal_asgi.cache.files.format import (
    HEAD_LEN,
    HEADER,
    MAGIC,
    NAME_RE,
    READ_FLAGS,
    VERSION,
    check_head,
)
from zeal_asgi.cache.files.sweep import FileSweep, Owned

__all__ = ["HEADER", "HEAD_LEN", "MAGIC", "NAME_RE", "Entry", "FileTier", "Owned"]

log = logging.getLogger("zeal_asgi.cache")

_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_EVERY = 60.0
VERIFIED_BYTES = 8 << 20
"""Bytes of verified files a worker keeps to recognise them (twice: file and payload)."""
VERIFIED_FILE_BYTES = 256 << 10
"""Larger files are verified with the HMAC on every read."""
_NAMES = 4096
_tiers: weakref.WeakSet[FileTier] = weakref.WeakSet()


def _after_fork() -> None:
    # A lock held by another thread at fork time would stay held forever in the child.
    for tier in list(_tiers):
        tier._verified_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


class Entry(NamedTuple):
    """An authenticated, unexpired entry read from the file tier."""

    serializer: int
    created_at: float
    expires_at: float
    nonce: bytes
    payload: bytes


def _write_all(fd: int, parts: list[bytes]) -> None:
    total = sum(len(p) for p in parts)
    done = os.writev(fd, parts)
    if done == total:
        return
    rest = memoryview(b"".join(parts))[done:]
    while rest:
        rest = rest[os.write(fd, rest) :]


def _read_all(fd: int, size: int) -> bytes:
    # one byte more than fstat said: a file that grew is not the one we checked
    data = os.pread(fd, size + 1, 0)
    if len(data) >= size:
        return data
    chunks = [data]
    done = len(data)
    while done <= size:
        chunk = os.pread(fd, size + 1 - done, done)
        if not chunk:
            break
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)


class FileTier(FileSweep):
    """Entries as files under ``directory`` (created 0700; refused if unsafe).

    Args:
        mac_key: key of the HMAC-SHA256 over every entry.
        name_key: key of the BLAKE2b that turns a cache key into a file name.
        max_entry_bytes / max_key_bytes: files larger than these allow are refused unread.
        fsync: fsync each file and the directory (durable across power loss; slower).
        count: called with a metric name for every event (``file_mac``, ``file_expired``...).
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        mac_key: bytes,
        name_key: bytes,
        max_entry_bytes: int,
        max_key_bytes: int,
        fsync: bool = False,
        count: Callable[[str], None] | None = None,
    ) -> None:
        self.path, self._dfd = open_cache_dir(directory)
        self._mac_key = mac_key
        self._name_key = name_key
        self.kid = int.from_bytes(hashlib.blake2b(mac_key, digest_size=4).digest(), "little")
        self.max_file_bytes = HEAD_LEN + max_key_bytes + max_entry_bytes
        self.fsync = fsync
        self._count = count or (lambda metric: None)
        self._last_log = 0.0
        self._euid = os.geteuid()
        self._names: dict[bytes, str] = {}
        # file name -> (its bytes, the key they were verified for, the entry)
        self._verified: dict[str, tuple[bytes, bytes, Entry]] = {}
        self._verified_bytes = 0
        self._verified_lock = threading.Lock()  # the GC thread drops entries too
        _tiers.add(self)
        self.temp_removed_at_start = remove_stale_temp(self._dfd)

    # -- naming and MACs -----------------------------------------------------------------------

    def name(self, key: bytes) -> str:
        """File name of ``key``: 64 hex chars of a keyed BLAKE2b, plus ``.zc``."""
        name = self._names.get(key)
        if name is None:
            if len(self._names) >= _NAMES:
                self._names.clear()
            name = hashlib.blake2b(key, key=self._name_key, digest_size=32).hexdigest() + ".zc"
            self._names[key] = name
        return name

    def _mac(self, head: bytes | memoryview, key: bytes | memoryview, payload: bytes) -> bytes:
        h = hmac.new(self._mac_key, head, "sha256")
        h.update(key)
        h.update(payload)
        return h.digest()

    # -- write ---------------------------------------------------------------------------------

    def write(
        self, key: bytes, serializer: int, expires_at: float, payload: bytes, nonce: bytes
    ) -> bool:
        """Store an entry atomically; ``False`` (logged, counted) when the disk refuses."""
        head = HEADER.pack(
            MAGIC,
            VERSION,
            serializer,
            0,
            self.kid,
            time.time(),
            expires_at,
            nonce,
            len(key),
            len(payload),
        )
        mac = self._mac(head, key, payload)
        tmp = f".tmp.{os.getpid()}.{secrets.token_hex(8)}"
        try:
            fd = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=self._dfd)
        except OSError as exc:
            self._io_error("create a temp file", exc)
            return False
        try:
            try:
                _write_all(fd, [head, mac, key, payload])
                if self.fsync:
                    os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.name(key), src_dir_fd=self._dfd, dst_dir_fd=self._dfd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=self._dfd)
            self._io_error("write an entry", exc)
            return False
        if self.fsync:
            with contextlib.suppress(OSError):
                os.fsync(self._dfd)  # makes the rename itself durable
        self._count("file_writes")
        return True

    def _io_error(self, what: str, exc: OSError) -> None:
        self._count("file_io_errors")
        now = time.monotonic()
        if now - self._last_log >= _LOG_EVERY:
            self._last_log = now
            log.warning(
                "cache file tier %s: could not %s (%s); the entry is not persisted, the memory "
                "tier keeps serving (logged at most once a minute)",
                self.path,
                what,
                os.strerror(exc.errno) if exc.errno else exc,
            )

    # -- read ----------------------------------------------------------------------------------

    def read(self, key: bytes, now: float) -> Entry | None:
        """The authenticated entry of ``key``; ``None`` on a miss (damaged files are unlinked)."""
        name = self.name(key)
        known = self._verified.get(name)
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=self._dfd)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:  # a planted symlink: never follow it, remove it
                self.drop(name, None, "not_regular")
            else:
                self._io_error("read an entry", exc)
            return None
        data = b""
        try:
            if known is not None and known[1] == key:
                data = os.pread(fd, len(known[0]) + 1, 0)
                if data == known[0]:
                    entry = known[2]
                    if not entry.expires_at or entry.expires_at > now:
                        return entry
                    data = b""  # expired: through the full path, which drops it
            st = os.fstat(fd)
            reason = self._check_stat(st)
            if reason is None:
                data = _read_all(fd, st.st_size)
        except OSError as exc:
            self._io_error("read an entry", exc)
            return None
        finally:
            os.close(fd)
        if reason is None:
            found, reason = self._parse(key, data, now)
            if found is not None:
                self._remember(name, data, key, found)
                return found
        self.drop(name, st, reason)
        return None

    def _remember(self, name: str, data: bytes, key: bytes, entry: Entry) -> None:
        size = 2 * len(data)  # the file's bytes and the payload sliced from them
        if size > 2 * VERIFIED_FILE_BYTES:
            return
        with self._verified_lock:
            self._unverify(name)
            if self._verified_bytes + size > VERIFIED_BYTES:
                self._verified.clear()
                self._verified_bytes = 0
            self._verified[name] = (data, key, entry)
            self._verified_bytes += size

    def _forget(self, name: str) -> None:
        with self._verified_lock:
            self._unverify(name)

    def _unverify(self, name: str) -> None:
        # the caller holds _verified_lock
        old = self._verified.pop(name, None)
        if old is not None:
            self._verified_bytes -= 2 * len(old[0])

    def _check_stat(self, st: os.stat_result) -> str | None:
        if not stat.S_ISREG(st.st_mode):
            return "not_regular"
        if st.st_uid != self._euid:
            return "owner"
        if st.st_size > self.max_file_bytes:
            return "too_large"
        if st.st_size < HEAD_LEN:
            return "short"
        return None

    def _parse(self, key: bytes, data: bytes, now: float) -> tuple[Entry | None, str]:
        if len(data) < HEAD_LEN:
            return None, "short"
        reason = check_head(data, len(data), self.kid)
        if reason is not None:
            return None, reason
        _, _, ser, _, _, created, expires, nonce, klen, _ = HEADER.unpack_from(data)
        view = memoryview(data)
        body = HEAD_LEN + klen
        expected = self._mac(view[: HEADER.size], view[HEAD_LEN:body], data[body:])
        if not hmac.compare_digest(expected, view[HEADER.size : HEAD_LEN]):
            return None, "mac"
        if view[HEAD_LEN:body] != key:
            return None, "key"  # an authentic entry of another key, copied under this name
        if expires and expires <= now:
            return None, "expired"
        return Entry(ser, created, expires, nonce, data[body:]), ""

    def drop(self, name: str, st: os.stat_result | None, reason: str) -> None:
        """Unlink a bad or expired entry file (unless it was replaced meanwhile) and count it."""
        self._count(f"file_{reason}")
        self._forget(name)
        with contextlib.suppress(OSError):
            if st is not None:
                now = os.stat(name, dir_fd=self._dfd, follow_symlinks=False)
                if now.st_ino != st.st_ino:
                    return  # a writer renamed a fresh entry over it: keep that one
            os.unlink(name, dir_fd=self._dfd)

    def drop_if(self, name: str, ino: int, reason: str) -> bool:
        """Unlink ``name`` if it is still the file ``ino`` (counted under ``reason``)."""
        try:
            if os.stat(name, dir_fd=self._dfd, follow_symlinks=False).st_ino != ino:
                return False
            os.unlink(name, dir_fd=self._dfd)
        except OSError:
            return False
        self._forget(name)
        self._count(f"file_{reason}")
        return True

    def discard(self, key: bytes, reason: str) -> None:
        """Drop the entry of ``key`` because its payload cannot be used (``reason`` counted)."""
        self.drop(self.name(key), None, reason)

    # -- delete, flush, sweep ------------------------------------------------------------------

    def delete(self, key: bytes) -> bool:
        """Remove the entry of ``key``; ``True`` if a file existed."""
        name = self.name(key)
        self._forget(name)
        try:
            os.unlink(name, dir_fd=self._dfd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._io_error("delete an entry", exc)
            return False
        return True

    def flush(self) -> int:
        """Remove every entry file (temp files of running writers are left alone)."""
        with self._verified_lock:
            self._verified.clear()
            self._verified_bytes = 0
        removed = 0
        for entry in scan(self._dfd):
            if NAME_RE.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self._dfd)
                    removed += 1
        return removed

    def close(self) -> None:
        """Close the directory descriptor (idempotent)."""
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
