"""The file tier's GC pass: stream the directory, drop expired and damaged entries and stale
temp files, rotate the oldest beyond ``max_files``, and list old survivors whose memory-tier
owner the caller should check (shared backends).  Reads headers only, never payloads.
"""

from __future__ import annotations

import contextlib
import errno
import os
import time
from collections.abc import Callable
from typing import NamedTuple

from zeal_asgi.cache.files.directory import scan, temp_is_stale
from zeal_asgi.cache.files.format import HEAD_LEN, HEADER, NAME_RE, READ_FLAGS, check_head

__all__ = ["MAX_OWNED", "ORPHAN_AGE", "FileSweep", "Owned"]

ORPHAN_AGE = 10.0
"""Only files older than this may be orphans: a newer one may still be getting its row."""
MAX_OWNED = 10_000


class Owned(NamedTuple):
    """A surviving entry file whose owner (the memory-tier row) the GC should check."""

    name: str
    key: bytes
    nonce: bytes
    ino: int


class FileSweep:
    """The sweep of :class:`~zeal_asgi.cache.files.tier.FileTier` (a base class sharing state)."""

    _dfd: int
    _count: Callable[[str], None]
    kid: int

    def drop(self, name: str, st: os.stat_result | None, reason: str) -> None:
        """Unlink a bad or expired entry file and count it (the tier's own)."""
        raise NotImplementedError

    def _check_stat(self, st: os.stat_result) -> str | None:
        raise NotImplementedError

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
            fd = os.open(name, READ_FLAGS, dir_fd=self._dfd)
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
            reason = check_head(head, st.st_size, self.kid)
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
