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
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable
from typing import NamedTuple

from ._cache_dir import open_cache_dir, remove_stale_temp, scan, temp_is_stale

__all__ = ["HEAD_LEN", "MAGIC", "NAME_RE", "Entry", "FileTier", "Owned"]

log = logging.getLogger("zeal_asgi.cache")

MAGIC = b"ZC\x01\x00"
VERSION = 1
HEADER = struct.Struct("<4sHBBIdd16sIQ")
MAC_LEN = 32
HEAD_LEN = HEADER.size + MAC_LEN
NAME_RE = re.compile(r"^[0-9a-f]{64}\.zc$")
_READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
_LOG_EVERY = 60.0
ORPHAN_AGE = 10.0
"""Only files older than this may be orphans: a newer one may still be getting its row."""
MAX_OWNED = 10_000


class Owned(NamedTuple):
    """A surviving entry file whose owner (the memory-tier row) the GC should check."""

    name: str
    key: bytes
    nonce: bytes
    ino: int


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
    chunks = []
    want = size + 1  # one byte more than fstat said: a file that grew is not the one we checked
    while want > 0:
        chunk = os.read(fd, want)
        if not chunk:
            break
        chunks.append(chunk)
        want -= len(chunk)
    return b"".join(chunks)


class FileTier:
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
        self.temp_removed_at_start = remove_stale_temp(self._dfd)

    # -- naming and MACs -----------------------------------------------------------------------

    def name(self, key: bytes) -> str:
        """File name of ``key``: 64 hex chars of a keyed BLAKE2b, plus ``.zc``."""
        return hashlib.blake2b(key, key=self._name_key, digest_size=32).hexdigest() + ".zc"

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
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self._dfd)
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
            entry, reason = self._parse(key, data, now)
            if entry is not None:
                return entry
        self.drop(name, st, reason)
        return None

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
        magic, ver, ser, flags, kid, created, expires, nonce, klen, plen = HEADER.unpack_from(data)
        if magic != MAGIC:
            return None, "magic"
        if ver != VERSION or flags != 0:
            return None, "version"
        if HEAD_LEN + klen + plen != len(data):
            return None, "size"
        if kid != self.kid:
            return None, "key_id"
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
        self._count(f"file_{reason}")
        return True

    def discard(self, key: bytes, reason: str) -> None:
        """Drop the entry of ``key`` because its payload cannot be used (``reason`` counted)."""
        self.drop(self.name(key), None, reason)

    # -- delete, flush, sweep ------------------------------------------------------------------

    def delete(self, key: bytes) -> bool:
        """Remove the entry of ``key``; ``True`` if a file existed."""
        try:
            os.unlink(self.name(key), dir_fd=self._dfd)
        except FileNotFoundError:
            return False
        except OSError as exc:
            self._io_error("delete an entry", exc)
            return False
        return True

    def flush(self) -> int:
        """Remove every entry file (temp files of running writers are left alone)."""
        removed = 0
        for entry in scan(self._dfd):
            if NAME_RE.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self._dfd)
                    removed += 1
        return removed

    def sweep(
        self, now: float, max_files: int = 0, owners: list[Owned] | None = None
    ) -> dict[str, int]:
        """One GC pass: unlink expired, damaged and foreign-key entries and stale temp files;
        with ``max_files``, then the oldest survivors beyond it.  Reads headers only and streams
        the directory (no whole listing in memory unless ``max_files`` needs it).

        With ``owners``, appends the key and nonce of surviving entries older than
        ``ORPHAN_AGE`` (at most ``MAX_OWNED``), for the caller to check against the memory tier.
        """
        out = {"scanned": 0, "expired": 0, "damaged": 0, "temp": 0, "rotated": 0}
        survivors: list[tuple[float, str, int]] = []
        for entry in scan(self._dfd):
            n = entry.name
            if n.startswith(".tmp."):
                with contextlib.suppress(FileNotFoundError):
                    if temp_is_stale(n, entry.stat(follow_symlinks=False).st_mtime, time.time()):
                        os.unlink(n, dir_fd=self._dfd)
                        out["temp"] += 1
                continue
            if not NAME_RE.match(n):
                continue  # not ours: never touched
            out["scanned"] += 1
            verdict, st = self._sweep_one(n, now, owners)
            if verdict == "keep" and st is not None and max_files:
                survivors.append((st.st_mtime, n, st.st_ino))
            elif verdict in ("expired", "damaged"):
                out[verdict] += 1
        if max_files and len(survivors) > max_files:
            survivors.sort()
            for _, n, ino in survivors[: len(survivors) - max_files]:
                with contextlib.suppress(OSError):
                    if os.stat(n, dir_fd=self._dfd, follow_symlinks=False).st_ino == ino:
                        os.unlink(n, dir_fd=self._dfd)
                        out["rotated"] += 1
                        self._count("file_rotations")
        return out

    def _sweep_one(
        self, name: str, now: float, owners: list[Owned] | None
    ) -> tuple[str, os.stat_result | None]:
        try:
            fd = os.open(name, _READ_FLAGS, dir_fd=self._dfd)
        except FileNotFoundError:
            return "gone", None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                self.drop(name, None, "not_regular")
                return "damaged", None
            return "keep", None
        try:
            st = os.fstat(fd)
            reason = self._check_stat(st)
            # the key follows the header: read it too when the caller wants owners
            want = HEAD_LEN + 4096 if owners is not None else HEADER.size
            head = os.read(fd, want) if reason is None else b""
        except OSError:
            return "keep", None
        finally:
            os.close(fd)
        if reason is None:
            reason = self._check_head(head, st.st_size)
        if reason is None:
            fields = HEADER.unpack_from(head)
            expires, nonce, klen = fields[6], fields[7], fields[8]
            if expires and expires <= now:
                self.drop(name, st, "expired")
                return "expired", st
            if (
                owners is not None
                and len(owners) < MAX_OWNED
                and st.st_mtime < time.time() - ORPHAN_AGE
                and len(head) >= HEAD_LEN + klen
            ):
                owners.append(Owned(name, head[HEAD_LEN : HEAD_LEN + klen], nonce, st.st_ino))
            return "keep", st
        self.drop(name, st, reason)
        return "damaged", st

    def _check_head(self, head: bytes, size: int) -> str | None:
        if len(head) < HEADER.size:
            return "short"
        magic, ver, _, flags, kid, _, _, _, klen, plen = HEADER.unpack_from(head)
        if magic != MAGIC:
            return "magic"
        if ver != VERSION or flags != 0:
            return "version"
        if HEAD_LEN + klen + plen != size:
            return "size"
        if kid != self.kid:
            return "key_id"  # written under another key (an earlier server run): unreadable
        return None

    def close(self) -> None:
        """Close the directory descriptor (idempotent)."""
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1
