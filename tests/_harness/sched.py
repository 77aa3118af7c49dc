"""The time a loaded machine takes from a test: what a wall-clock upper bound must leave out.

On 2 shared cores a test's thread can sit runnable, waiting for a CPU, for tens of milliseconds
at a time.  A bound on how fast the code under test answers subtracts that wait (the kernel
counts it per thread) from the wall-clock time it measured: a wait on a socket, a timer or a
lock is not in it, so a call that waits when it should not still fails the bound.
"""

from __future__ import annotations

import time


def run_delay() -> float:
    """Seconds this thread has spent runnable but waiting for a CPU (the scheduler's run delay,
    ``/proc/thread-self/schedstat``)."""
    with open("/proc/thread-self/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


class Stopwatch:
    """Wall-clock seconds since it started, less the time this thread waited for a CPU."""

    def __init__(self) -> None:
        self.start = time.monotonic()
        self._delay = run_delay()

    def wall(self) -> float:
        """Wall-clock seconds since the start (for lower bounds: a timer never fires early)."""
        return time.monotonic() - self.start

    def own(self) -> float:
        """Wall-clock seconds since the start less the CPU wait (for upper bounds)."""
        return self.wall() - (run_delay() - self._delay)
