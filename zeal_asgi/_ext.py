"""The only import of the compiled extension.

There is no pure-Python fallback: a missing or broken build fails here, loudly, with the
command that rebuilds it.
"""

from __future__ import annotations

try:
    from . import _shmtable
except ImportError as exc:  # pragma: no cover - exercised by a broken install only
    raise ImportError(
        "zeal_asgi's compiled extension zeal_asgi._shmtable is missing or broken "
        f"({exc}). Reinstall from source so it is compiled: pip install -e . "
        "(needs a C compiler and the Python headers; Cython is fetched at build time)"
    ) from exc

Table = _shmtable.Table
Atomic = _shmtable.Atomic
HAS_EXT = True

__all__ = ["HAS_EXT", "Atomic", "Table"]
