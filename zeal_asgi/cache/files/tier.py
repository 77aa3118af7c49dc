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
takes the full path: ``fstat`` (regular, ours, size limits), read, header checks, HMAC.  Kept
bytes stay valid after their file is deleted or replaced (they only ever stand for themselves),
so only this worker's event loop touches them, never the GC thread.

The directory is created 0700 and checked (not a symlink, ours, not open to others), opened
once as a directory fd that every file operation is relative to, and swept of the temp files
that killed writers leave behind.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import hashlib
import hmac
import itertools
import logging
import os
import pathlib
import re
import secrets
import stat
import struct
import time
from collections.abc import Callable, Iterator
from typing import NamedTuple

from zeal_asgi.errors import InsecureCacheDirError
from zeal_asgi.shm.process import process_alive

log = logging.getLogger("zeal_asgi.cache")

# -- the directory ---------------------------------------------------------------------------------

TEMP_RE = re.compile(r"^\.tmp\.(\d+)\.[0-9a-f]+$")
"""Temp files: ``.tmp.<pid>.<hex>``; the pid tells a live writer's file from a dead one's."""

TEMP_MAX_AGE = 60.0
"""A temp file older than this is stale even if its pid looks alive (pids get reused)."""


def _check_ancestors(path: str) -> None:
    # Another user who can write to an ancestor (without the sticky bit) can rename our
    # directory away and put their own in its place, as sshd's StrictModes reasons.
    for parent in map(str, pathlib.PurePath(path).parents):
        st = os.lstat(parent)
        if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
            raise InsecureCacheDirError(
                f"cache directory {path!r}: its ancestor {parent!r} is writable by every user "
                f"(mode {stat.S_IMODE(st.st_mode):o}, no sticky bit); another user could replace "
                "the cache directory"
            )


def _make_private(path: str) -> None:
    """Create ``path`` and any missing parents as 0700 (``os.makedirs`` leaves parents to the
    umask, which may be 0)."""
    parent = os.path.dirname(path)
    if parent != path and not os.path.lexists(parent):
        _make_private(parent)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
        os.chmod(path, 0o700)  # mkdir's mode passes through the umask


