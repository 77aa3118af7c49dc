"""Shared-memory segment lifecycle: which server we belong to, naming, create/attach, cleanup.

Every table and atomic lives in its own segment named after the *server* that owns it
(``zeal.<uid>.<server-id>.<kind>.<hash>`` under ``/dev/shm``), so all workers of one server meet
on the same memory and two servers never do.  The server id is, in order:

1. ``ZEAL_SERVER_ID`` from the environment (the launcher and the gunicorn hooks set it);
2. the parent process, when this process is a worker started by a supervisor (a multiprocessing
   child such as a ``uvicorn --workers`` worker, or a process forked from a parent running the
   same command line, such as a gunicorn worker);
3. this process itself (single-process servers, gunicorn ``--preload`` masters, scripts).

Creation is ``O_CREAT|O_EXCL`` with mode 0600 under an exclusive ``flock``, space is reserved with
``posix_fallocate`` (a full ``/dev/shm`` is a typed error, never a later SIGBUS), and every
process keeps a shared ``flock`` on each segment it uses: that is how a sweep tells a stale
segment (its server died) from a live one.  The process that owns the server unlinks at exit;
for workers of a foreign supervisor a small janitor process unlinks when the supervisor exits.

With ``ZEAL_SHM_BACKEND=memfd`` segments have no name: the server's owner creates them, its
forked workers inherit them, and its other workers open them through ``/proc/<owner>/fd``.  A
worker whose owner did not create a segment (a ``uvicorn --workers`` or a gunicorn worker without
``--preload``: their masters never import the app) cannot share it and is refused.
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import glob
import hashlib
import logging
import multiprocessing
import os
import re
import shutil
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from zeal_asgi.errors import (
    PrivateCopyError,
    SchemaError,
    ShmAbiMismatchError,
    ShmCapacityError,
    ShmError,
    ShmNameTakenError,
    ShmPermissionError,
)
from zeal_asgi.shm import _shmtable
from zeal_asgi.shm.janitor import unlink_if_unused
from zeal_asgi.shm.process import cmdline, process_alive, process_start_time
from zeal_asgi.shm.schema import Schema

if TYPE_CHECKING:
    from zeal_asgi.shm.ext import Atomic, Table

log = logging.getLogger("zeal_asgi.shm")

PREFIX = "zeal."
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ATTACH_TIMEOUT = 10.0
STALE_MIN_AGE = 10.0


def shm_dir() -> str:
    """Directory of named segments: ``ZEAL_SHM_DIR`` or ``/dev/shm``."""
    return os.environ.get("ZEAL_SHM_DIR", "/dev/shm")


def shm_space() -> tuple[int, int]:
    """``(size, free)`` in bytes of the filesystem of :func:`shm_dir`; ``(0, 0)`` if unreadable."""
    with contextlib.suppress(OSError):
        size, _, free = shutil.disk_usage(shm_dir())
        return size, free
    return 0, 0


# -- server identity ---------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerIdentity:
    """Which server this process belongs to, and its role in it."""

    server_id: str
    owner_pid: int | None
    """Pid of the process that owns the server's segments (unlinks them), when known."""
    owner_start: int | None
    is_owner: bool
    """True when this process owns the server: it creates and unlinks the segments."""
    how: str
    """How the identity was found: ``env``, ``spawned-worker``, ``forked-worker``, ``self``."""


_identity: ServerIdentity | None = None
_lock = threading.RLock()


def _is_forked_worker(ppid: int) -> bool:
    if ppid <= 1:
        return False
    parent = cmdline(ppid)
    if parent and parent == cmdline(os.getpid()):
        return True
    # gunicorn renames its processes (setproctitle) so the command lines differ
    return "gunicorn.arbiter" in sys.modules and b"gunicorn" in parent


def server_identity() -> ServerIdentity:
    """Resolve (once per process) the server this process belongs to."""
    global _identity
    with _lock:
        if _identity is not None:
            return _identity
        env = os.environ.get("ZEAL_SERVER_ID")
        if env:
            if not _ID_RE.match(env):
                raise ShmError(f"ZEAL_SERVER_ID must match {_ID_RE.pattern}, got {env!r}")
            raw = os.environ.get("ZEAL_SERVER_OWNER_PID", "")
            owner = int(raw) if raw.isdigit() else None
            start = process_start_time(owner) if owner else None
            _identity = ServerIdentity(env, owner, start, owner == os.getpid(), "env")
        else:
            ppid = os.getppid()
            if multiprocessing.parent_process() is not None and ppid > 1:
                how = "spawned-worker"
            elif _is_forked_worker(ppid):
                how = "forked-worker"
            else:
                how = "self"
            master = os.getpid() if how == "self" else ppid
            start = process_start_time(master)
            _identity = ServerIdentity(f"{master}-{start}", master, start, how == "self", how)
        return _identity


