"""The time a loaded machine takes from a test: what a wall-clock upper bound must leave out.

On 2 shared cores a test's thread can sit runnable, waiting for a CPU, for tens of milliseconds
at a time.  A bound on how fast the code under test answers subtracts that wait (the kernel
counts it per thread) from the wall-clock time it measured: a wait on a socket, a timer or a
lock is not in it, so a call that waits when it should not still fails the bound.

A call answered by other processes (a server's workers, a subscriber) also leaves out the wait
of their main threads, which run the event loop: while the test's thread waits for a reply it is
not runnable, so the waits it adds up follow one another rather than overlap.
"""

from __future__ import annotations

import time


def run_delay(pid: int | None = None) -> float:
    """Seconds this thread (or the main thread of process ``pid``; 0 once it has exited) has
    spent runnable but waiting for a CPU: the scheduler's run delay, from ``schedstat``."""
    path = "/proc/thread-self/schedstat" if pid is None else f"/proc/{pid}/schedstat"
    try:
        with open(path) as f:
            return int(f.read().split()[1]) / 1e9
    except (FileNotFoundError, ProcessLookupError):
        return 0.0


class Stopwatch:
    """Wall-clock seconds since it started, less the time this thread, and the main threads of
    the processes ``pids`` that answer it, waited for a CPU."""

    def __init__(self, *pids: int) -> None:
        self._pids = pids
        self.start = time.monotonic()
        self._delay = self._run_delay()

    def _run_delay(self) -> float:
        return run_delay() + sum(run_delay(pid) for pid in self._pids)

    def wall(self) -> float:
        """Wall-clock seconds since the start (for lower bounds: a timer never fires early)."""
        return time.monotonic() - self.start

    def own(self) -> float:
        """Wall-clock seconds since the start less the CPU wait (for upper bounds)."""
        return self.wall() - (self._run_delay() - self._delay)