def open_cache_dir(path: str | os.PathLike[str]) -> tuple[str, int]:
    """Create (0700) or check the cache directory; return its absolute path and an open fd.

    Raises:
        InsecureCacheDirError: a symlink, not a directory, owned by another user, writable by
            group or others, or under a directory any user may write to.
    """
    full = os.path.abspath(os.fspath(path))
    _make_private(full)
    st = os.lstat(full)
    refusals = (  # in this order: the first that applies is the one reported
        (stat.S_ISLNK(st.st_mode), "is a symlink; refusing it (point cache_dir at the real one)"),
        (not stat.S_ISDIR(st.st_mode), "exists and is not a directory"),
        (st.st_uid != os.geteuid(), f"belongs to uid {st.st_uid}, not to this process (uid "
            f"{os.geteuid()}); refusing to read or write cache files there"),
        (st.st_mode & (stat.S_IWGRP | stat.S_IWOTH), f"has mode {stat.S_IMODE(st.st_mode):o}: "
            "writable by other users; it must be 0700 (chmod 700 it, or use a fresh directory)"),
    )  # fmt: skip
    for refused, why in refusals:
        if refused:
            raise InsecureCacheDirError(f"cache directory {full!r} {why}")
    _check_ancestors(full)
    fd = os.open(full, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        fst = os.fstat(fd)
        if (fst.st_dev, fst.st_ino) != (st.st_dev, st.st_ino):
            raise InsecureCacheDirError(
                f"cache directory {full!r} was replaced while it was being opened"
            )
        if (mode := stat.S_IMODE(fst.st_mode)) != 0o700:
            log.warning("cache directory %s had mode %o; tightened to 0700", full, mode)
            os.fchmod(fd, 0o700)
    except BaseException:
        os.close(fd)
        raise
    return full, fd


def remove_if_stale(dfd: int, entry: os.DirEntry[str]) -> bool:
    """Unlink temp file ``entry`` if its writer is gone (or it is older than TEMP_MAX_AGE,
    as pids get reused); ``True`` if it was."""
    m = TEMP_RE.match(entry.name)
    if m is None:
        return False  # not a name our writers use: never touched
    pid = int(m.group(1))
    with contextlib.suppress(FileNotFoundError):
        age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        if age > TEMP_MAX_AGE or (pid != os.getpid() and not process_alive(pid, None)):
            os.unlink(entry.name, dir_fd=dfd)
            return True
    return False


def scan(dfd: int) -> Iterator[os.DirEntry[str]]:
    """Entries of the directory, streamed (never the whole listing in memory).

    Each scan opens its own descriptor: ``scandir`` on a shared fd would share its offset with
    any concurrent scan (the GC runs in a thread).
    """
    fd = os.open(".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, dir_fd=dfd)
    try:
        with os.scandir(fd) as it:
            yield from it
    finally:
        os.close(fd)


def remove_stale_temp(dfd: int) -> int:
    """Unlink the temp files killed writers left behind; how many."""
    return sum(remove_if_stale(dfd, e) for e in scan(dfd) if e.name.startswith(".tmp."))


# -- entries ---------------------------------------------------------------------------------------

MAGIC = b"ZC\x01\x00"
VERSION = 1
HEADER = struct.Struct("<4sHBBIdd16sIQ")
HEAD_LEN = HEADER.size + 32
"""The header and its HMAC-SHA256."""
NAME_RE = re.compile(r"^[0-9a-f]{64}\.zc$")
READ_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
"""Never follow a planted symlink; never block on a planted FIFO."""
_WRITE_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
VERIFIED_BYTES = 8 << 20
"""Bytes of verified files a worker keeps to recognise them (twice: file and payload)."""
VERIFIED_FILE_BYTES = 256 << 10
"""Larger files are verified with the HMAC on every read."""
ORPHAN_AGE = 10.0
"""Only files older than this may be orphans: a newer one may still be getting its row."""
MAX_OWNED = 10_000
_temp_serial = itertools.count(secrets.randbits(48))
"""Temp names are ``.tmp.<pid>.<serial>``: unique per process (a forked child has another pid),
and a random start keeps a reused pid from meeting a dead process's leftovers."""


class Entry(NamedTuple):
    """An authenticated, unexpired entry read from the file tier."""

    serializer: int
    expires_at: float
    nonce: bytes
    payload: bytes


class Owned(NamedTuple):
    """A surviving entry file whose owner (the memory-tier row) the GC should check."""

    name: str
    key: bytes
    nonce: bytes
    ino: int


def check_head(head: bytes, size: int, kid: int) -> str | None:
    """Why the header of a ``size``-byte file is unusable under key id ``kid``, or ``None``."""
    if len(head) < HEADER.size:
        return "short"
    magic, ver, _, flags, file_kid, _, _, _, klen, plen = HEADER.unpack_from(head)
    if magic != MAGIC:
        return "magic"
    if ver != VERSION or flags != 0:
        return "version"
    if HEAD_LEN + klen + plen != size:
        return "size"
    if file_kid != kid:
        return "key_id"  # written under another key (an earlier server run): unreadable
    return None


def _write_all(fd: int, parts: list[bytes]) -> None:
    done = os.writev(fd, parts)
    if done < sum(len(p) for p in parts):
        rest = memoryview(b"".join(parts))[done:]
        while rest:
            rest = rest[os.write(fd, rest) :]


def _read_all(fd: int, size: int) -> bytes:
    # one byte more than fstat said: a file that grew is not the one we checked
    chunks: list[bytes] = []
    done = 0
    while done <= size and (chunk := os.pread(fd, size + 1 - done, done)):
        chunks.append(chunk)
        done += len(chunk)
    return b"".join(chunks)  # one chunk: that very object, not a copy


@functools.lru_cache(maxsize=4096)  # a hot key is named once, not hashed on every read
def _file_name(name_key: bytes, key: bytes) -> str:
    return hashlib.blake2b(key, key=name_key, digest_size=32).hexdigest() + ".zc"


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
        # file name -> (its bytes, the key they were verified for, the entry)
        self._verified: dict[str, tuple[bytes, bytes, Entry]] = {}
        self._verified_bytes = 0
        self.temp_removed_at_start = remove_stale_temp(self._dfd)

    def name(self, key: bytes) -> str:
        """File name of ``key``: 64 hex chars of a keyed BLAKE2b, plus ``.zc``."""
        return _file_name(self._name_key, key)

    def _mac(self, head: bytes | memoryview, key: bytes | memoryview, payload: bytes) -> bytes:
        h = hmac.new(self._mac_key, head, "sha256")
        h.update(key)
        h.update(payload)
        return h.digest()

    def _io_error(self, what: str, exc: OSError) -> None:
        self._count("file_io_errors")
        now = time.monotonic()
        if now - self._last_log >= 60.0:
            self._last_log = now
            log.warning(
                "cache file tier %s: could not %s (%s); the entry is not persisted, the memory "
                "tier keeps serving (logged at most once a minute)",
                self.path,
                what,
                os.strerror(exc.errno) if exc.errno else exc,
            )

    def _check_stat(self, st: os.stat_result) -> str | None:
        if not stat.S_ISREG(st.st_mode):
            return "not_regular"
        if st.st_uid != self._euid:
            return "owner"
        if st.st_size > self.max_file_bytes:
            return "too_large"
        return "short" if st.st_size < HEAD_LEN else None

    # -- write, read ---------------------------------------------------------------------------

    def write(
        self, key: bytes, serializer: int, expires_at: float, payload: bytes, nonce: bytes
    ) -> bool:
        """Store an entry atomically; ``False`` (logged, counted) when the disk refuses."""
        head = HEADER.pack(
            MAGIC, VERSION, serializer, 0, self.kid,  # flags 0
            time.time(), expires_at, nonce, len(key), len(payload),
        )  # fmt: skip
        tmp = f".tmp.{os.getpid()}.{next(_temp_serial):x}"
        try:
            fd = os.open(tmp, _WRITE_FLAGS, 0o600, dir_fd=self._dfd)
        except OSError as exc:
            self._io_error("create a temp file", exc)
            return False
        try:
            try:
                _write_all(fd, [head, self._mac(head, key, payload), key, payload])
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
        try:
            if known is not None and known[1] == key:
                data = os.pread(fd, len(known[0]) + 1, 0)
                if data == known[0] and not 0 < known[2].expires_at <= now:
                    return known[2]  # (an expired one takes the full path, which drops it)
            st = os.fstat(fd)
            reason = self._check_stat(st)
            data = _read_all(fd, st.st_size) if reason is None else b""
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
        self.drop(name, st.st_ino, reason)
        return None

    def _remember(self, name: str, data: bytes, key: bytes, entry: Entry) -> None:
        if len(data) > VERIFIED_FILE_BYTES:
            return
        old = self._verified.pop(name, None)
        self._verified_bytes -= 2 * len(old[0]) if old else 0
        if self._verified_bytes + 2 * len(data) > VERIFIED_BYTES:  # the file and its payload
            self._verified.clear()
            self._verified_bytes = 0
        self._verified[name] = (data, key, entry)
        self._verified_bytes += 2 * len(data)

    def _parse(self, key: bytes, data: bytes, now: float) -> tuple[Entry | None, str]:
        reason = check_head(data, len(data), self.kid)
        if reason is not None:
            return None, reason
        _, _, ser, _, _, _created, expires, nonce, klen, _ = HEADER.unpack_from(data)
        view = memoryview(data)
        body = HEAD_LEN + klen
        expected = self._mac(view[: HEADER.size], view[HEAD_LEN:body], data[body:])
        if not hmac.compare_digest(expected, view[HEADER.size : HEAD_LEN]):
            return None, "mac"
        if view[HEAD_LEN:body] != key:
            return None, "key"  # an authentic entry of another key, copied under this name
        if expires and expires <= now:
            return None, "expired"
        return Entry(ser, expires, nonce, data[body:]), ""

    # -- removal -------------------------------------------------------------------------------

    def drop(self, name: str, ino: int | None, reason: str) -> bool:
        """Unlink entry ``name`` (only if it is still the file ``ino``, when given: a writer
        may have renamed a fresh entry over it) and count ``file_<reason>``."""
        self._count(f"file_{reason}")
        try:
            if (
                ino is not None
                and os.stat(name, dir_fd=self._dfd, follow_symlinks=False).st_ino != ino
            ):
                return False
            os.unlink(name, dir_fd=self._dfd)
        except OSError:
            return False
        return True

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

    def flush(self) -> None:
        """Remove every entry file (temp files of running writers are left alone)."""
        self._verified.clear()
        self._verified_bytes = 0
        for entry in scan(self._dfd):
            if NAME_RE.match(entry.name):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(entry.name, dir_fd=self._dfd)

    def close(self) -> None:
        """Close the directory descriptor (idempotent)."""
        if self._dfd >= 0:
            os.close(self._dfd)
            self._dfd = -1

    # -- GC ------------------------------------------------------------------------------------

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
                out["temp"] += remove_if_stale(self._dfd, entry)
            elif NAME_RE.match(n):  # anything else is not ours: never touched
                out["scanned"] += 1
                verdict, st = self._sweep_one(n, now, owners)
                if verdict == "keep" and st is not None and max_files:
                    survivors.append((st.st_mtime, n, st.st_ino))
                elif verdict in ("expired", "damaged"):
                    out[verdict] += 1
        survivors.sort()
        for _, n, ino in survivors[: max(0, len(survivors) - max_files)]:
            out["rotated"] += self.drop(n, ino, "rotations")
        return out

    def _sweep_one(
        self, name: str, now: float, owners: list[Owned] | None
    ) -> tuple[str, os.stat_result | None]:
        try:
            fd = os.open(name, READ_FLAGS, dir_fd=self._dfd)
        except OSError as exc:
            if exc.errno != errno.ELOOP:
                return "keep", None  # gone since the listing, or unreadable: left as it is
            self.drop(name, None, "not_regular")
            return "damaged", None
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
        reason = reason or check_head(head, st.st_size, self.kid)
        if reason is not None:
            self.drop(name, st.st_ino, reason)
            return "damaged", st
        expires, nonce, klen = HEADER.unpack_from(head)[6:9]
        if expires and expires <= now:
            self.drop(name, st.st_ino, "expired")
            return "expired", st
        old = st.st_mtime < time.time() - ORPHAN_AGE
        if owners is not None and old and len(owners) < MAX_OWNED and len(head) >= HEAD_LEN + klen:
            owners.append(Owned(name, head[HEAD_LEN : HEAD_LEN + klen], nonce, st.st_ino))
        return "keep", st