def _reset_after_fork() -> None:
    global _identity, _swept
    _identity = None
    _swept = False


os.register_at_fork(after_in_child=_reset_after_fork)


def segment_path(kind: str, name: str, server_id: str | None = None) -> str:
    """Path of the named segment (``kind`` ``t``: table, ``a``: atomic) of a server (this
    process's by default)."""
    sid = server_id or server_identity().server_id
    ns = os.environ.get("ZEAL_NAMESPACE", "")
    digest = hashlib.blake2b(f"{ns}\0{kind}\0{name}".encode(), digest_size=8).hexdigest()
    return os.path.join(shm_dir(), f"{PREFIX}{os.geteuid()}.{sid}.{kind}.{digest}")


def segments_of_server(server_id: str | None = None) -> list[str]:
    """Paths of the named segments of a server (this process's server by default)."""
    sid = server_id or server_identity().server_id
    return sorted(glob.glob(os.path.join(shm_dir(), f"{PREFIX}{os.geteuid()}.{sid}.*")))


def server_ids() -> list[str]:
    """Ids of this user's servers that have segments here (live or left by a killed one)."""
    names = glob.glob(os.path.join(shm_dir(), f"{PREFIX}{os.geteuid()}.*.*"))
    return sorted({os.path.basename(n).split(".")[2] for n in names})


def display_name(name: str | None, kind: str) -> str | None:
    """What messages call a ``kind`` (table, atomic) named ``name``: its name after the last
    ``:``, the part before it being the owner's scope (``store:demo`` is the Store's table
    ``demo``).  SchemaError unless ``name`` is a non-empty str or ``None`` (a private one)."""
    if name is not None and (not isinstance(name, str) or not name):
        raise SchemaError(f"{kind} name must be a non-empty str, got {name!r}")
    return name.rpartition(":")[2] if name else name


# -- what this process holds and created ---------------------------------------------------------

_held: weakref.WeakSet[Any] = weakref.WeakSet()
_created_paths: dict[str, int] = {}  # path -> pid of the process that created it
_released: set[str] = set()
"""Paths this process unlinked on purpose: other handles of them in this process are not
private copies by accident (tests destroy what they made while an app still maps it)."""


def held_segments() -> Iterator[tuple[Table | Atomic, str | None, str]]:
    """(object, path, kind) of every live table/atomic this process has open."""
    with _lock:
        objs = list(_held)
    for obj in objs:
        yield obj, obj.path, "atomic" if isinstance(obj, _shmtable.Atomic) else "table"


def release_owned() -> list[str]:
    """Unlink the segments this process created, if it owns the server; the paths unlinked.

    What ``atexit`` does, on demand (a process that must not leave its names to the janitor).
    Mappings stay valid in every process that has them; only the names go away.
    """
    done = [p for p, creator in _created_paths.items() if creator == os.getpid()]
    _unlink_owned()
    _released.update(done)
    return done


@atexit.register
def _unlink_owned() -> None:
    """The owning process unlinks what it created; forked children inherit this hook, so the
    pid check keeps a gunicorn worker's exit from deleting the server's memory."""
    if _identity is not None and not _identity.is_owner:
        return  # a worker of a foreign supervisor: the janitor owns cleanup
    for path, creator in list(_created_paths.items()):
        if creator == os.getpid():
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
            _created_paths.pop(path, None)


# -- create / attach ---------------------------------------------------------------------------


