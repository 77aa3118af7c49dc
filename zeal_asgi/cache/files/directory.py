"""The file tier's directory: created 0700, checked (not a symlink, ours, not open to others),
opened once as a directory fd that every file operation is relative to, and swept of the temp
files that killed writers leave behind.
"""

from __future__ import annotations

import contextlib
import logging
import os
import pathlib
import re
import stat
import time
from collections.abc import Iterator

from zeal_asgi.errors import InsecureCacheDirError
from zeal_asgi.shm.process import process_alive

log = logging.getLogger("zeal_asgi.cache")

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
