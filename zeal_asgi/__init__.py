"""zeal_asgi: state shared by every worker of an ASGI server, scaling out to Redis/Valkey.

The public names: :class:`Zeal` and :class:`ZealMiddleware` (lifecycle), :class:`Store` (rows),
:class:`Counter`, :class:`Cache`, the shared-memory primitives :class:`Table` and
:class:`Atomic`, and :class:`WSRouter` (WebSocket clients and rooms across workers, also at
``zeal_asgi.ws``).
Backends (``zeal_asgi.store.backends``), FastAPI glue (``zeal_asgi.fastapi``) and the health router
(``zeal_asgi.health``) are imported by path.
"""

from __future__ import annotations

__version__ = "0.1.0"

from zeal_asgi.app import Zeal
from zeal_asgi.cache.facade import Cache
from zeal_asgi.errors import ZealError
from zeal_asgi.middleware import ZealMiddleware
from zeal_asgi.settings import ZealSettings
from zeal_asgi.shm.ext import Atomic, Table
from zeal_asgi.store import Store, StoreBackendKind
from zeal_asgi.store.counter import Counter
from zeal_asgi.ws import WSRouter

__all__ = [
    "Atomic",
    "Cache",
    "Counter",
    "Store",
    "StoreBackendKind",
    "Table",
    "WSRouter",
    "Zeal",
    "ZealError",
    "ZealMiddleware",
    "ZealSettings",
    "__version__",
]
