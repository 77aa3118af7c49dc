"""zeal_asgi: state shared by every worker of an ASGI server, scaling out to Redis/Valkey."""

from __future__ import annotations

__version__ = "0.1.0"

from ._ext import Atomic, Table

__all__ = ["Atomic", "Table", "__version__"]
