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
"""

from __future__ import annotations

import atexit
import contextlib
import errno
import fcntl
import hashlib
import logging
import multiprocessing
import os
import re
import secrets
import stat
import subprocess
import sys
import threading
import time
import weakref
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from zeal_asgi.errors import (
    PrivateCopyError,
    SchemaError,
    ShmAbiMismatchError,
    ShmCapacityError,
    ShmError,
    ShmNameTakenError,
    ShmPermissionError,
)
from zeal_asgi.shm.schema import Schema

if TYPE_CHECKING:
    from zeal_asgi.shm import Atomic, Table

__all__ = [
    "ServerIdentity",
    "attach_path",
    "destroy",
    "open_atomic",
    "open_table",
    "segment_path",
    "segments_of_server",
    "server_identity",
    "server_ids",
    "shm_dir",
    "sweep_stale",
    "verify_shared",
]

log = logging.getLogger("zeal_asgi.shm")

PREFIX = "zeal."
_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
ATTACH_TIMEOUT = 10.0
STALE_MIN_AGE = 10.0


def shm_dir() -> str:
    """Directory of named segments: ``ZEAL_SHM_DIR`` or ``/dev/shm``."""
    return os.environ.get("ZEAL_SHM_DIR", "/dev/shm")


# -- server identity ---------------------------------------------------------------------------


def _stat_fields(pid: int) -> list[str] | None:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read().decode("ascii", "replace")
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split()


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (field 22 of /proc/pid/stat)."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def process_alive(pid: int, start: int | None) -> bool:
    """True when ``pid`` runs and (if given) started at ``start`` (so a reused pid is not it)."""
    if pid <= 0:
        return False
    now = process_start_time(pid)
    if now is None:
        return False
    fields = _stat_fields(pid)
    if fields and fields[0] == "Z":
        return False
    return start is None or now == start


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
    parent = _cmdline(ppid)
    if parent and parent == _cmdline(os.getpid()):
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
            owner_raw = os.environ.get("ZEAL_SERVER_OWNER_PID", "")
            owner = int(owner_raw) if owner_raw.isdigit() else None
            ident = ServerIdentity(
                env,
                owner,
                process_start_time(owner) if owner else None,
                owner == os.getpid(),
                "env",
            )
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
            ident = ServerIdentity(f"{master}-{start}", master, start, how == "self", how)
        _identity = ident
        return ident


def _reset_after_fork() -> None:
    global _identity, _swept
    _identity = None
    _swept = False


os.register_at_fork(after_in_child=_reset_after_fork)


def _uid() -> int:
    return os.geteuid()


def segment_path(kind: str, name: str, server_id: str | None = None) -> str:
    """Path of the named segment (``kind`` ``t``: table, ``a``: atomic) of a server (this
    process's by default)."""
    sid = server_id or server_identity().server_id
    ns = os.environ.get("ZEAL_NAMESPACE", "")
    digest = hashlib.blake2b(f"{ns}\0{kind}\0{name}".encode(), digest_size=8).hexdigest()
    return os.path.join(shm_dir(), f"{PREFIX}{_uid()}.{sid}.{kind}.{digest}")


def segments_of_server(server_id: str | None = None) -> list[str]:
    """Paths of the named segments of a server (this process's server by default)."""
    sid = server_id or server_identity().server_id
    start = f"{PREFIX}{_uid()}.{sid}."
    try:
        names = os.listdir(shm_dir())
    except OSError:
        return []
    return sorted(os.path.join(shm_dir(), n) for n in names if n.startswith(start))


def server_ids() -> list[str]:
    """Ids of this user's servers that have segments here (live or left by a killed one)."""
    mine = f"{PREFIX}{_uid()}."
    try:
        names = os.listdir(shm_dir())
    except OSError:
        return []
    return sorted({n[len(mine) :].split(".")[0] for n in names if n.startswith(mine)})


def display_name(name: str | None) -> str | None:
    """What messages call a segment: its name after the last ``:``, the part before it being
    the owner's scope (``store:demo`` is the Store's table ``demo``)."""
    return name.rpartition(":")[2] if name else name


# -- registry of what this process holds -------------------------------------------------------


@dataclass
class _Held:
    path: str | None
    creator_pid: int
    kind: str
    name: str | None


_held: weakref.WeakKeyDictionary[Any, _Held] = weakref.WeakKeyDictionary()
_created_paths: dict[str, int] = {}  # path -> pid of the process that created it


def held_segments() -> Iterator[tuple[Any, str | None, str]]:
    """(object, path, kind) of every live table/atomic this process has open."""
    with _lock:
        items = list(_held.items())
    for obj, h in items:
        yield obj, h.path, h.kind


def release_owned() -> list[str]:
    """Unlink the segments this process created, if it owns the server; the paths unlinked.

    Runs at exit, and at the end of the lifespan of a single-process server: uvicorn re-raises
    SIGTERM after a graceful shutdown, so its process dies by the signal and skips ``atexit``.
    Mappings stay valid in every process that has them; only the names go away.
    """
    done = [p for p, creator in _created_paths.items() if creator == os.getpid()]
    _unlink_owned()
    _released.update(done)
    return done


_released: set[str] = set()
"""Paths this process unlinked on purpose: other handles of them in this process are not
private copies by accident (tests destroy what they made while an app still maps it)."""


@atexit.register
def _unlink_owned() -> None:
    """The owning process unlinks what it created; forked children inherit this hook, so the
    pid check keeps a gunicorn worker's exit from deleting the server's memory."""
    pid = os.getpid()
    ident = _identity
    for path, creator in list(_created_paths.items()):
        if creator != pid:
            continue
        if ident is not None and not ident.is_owner:
            continue  # a worker of a foreign supervisor: the janitor owns cleanup
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        _created_paths.pop(path, None)


# -- create / attach ---------------------------------------------------------------------------


def _capacity_error(what: str, needed: int, exc: OSError | None = None) -> ShmCapacityError:
    d = shm_dir()
    try:
        st = os.statvfs(d)
        free, total = st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize
    except OSError:
        free = total = 0
    mib = max(64, (needed * 2 // (1024 * 1024)) + 64)
    msg = (
        f"zeal_asgi: {what} needs {needed:,} bytes of shared memory but {d} has {free:,} bytes "
        f"free of {total:,}"
        + (" (64 MiB is the Docker/Kubernetes default)" if total <= 64 * 1024 * 1024 else "")
        + f". Fix one of: docker run --shm-size={mib}m | compose: shm_size: {mib}m | Kubernetes: "
        f"mount an emptyDir {{medium: Memory, sizeLimit: {mib}Mi}} at /dev/shm | fewer max_rows "
        "| ZEAL_SHM_BACKEND=memfd (not limited by /dev/shm; counted against the memory limit)"
    )
    err = ShmCapacityError(errno.ENOSPC, msg)
    err.needed = needed  # type: ignore[attr-defined]
    err.free = free  # type: ignore[attr-defined]
    err.total = total  # type: ignore[attr-defined]
    if exc is not None:
        err.__cause__ = exc
    return err


def _reserve(fd: int, size: int, what: str) -> None:
    try:
        st: os.statvfs_result | None = os.statvfs(shm_dir())
    except OSError:
        st = None
    if st is not None and st.f_bavail * st.f_frsize < size:
        raise _capacity_error(what, size)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise _capacity_error(what, size, exc) from exc
        raise


def _check_ours(fd: int, path: str) -> os.stat_result:
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise ShmNameTakenError(errno.EEXIST, f"{path} is not a regular file: not ours")
    if st.st_uid != _uid():
        raise ShmNameTakenError(
            errno.EEXIST,
            f"{path} belongs to uid {st.st_uid}, not {_uid()}: refusing to attach (squatted name)",
        )
    if st.st_mode & 0o077:
        raise ShmPermissionError(
            errno.EACCES,
            f"{path} has mode {stat.S_IMODE(st.st_mode):o}; segments must be 0600: refusing to "
            "attach",
        )
    return st


def _memfd_wanted() -> bool:
    backend = os.environ.get("ZEAL_SHM_BACKEND", "posix").lower()
    if backend not in ("posix", "memfd"):
        raise ShmError(f"ZEAL_SHM_BACKEND must be 'posix' or 'memfd', got {backend!r}")
    return backend == "memfd"


def _open_segment(
    kind: str,
    name: str | None,
    size: int,
    what: str,
    init: Any,
    attach: Any,
    discard: Any,
) -> tuple[str | None, str]:
    """Create or attach a segment; returns (path, state) with state ``created``, ``attached``
    or ``mismatch`` (an existing segment of another layout, still linked and not attached)."""
    if name is None or _memfd_wanted():
        # Private to this process and its forks: nothing to name, nothing that can leak.
        fd = os.memfd_create(f"zeal-{kind}-{name or 'anon'}", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size)
            try:
                os.posix_fallocate(fd, 0, size)
            except OSError as exc:
                raise _capacity_error(what, size, exc) from exc
            init(fd)
        except BaseException:
            os.close(fd)
            raise
        if name is not None and not server_identity().is_owner:
            log.warning(
                "%s uses ZEAL_SHM_BACKEND=memfd in a worker: it is private to this process "
                "and its forks; allocate it in the master (the launcher or gunicorn --preload)",
                what,
            )
        return None, "created"
    sweep_stale()
    path = segment_path(kind, name)
    deadline = time.monotonic() + ATTACH_TIMEOUT
    while True:
        # Someone has the name: attach, after checking it is really ours.
        try:
            fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
        except FileNotFoundError:
            pass
        except OSError as exc:
            if exc.errno in (errno.EACCES, errno.EPERM, errno.ELOOP):
                raise ShmNameTakenError(
                    errno.EEXIST, f"{path} exists and cannot be opened by us: squatted name"
                ) from exc
            raise
        else:
            try:
                _check_ours(fd, path)
                state = _attach_locked(fd, path, deadline, attach)
            except BaseException:
                os.close(fd)
                raise
            if state == "retry":
                os.close(fd)
                continue
            if state == "mismatch":
                os.close(fd)
            return path, state
        if _create_and_publish(path, size, what, init, discard):
            return path, "created"
        # another process published the name first: attach to theirs


def _create_and_publish(path: str, size: int, what: str, init: Any, discard: Any) -> bool:
    """Build a complete segment under a private name, then link it into place.

    The name therefore never shows a half-initialised segment, whatever dies when: an attacher
    either finds nothing or a segment whose header is complete.  False when another process
    linked the name first (ours is thrown away)."""
    tmp = f"{path}.tmp.{secrets.token_hex(6)}"
    fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    mapped = False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # a sweep never takes a segment being built
        os.fchmod(fd, 0o600)
        _reserve(fd, size, what)
        init(fd)
        mapped = True
        fcntl.flock(fd, fcntl.LOCK_SH)
        try:
            os.link(tmp, path)
        except FileExistsError:
            discard()  # unmaps; the fd stays ours
            mapped = False
            os.close(fd)
            return False
    except BaseException:
        if mapped:
            discard()
        os.close(fd)
        raise
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
    with _lock:
        _created_paths[path] = os.getpid()
    _ensure_janitor()
    return True


def _attach_locked(fd: int, path: str, deadline: float, attach: Any) -> str:
    """Attach under a shared flock (which marks this process as a user of the segment)."""
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            # a sweep or a janitor probing it with LOCK_EX for a moment
            if time.monotonic() > deadline:
                raise ShmError(errno.ETIMEDOUT, f"{path}: could not take a shared lock") from None
            time.sleep(0.002)
            continue
        st = os.fstat(fd)
        if st.st_nlink == 0:
            return "retry"  # unlinked (a sweep or a replace): look the name up again
        rc = attach(fd, st.st_size)
        if rc == 0:
            return "attached"
        if rc == 2:
            return "mismatch"
        raise ShmAbiMismatchError(
            errno.EINVAL, f"{path}: not an initialised segment (no header): refusing to attach"
        )


def _schema_conflict(path: str | None, stored: Schema, wanted: Schema, name: str) -> None:
    raise ShmAbiMismatchError(
        errno.EINVAL,
        f"table {name!r}: the shared segment {path} has another schema than this process "
        f"declares (segment vs declared: {stored.difference(wanted)}); every worker must "
        "declare the same schema",
    )


def open_table(
    table: Table,
    name: str | None,
    max_rows: int,
    columns: Mapping[str, Any],
    *,
    key_size: int = 64,
    lock_timeout: float = 1.0,
    allow_nan: bool = False,
    binary_keys: bool = False,
) -> None:
    """Create or attach the segment of ``table`` (called by ``Table.__init__``)."""
    if name is not None and (not isinstance(name, str) or not name):
        raise SchemaError(f"table name must be a non-empty str, got {name!r}")
    schema = Schema.declare(
        columns, key_size=key_size, allow_nan=allow_nan, binary_keys=binary_keys
    )
    geo = schema.geometry(max_rows)
    blob = schema.to_blob()
    what = f"table {name!r} ({max_rows:,} rows of {schema.row_size} bytes)"
    stored_schemas: list[Schema] = []

    def init(fd: int) -> None:
        table._map_new(fd, geo.as_tuple(), blob, secrets.token_bytes(16), secrets.token_bytes(16))

    def attach(fd: int, size: int) -> int:
        rc: int = table._map_existing(fd, size)
        if rc == 0 and table._stored_schema() != blob:
            stored_schemas.append(Schema.from_blob(table._stored_schema()))
            table._detach()
            return 2
        return rc

    for _ in range(3):
        path, state = _open_segment("t", name, geo.total_size, what, init, attach, table._detach)
        if state != "mismatch":
            break
        assert path is not None and name is not None
        # A leftover of an earlier run of this server (e.g. before a --reload): replace it when
        # nobody uses it any more, otherwise refuse loudly.
        if not _unlink_if_unused(path):
            _schema_conflict(path, stored_schemas[-1], schema, name)
        log.warning("table %r: replaced an unused segment that had another schema", name)
    else:  # pragma: no cover - someone keeps recreating it
        raise ShmError(errno.EAGAIN, f"table {name!r}: segment keeps changing under us")
    table._finish(schema, display_name(name), path, lock_timeout)
    with _lock:
        _held[table] = _Held(path, os.getpid(), "table", name)


def _unlink_if_unused(path: str) -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        return True
    try:
        _check_ours(fd, path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        os.unlink(path)
        return True
    finally:
        os.close(fd)


def open_atomic(atomic: Atomic, name: str | None, initial: int) -> None:
    """Create or attach the segment of ``atomic`` (called by ``Atomic.__init__``)."""
    if name is not None and (not isinstance(name, str) or not name):
        raise SchemaError(f"atomic name must be a non-empty str, got {name!r}")
    size = atomic._segment_size()

    def init(fd: int) -> None:
        atomic._map_new(fd, size, secrets.token_bytes(16), initial)

    def attach(fd: int, actual: int) -> int:
        rc: int = atomic._map_existing(fd, actual)
        return rc

    path, state = _open_segment("a", name, size, f"atomic {name!r}", init, attach, atomic._detach)
    if state == "mismatch":  # pragma: no cover - atomics have a single layout
        raise ShmAbiMismatchError(
            errno.EINVAL, f"atomic {name!r}: segment {path} has another layout"
        )
    atomic._finish(display_name(name), path)
    with _lock:
        _held[atomic] = _Held(path, os.getpid(), "atomic", name)


def attach_path(path: str, name: str | None = None) -> Table | Atomic:
    """Attach to the existing segment at ``path``, a table or an atomic, without ever creating
    one (``zeal-asgi inspect`` reads another server's figures this way); close it after use.

    Raises:
        FileNotFoundError: the segment is gone.
        ShmError: it is not ours, not a segment, or not initialised.
    """
    from zeal_asgi.shm.ext import Atomic, Table

    kind = os.path.basename(path).split(".")[-2]
    obj: Any = Table.__new__(Table) if kind == "t" else Atomic.__new__(Atomic)
    fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        _check_ours(fd, path)
        state = _attach_locked(fd, path, time.monotonic() + ATTACH_TIMEOUT, obj._map_existing)
    except BaseException:
        os.close(fd)
        raise
    if state != "attached":
        os.close(fd)
        raise ShmError(errno.EAGAIN, f"{path}: the segment is being replaced")
    if kind == "t":
        obj._finish(Schema.from_blob(obj._stored_schema()), name, path, 1.0)
    else:
        obj._finish(name, path)
    result: Table | Atomic = obj
    return result


def destroy(obj: Table | Atomic) -> None:
    """Close ``obj`` in this process and unlink its segment (other processes keep their
    mappings; new attachers get a fresh one).  For tests and explicit teardown."""
    path = obj.path
    obj.close()
    with _lock:
        _held.pop(obj, None)
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
    d = shm_dir()
    mine = f"{PREFIX}{_uid()}."
    try:
        names = os.listdir(d)
    except OSError:
        return removed
    own_sid = _identity.server_id if _identity else None
    for n in names:
        if not n.startswith(mine):
            continue
        parts = n[len(mine) :].split(".")
        if len(parts) < 2 or parts[0] == own_sid:
            continue
        m = _SID_RE.match(parts[0])
        path = os.path.join(d, n)
        if m:
            pid = int(m.group(1))
            start = int(m.group(2)) if m.group(2) != "None" else None
            if process_alive(pid, start):
                continue
        else:
            try:
                if time.time() - os.lstat(path).st_mtime < STALE_MIN_AGE:
                    continue
            except OSError:
                continue
        if _unlink_if_unused_quiet(path):
            removed.append(path)
    if removed:
        log.warning("removed %d stale shared-memory segment(s) of dead servers", len(removed))
    return removed


def _unlink_if_unused_quiet(path: str) -> bool:
    try:
        return _unlink_if_unused(path)
    except (OSError, ShmError):
        return False


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
    marker = os.path.join(shm_dir(), f"{PREFIX}{_uid()}.{ident.server_id}.janitor")
    try:
        fd = os.open(
            marker, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
    except FileExistsError:
        return
    os.close(fd)
    # Run the file, not the module: the janitor needs the standard library only, and importing
    # the package would cost a server start-up hundreds of milliseconds.
    cmd = [
        sys.executable,
        "-S",
        os.path.join(os.path.dirname(os.path.abspath(__file__)), "janitor.py"),
        str(ident.owner_pid),
        str(ident.owner_start),
        f"{PREFIX}{_uid()}.{ident.server_id}.",
        shm_dir(),
    ]
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        close_fds=True,
        start_new_session=True,
        env={"PATH": os.environ.get("PATH", "")},
    )
    proc.wait()  # the janitor forks and its first process exits at once (no zombie left)


# -- private copies ----------------------------------------------------------------------------


def verify_shared() -> list[str]:
    """Check, at worker start-up, that this process uses the same memory as its siblings.

    Raises PrivateCopyError when a named table's segment was replaced or removed under us (our
    copy is private now), or when this process believes it is a whole server although its
    parent is a multi-worker supervisor.  Returns warnings that are not fatal.
    """
    warnings: list[str] = []
    ident = server_identity()
    for obj, path, kind in held_segments():
        if obj.closed or path is None:
            if path is None and obj.name is not None and not ident.is_owner:
                warnings.append(
                    f"{kind} {obj.name!r} is private to this worker (memfd); "
                    "allocate it in the master"
                )
            continue
        try:
            on_disk = os.stat(path)
        except FileNotFoundError:
            if path in _released:
                continue  # this process unlinked it on purpose (destroy/release_owned)
            raise PrivateCopyError(
                f"{kind} {obj.name!r}: its segment {path} no longer exists, so this worker's copy "
                "is private and other workers will not see its writes"
            ) from None
        if os.fstat(obj._fileno()).st_ino != on_disk.st_ino and path not in _released:
            raise PrivateCopyError(
                f"{kind} {obj.name!r}: {path} was replaced by another segment, so this worker's "
                "copy is private and other workers will not see its writes"
            )
    if ident.is_owner and ident.how == "self":
        parent = _cmdline(os.getppid()).replace(b"\0", b" ")
        if re.search(rb"(gunicorn|hypercorn|granian|--workers[ =]?[2-9]|-w [2-9])", parent):
            raise PrivateCopyError(
                "this process looks like a worker of a multi-worker server "
                f"({parent[:120]!r}) but was detected as a single-process server: every worker "
                "would get its own tables. Start it with `zeal-asgi run` or set ZEAL_SERVER_ID "
                "to the same value in every worker"
            )
    return warnings


def report_recovery(obj: Any) -> None:
    """Log a lock recovery (a process died holding a row lock; we repaired and went on)."""
    st = obj.stats()
    log.warning(
        "table %r: recovered a lock whose holder died (recoveries=%d, rows lost=%d)",
        obj.name,
        st["lock_recoveries"],
        st["rows_lost"],
    )
