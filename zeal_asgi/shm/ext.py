"""The only import of the compiled extension.

There is no pure-Python fallback: a missing or broken build fails here, loudly, with the
command that rebuilds it.
"""

from __future__ import annotations

import os
import signal

try:
    from zeal_asgi.shm import _shmtable
except ImportError as exc:  # pragma: no cover - exercised by a broken install only
    raise ImportError(
        "zeal_asgi's compiled extension zeal_asgi.shm._shmtable is missing or broken "
        f"({exc}). Reinstall from source so it is compiled: pip install -e . "
        "(needs a C compiler and the Python headers; Cython is fetched at build time)"
    ) from exc


def _arm_crashpoint(spec: str) -> None:
    """``ZEAL_CRASH_AT=<point>:<nth>[:stop]``: raise SIGKILL (or SIGSTOP) at the nth time the C
    code passes crash point <point> (fault tests; the points are listed in ext/zt_core.h)."""
    parts = spec.split(":")
    sig = signal.SIGSTOP if parts[2:] == ["stop"] else signal.SIGKILL
    _shmtable._set_crashpoint(int(parts[0]), int(parts[1]) if len(parts) > 1 else 1, int(sig))


if os.environ.get("ZEAL_CRASH_AT"):
    _arm_crashpoint(os.environ["ZEAL_CRASH_AT"])

Table = _shmtable.Table
Atomic = _shmtable.Atomic
Cells = _shmtable.Cells
HAS_EXT = True

__all__ = ["HAS_EXT", "Atomic", "Cells", "Table"]
