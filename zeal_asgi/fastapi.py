"""FastAPI dependencies: the app's ``Zeal``, ``Store``, ``Cache``, counters and WebSocket router.

Every provider takes the connection (``HTTPConnection``), so the same ``Depends(...)`` works in
HTTP and WebSocket routes.  They read ``scope["state"]["zeal"]``, which ``zeal.lifespan`` (lifespan
state) and :class:`~zeal_asgi.ZealMiddleware` both put there; plain Starlette code gets the same
objects from ``request.state.zeal``: ``.store``, and the ``Cache`` / ``WSRouter`` made with
``zeal=zeal`` / ``WSRouter(zeal)`` (they are among ``zeal.services``).

Example::

    from zeal_asgi.fastapi import StoreDep, get_counter

    requests = Counter(0, name="requests")

    @app.get("/hits")
    async def hits(store: StoreDep, n: Annotated[Counter, Depends(get_counter("requests"))]):
        return {"total": await n.increment(), "rows": await store.count("demo_table")}

The providers are ``async def`` on purpose: FastAPI runs plain ``def`` dependencies in a thread
pool, which would cost more than everything else these providers do.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Annotated, Any, TypeVar, cast

from starlette.requests import HTTPConnection

from zeal_asgi.app import Zeal
from zeal_asgi.cache.facade import Cache
from zeal_asgi.errors import ConfigError, require
from zeal_asgi.messaging.ws.router import WSRouter
from zeal_asgi.store import Store
from zeal_asgi.store.counter import Counter

__all__ = [
    "CacheDep",
    "StoreDep",
    "WSRouterDep",
    "ZealDep",
    "get_cache",
    "get_counter",
    "get_store",
    "get_ws_router",
    "get_zeal",
    "zeal_of",
]

_NO_ZEAL = (
    "no Zeal on this app: pass FastAPI(lifespan=zeal.lifespan) or "
    "app.add_middleware(ZealMiddleware, zeal=zeal)"
)


def zeal_of(conn: HTTPConnection) -> Zeal:
    """The ``Zeal`` of the app serving ``conn`` (also for plain Starlette endpoints).

    Raises:
        ConfigError: the app has neither ``zeal.lifespan`` nor ``ZealMiddleware``.
    """
    state = conn.scope.get("state")
    zeal = state.get("zeal") if state is not None else None
    if zeal is None:
        raise ConfigError(_NO_ZEAL)
    return cast(Zeal, zeal)


async def get_zeal(conn: HTTPConnection) -> Zeal:
    """``Depends(get_zeal)``: the app's :class:`~zeal_asgi.Zeal`."""
    return zeal_of(conn)


async def get_store(conn: HTTPConnection) -> Store:
    """``Depends(get_store)``: the app's :class:`~zeal_asgi.Store` (``zeal.store``)."""
    return zeal_of(conn).store


async def get_cache(conn: HTTPConnection) -> Cache:
    """``Depends(get_cache)``: the app's :class:`~zeal_asgi.cache.Cache`.

    That is the cache registered with the app (``Cache.init(..., zeal=zeal)``), else the
    default one (``Cache.init(...)``).

    Raises:
        ConfigError: no ``Cache.init(...)`` ran before the workers started.
    """
    cache = _service(zeal_of(conn), Cache)
    return cache if cache is not None else Cache.default()


def get_counter(
    name: str, initial: int = 0, *, store: Store | None = None
) -> Callable[[HTTPConnection], Awaitable[Counter]]:
    """A dependency returning the counter called ``name``, declared now if it does not exist.

    Call it where the route is defined (module level, before workers start), so the counter's
    shared memory is allocated in the master like any other ``Counter``.  ``store`` is the
    store it is declared on (``Store.default()`` by default); at request time the counter of
    that name on the app's own store is returned::

        @app.get("/n")
        async def n(c: Annotated[Counter, Depends(get_counter("requests"))]):
            return {"n": await c.increment()}
    """
    home = store if store is not None else Store.default()
    declared: Counter = home.counters().get(name) or Counter(initial, name=name, store=home)

    async def dependency(conn: HTTPConnection) -> Counter:
        store = zeal_of(conn).store
        if store is home:
            return declared
        found: Counter | None = store.counters().get(name)
        if found is None:
            raise ConfigError(
                f"counter {name!r} is not declared on this app's store; declare "
                f"Counter(..., name={name!r}, store=zeal.store) before the workers start"
            )
        return found

    dependency.__name__ = f"get_counter_{name}"
    return dependency


async def get_ws_router(conn: HTTPConnection) -> WSRouter:
    """``Depends(get_ws_router)``: the app's :class:`~zeal_asgi.ws.WSRouter` (``WSRouter(zeal)``).

    Raises:
        ConfigError: no router was created for this app's ``Zeal``.
    """
    router = _service(zeal_of(conn), WSRouter)
    if router is None:
        raise ConfigError(
            "no WSRouter on this app: create one with WSRouter(zeal) before the workers start"
        )
    return router


S = TypeVar("S")


def _service(zeal: Zeal, cls: type[S]) -> S | None:
    """The first of ``zeal``'s services that is a ``cls`` (Cache and WSRouter register there)."""
    return next((service for service in zeal.services if isinstance(service, cls)), None)


# The ``Annotated`` aliases need FastAPI's ``Depends``; they are made on first use, so the
# providers above (which plain Starlette code can call too) import without FastAPI installed.
_ALIASES: dict[str, tuple[Any, Callable[..., Any]]] = {
    "ZealDep": (Zeal, get_zeal),
    "StoreDep": (Store, get_store),
    "CacheDep": (Cache, get_cache),
    "WSRouterDep": (WSRouter, get_ws_router),
}

if TYPE_CHECKING:
    from fastapi import Depends

    ZealDep = Annotated[Zeal, Depends(get_zeal)]
    """``zeal: ZealDep`` in a route signature."""
    StoreDep = Annotated[Store, Depends(get_store)]
    """``store: StoreDep`` in a route signature."""
    CacheDep = Annotated[Cache, Depends(get_cache)]
    """``cache: CacheDep`` in a route signature."""
    WSRouterDep = Annotated[WSRouter, Depends(get_ws_router)]
    """``router: WSRouterDep`` in a route signature (HTTP or WebSocket)."""


def __getattr__(name: str) -> Any:
    if name in _ALIASES:
        fastapi = require("fastapi", extra="fastapi", feature=f"zeal_asgi.fastapi.{name}")
        tp, provider = _ALIASES[name]
        return cast(Any, Annotated)[tp, fastapi.Depends(provider)]  # tp is a runtime value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