def _capacity_error(what: str, needed: int) -> ShmCapacityError:
    d = shm_dir()
    total, free = shm_space()
    mib = max(64, (needed * 2 // (1024 * 1024)) + 64)
    msg = (
        f"zeal_asgi: {what} needs {needed:,} bytes of shared memory but {d} has {free:,} bytes "
        f"free of {total:,}"
        + (" (64 MiB is the Docker/Kubernetes default)" if total <= 64 * 1024 * 1024 else "")
        + f". Fix one of: docker run --shm-size={mib}m | compose: shm_size: {mib}m | Kubernetes: "
        f"mount an emptyDir {{medium: Memory, sizeLimit: {mib}Mi}} at /dev/shm | fewer max_rows "
        "| ZEAL_SHM_BACKEND=memfd with `zeal-asgi run` or gunicorn --preload (not limited by "
        "/dev/shm; counted against the memory limit)"
    )
    err = ShmCapacityError(errno.ENOSPC, msg)
    err.needed, err.free, err.total = needed, free, total  # type: ignore[attr-defined]
    return err


def _reserve(fd: int, size: int, what: str, named: bool) -> None:
    """Reserve every page now: a full filesystem is a typed error here, never a later SIGBUS."""
    total, free = shm_space() if named else (size, size)
    if total and free < size:
        raise _capacity_error(what, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise _capacity_error(what, size) from exc
        raise


def _check_ours(fd: int, path: str) -> None:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
        raise ShmNameTakenError(
            errno.EEXIST,
            f"{path} is not a regular file of uid {os.geteuid()} (owner {st.st_uid}): refusing "
            "to attach (squatted name)",
        )
    if st.st_mode & 0o077:
        raise ShmPermissionError(
            errno.EACCES,
            f"{path} has mode {stat.S_IMODE(st.st_mode):o}; segments must be 0600: refusing to "
            "attach",
        )


def _memfd_wanted() -> bool:
    backend = os.environ.get("ZEAL_SHM_BACKEND", "posix").lower()
    if backend not in ("posix", "memfd"):
        raise ShmError(f"ZEAL_SHM_BACKEND must be 'posix' or 'memfd', got {backend!r}")
    return backend == "memfd"


def _create(
    obj: Table | Atomic,
    path: str | None,
    size: int,
    what: str,
    init: tuple[Any, ...],
    memfd: str = "zeal",
) -> None:
    """A new segment of ``size`` bytes, mapped in ``obj`` and initialised by
    ``obj._init(fd, *init)``.  With a path, it is built under a private name in the same
    directory and linked into place, so the name never shows a half-initialised segment,
    whatever dies when (``FileExistsError``: another process linked the name first; ours is
    unmapped and thrown away).  Without, it is a memfd called ``memfd``."""
    if path is None:
        fd = os.memfd_create(memfd, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        tmp = None
    else:
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(path) + ".tmp.", dir=shm_dir())
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweep never takes a segment being built
        os.fchmod(fd, 0o600)
        os.ftruncate(fd, size)
        _reserve(fd, size, what, named=tmp is not None)
        if tmp is None:
            # nobody may resize it under the others' mappings (a SIGBUS for every worker)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        obj._init(fd, *init)
        fcntl.flock(fd, fcntl.LOCK_SH)
        if tmp is not None and path is not None:
            os.link(tmp, path)  # FileExistsError: someone else was first
    except BaseException:
        obj._unmap()  # the mapping goes, if any (a no-op otherwise); the fd is still ours
        os.close(fd)
        raise
    finally:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)


def _attach(obj: Table | Atomic, fd: int, path: str, named: bool = True) -> Any:
    """Check that the segment open at ``fd`` is ours and map it in ``obj`` under a shared flock
    (which marks this process as a user of it): what ``obj._attach`` returned (a table's schema
    blob), or ``None`` when the name was unlinked meanwhile (look it up again); ``fd`` is closed
    unless ``obj`` mapped it."""
    try:
        _check_ours(fd, path)
        deadline = time.monotonic() + ATTACH_TIMEOUT
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                # a sweep or a janitor probing it with LOCK_EX for a moment
                if time.monotonic() > deadline:
                    raise ShmError(
                        errno.ETIMEDOUT, f"{path}: could not take a shared lock"
                    ) from None
                time.sleep(0.002)
        st = os.fstat(fd)
        if named and st.st_nlink == 0:
            os.close(fd)
            return None
        result = obj._attach(fd, st.st_size)
        if not result:
            raise ShmAbiMismatchError(
                errno.EINVAL, f"{path}: not an initialised segment (no header): refusing to attach"
            )
    except BaseException:
        os.close(fd)
        raise
    return result


def _owner_memfd(seg: str) -> int:
    """Open the memfd segment ``seg`` that the server's owner created, through /proc."""
    owner = server_identity().owner_pid
    want = f"/memfd:{seg} (deleted)"
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{owner}/fd"):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{owner}/fd/{fd}") == want:
                    return os.open(f"/proc/{owner}/fd/{fd}", os.O_RDWR | os.O_CLOEXEC)
    raise PrivateCopyError(
        f"ZEAL_SHM_BACKEND=memfd: segment {seg} was not allocated by this server's master (pid "
        f"{owner}), so this worker would hold a private copy and other workers would not see "
        "its writes. memfd memory reaches workers only from a master that imports the app "
        "before starting them (`zeal-asgi run`, gunicorn --preload); with uvicorn --workers or "
        "gunicorn without --preload, use the default ZEAL_SHM_BACKEND=posix"
    )


def _open(
    obj: Table | Atomic, name: str | None, size: int, what: str, *init: Any
) -> tuple[str | None, Any]:
    """Create or attach the segment of ``name`` (``None``: a private, anonymous one), mapped in
    ``obj`` (which then owns the fd) by ``obj._init(fd, *init)`` or ``obj._attach``.

    Returns ``(path, stored)``: ``stored`` is ``None`` when this process created the segment,
    else what ``obj._attach`` returned (a table's schema blob)."""
    kind = "a" if isinstance(obj, _shmtable.Atomic) else "t"
    if name is None:
        _create(obj, None, size, what, init, f"zeal-{kind}-anon")
        return None, None
    path = segment_path(kind, name)
    seg = os.path.basename(path)
    if _memfd_wanted():
        if server_identity().is_owner:
            _create(obj, None, size, what, init, seg)
            return None, None
        return None, _attach(obj, _owner_memfd(seg), f"memfd {seg}", named=False)
    sweep_stale()
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            try:
                _create(obj, path, size, what, init)
            except FileExistsError:
                continue  # another process published the name first: attach to theirs
            with _lock:
                _created_paths[path] = os.getpid()
            _ensure_janitor()
            return path, None
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
                raise ShmNameTakenError(
                    errno.EEXIST, f"{path} exists and cannot be opened by us: squatted name"
                ) from exc
            raise
        stored = _attach(obj, fd, path)
        if stored is not None:
            return path, stored  # else unlinked (a sweep or a replace): look the name up again


def _hold(obj: Table | Atomic, path: str | None, stored: object) -> tuple[str | None, bool]:
    """Count ``obj`` among the segments this process holds; ``(path, created)``."""
    with _lock:
        _held.add(obj)
    return path, stored is None


def open_table(
    table: Table, name: str | None, max_rows: int, schema: Schema
) -> tuple[str | None, bool]:
    """Create or attach the segment of ``table`` (``Table.__init__``); ``(path, created)``."""
    geo = schema.geometry(max_rows)
    blob = schema.to_blob()
    what = f"table {name!r} ({max_rows:,} rows of {schema.row_size} bytes)"
    for _ in range(3):
        path, stored = _open(table, name, geo.total_size, what, geo, blob)
        if stored is None or stored == blob:
            return _hold(table, path, stored)
        table.close()  # its fd too: the segment is no longer ours to hold
        # A leftover of an earlier run of this server (e.g. before a --reload): replace it
        # when nobody uses it any more, otherwise refuse loudly.
        if path is None or not unlink_if_unused(path):
            raise ShmAbiMismatchError(
                errno.EINVAL,
                f"table {name!r}: the shared segment {path or '(memfd)'} has another schema "
                "than this process declares (segment vs declared: "
                f"{Schema.from_blob(stored).difference(schema)}); every worker must "
                "declare the same schema",
            )
        log.warning("table %r: replaced an unused segment that had another schema", name)
    raise ShmError(  # pragma: no cover - someone keeps recreating it
        errno.EAGAIN, f"table {name!r}: segment keeps changing under us"
    )


def open_atomic(atomic: Atomic, name: str | None, initial: int) -> tuple[str | None, bool]:
    """Create or attach the segment of ``atomic`` (``Atomic.__init__``); ``(path, created)``."""
    path, stored = _open(atomic, name, _shmtable.ATOMIC_SIZE, f"atomic {name!r}", initial)
    return _hold(atomic, path, stored)


def attach_path(path: str, name: str | None = None) -> Table | Atomic:
    """Attach to the existing segment at ``path``, a table or an atomic, without ever creating
    one (``zeal-asgi inspect`` reads another server's figures this way); close it after use.

    Raises:
        FileNotFoundError: the segment is gone.
        ShmError: it is not ours, not a segment, or not initialised.
    """
    from zeal_asgi.shm.ext import Atomic, Table

    table = os.path.basename(path).split(".")[-2] == "t"
    obj: Any = Table.__new__(Table) if table else Atomic.__new__(Atomic)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    stored = _attach(obj, fd, path)
    if stored is None:
        raise ShmError(errno.EAGAIN, f"{path}: the segment is being replaced")
    if table:
        obj.schema = Schema.from_blob(stored)
        obj._bind(obj.schema, name, 1.0)
    else:
        obj._bind(name)
    obj.path, obj.created = path, False
    return cast("Table | Atomic", obj)


def destroy(obj: Table | Atomic) -> None:
    """Close ``obj`` in this process and unlink its segment (other processes keep their
    mappings; new attachers get a fresh one).  For tests and explicit teardown."""
    path = obj.path
    obj.close()
    with _lock:
        _held.discard(obj)
        if path:
            _created_paths.pop(path, None)
            _released.add(path)
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


# -- stale segments ----------------------------------------------------------------------------

_swept = False
_SID_RE = re.compile(r"^(\d+)-(\d+|None)$")


def sweep_stale(force: bool = False) -> list[str]:
    """Unlink segments of this user whose server is gone and that nobody holds.

    Runs once per process before its first named segment.  A segment is removed only when its
    server's owner process is dead (pid + start time) *and* no process holds a lock on it, so a
    live server's memory is never touched.  Returns the removed paths.
    """
    global _swept
    with _lock:
        if _swept and not force:
            return []
        _swept = True
    removed: list[str] = []
    own = _identity.server_id if _identity else None
    for path in glob.glob(os.path.join(shm_dir(), f"{PREFIX}{os.geteuid()}.*.*")):
        sid = os.path.basename(path).split(".")[2]
        m = _SID_RE.match(sid)
        if sid == own or (m and process_alive(int(m[1]), None if m[2] == "None" else int(m[2]))):
            continue
        with contextlib.suppress(OSError):
            old = m or time.time() - os.lstat(path).st_mtime >= STALE_MIN_AGE
            if old and unlink_if_unused(path):
                removed.append(path)
    if removed:
        log.warning("removed %d stale shared-memory segment(s) of dead servers", len(removed))
    return removed


# -- janitor for workers of a foreign supervisor ------------------------------------------------


def _ensure_janitor() -> None:
    """Start, once per server, the process that unlinks the server's segments once its owner
    (this process, the launcher, or the supervisor of our worker) has exited and no process uses
    them any more.  It covers what ``atexit`` cannot: uvicorn re-raising SIGTERM after a graceful
    shutdown, a SIGKILL, and supervisors that never run our code.  ``ZEAL_JANITOR=0`` disables it
    (segments are then removed at exit, or by the sweep of the next server)."""
    ident = server_identity()
    if ident.owner_pid is None or os.environ.get("ZEAL_JANITOR") == "0":
        return
    prefix = f"{PREFIX}{os.geteuid()}.{ident.server_id}."
    try:
        fd = os.open(
            os.path.join(shm_dir(), prefix + "janitor"),
            os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o600,
        )
    except FileExistsError:
        return
    os.close(fd)
    try:
        pidfd = os.pidfd_open(ident.owner_pid)
    except OSError:
        return  # the owner is gone already: the next server's sweep cleans up
    try:
        if not process_alive(ident.owner_pid, ident.owner_start):
            return  # the pid now belongs to another process
        # Run the file, not the module: the janitor needs the standard library only, and
        # importing the package would cost a server start-up hundreds of milliseconds.  It
        # waits on the owner's pidfd, opened here where the owner's identity was checked.
        janitor = os.path.join(os.path.dirname(os.path.abspath(__file__)), "janitor.py")
        subprocess.run(
            [sys.executable, "-S", janitor, str(pidfd), prefix, shm_dir()],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(pidfd,),
            start_new_session=True,
            env={"PATH": os.environ.get("PATH", "")},
            check=False,
        )  # the janitor forks and its first process exits at once (no zombie left)
    finally:
        os.close(pidfd)


# -- private copies ----------------------------------------------------------------------------


def verify_shared() -> list[str]:
    """Check, at worker start-up, that this process uses the same memory as its siblings.

    Raises PrivateCopyError when a named table's segment was replaced or removed under us (our
    copy is private now), or when this process believes it is a whole server although its
    parent is a multi-worker supervisor.  Returns warnings that are not fatal (none today).
    """
    for obj, path, kind in held_segments():
        if obj.closed or path is None or path in _released:
            continue  # memfd segments: created by the owner or refused at creation
        try:
            private = os.fstat(obj._fileno()).st_ino != os.stat(path).st_ino
            why = "was replaced by another segment"
        except FileNotFoundError:
            private, why = True, "no longer exists"
        if private:
            raise PrivateCopyError(
                f"{kind} {obj.name!r}: its segment {path} {why}, so this worker's copy is "
                "private and other workers will not see its writes"
            )
    ident = server_identity()
    if ident.is_owner and ident.how == "self":
        parent = cmdline(os.getppid()).replace(b"\0", b" ")
        if re.search(rb"(gunicorn|hypercorn|granian|--workers[ =]?[2-9]|-w [2-9])", parent):
            raise PrivateCopyError(
                "this process looks like a worker of a multi-worker server "
                f"({parent[:120]!r}) but was detected as a single-process server: every worker "
                "would get its own tables. Start it with `zeal-asgi run` or set ZEAL_SERVER_ID "
                "to the same value in every worker"
            )
    return []
