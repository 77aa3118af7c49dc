"""Is this process still there?  The one answer every part of the package uses.

A process is known by its pid and its start time (field 22 of ``/proc/<pid>/stat``, in clock
ticks since boot), so a pid the kernel gave to a new process is not mistaken for the one that
held it.  A zombie counts as dead: it runs no code, holds no lock and will never renew a lease.
"""

from __future__ import annotations

from zeal_asgi.shm._shmtable import current_pid

__all__ = ["cmdline", "current_pid", "process_alive", "process_start_time"]

# current_pid: this process's pid without a system call, kept by the extension (renewed in a
# forked child before any code runs there), the one kept pid of the package


def _proc(pid: int, name: str) -> bytes:
    """The file ``/proc/<pid>/<name>``; empty when unreadable (no such process)."""
    try:
        with open(f"/proc/{pid}/{name}", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _stat_fields(pid: int) -> list[str] | None:
    raw = _proc(pid, "stat").decode("ascii", "replace") if pid > 0 else ""
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    return raw[raw.rindex(")") + 2 :].split() if raw else None


def process_start_time(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot; ``None`` when there is no such process."""
    fields = _stat_fields(pid)
    return int(fields[19]) if fields else None


def process_alive(pid: int, start: int | None = None) -> bool:
    """True when ``pid`` runs, is not a zombie and (if given) started at ``start``."""
    fields = _stat_fields(pid)
    return fields is not None and fields[0] != "Z" and start in (None, int(fields[19]))


def cmdline(pid: int) -> bytes:
    """The NUL-separated command line of ``pid`` (empty when unreadable)."""
    return _proc(pid, "cmdline")
