"""zeal_asgi: state shared by every worker of an ASGI server, scaling out to Redis/Valkey.

The public names: :class:`Zeal` and :class:`ZealMiddleware` (lifecycle), :class:`Store` (rows),
:class:`Counter`, :class:`Cache`, and the shared-memory primitives :class:`Table` and
:class:`Atomic`.
Backends (``zeal_asgi.store.redis``), FastAPI glue (``zeal_asgi.fastapi``) and the health router
(``zeal_asgi.health``) are imported by path.
"""

from __future__ import annotations

__version__ = "0.1.0"

from ._ext import Atomic, Table
from .cache import Cache
from .counter import Counter
from .errors import ZealError
from .middleware import ZealMiddleware
from .plugin import Zeal
from .settings import ZealSettings
from .store import Store, StoreBackendKind

__all__ = [
    "Atomic",
    "Cache",
    "Counter",
    "Store",
    "StoreBackendKind",
    "Table",
    "Zeal",
    "ZealError",
    "ZealMiddleware",
    "ZealSettings",
    "__version__",
]
