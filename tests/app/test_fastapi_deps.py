"""``zeal_asgi.fastapi``: the dependencies in HTTP and WebSocket routes, and the Starlette way."""

from __future__ import annotations

import os
import uuid
from typing import Annotated, Any

import pytest
from fastapi import Depends, FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.testclient import TestClient

from zeal_asgi import Counter, Store, Zeal, ZealMiddleware
from zeal_asgi.errors import ConfigError
from zeal_asgi.fastapi import (
    StoreDep,
    ZealDep,
    get_counter,
    get_store,
    get_ws_router,
    get_zeal,
    zeal_of,
)
from zeal_asgi.store.backends.table import TableBackend


def _table(store: Store) -> str:
    name = f"deps_{uuid.uuid4().hex[:8]}"
    store.make(name, 16, {"name": (Store.TYPE_STRING, 16), "n": (Store.TYPE_INT, 4)})
    return name


def _app(zeal: Zeal, *, lifespan: bool = True, middleware: bool = True) -> FastAPI:
    app = FastAPI(lifespan=zeal.lifespan) if lifespan else FastAPI()
    if middleware:
        app.add_middleware(ZealMiddleware, zeal=zeal)
    return app


@pytest.mark.parametrize(("lifespan", "middleware"), [(True, True), (True, False), (False, True)])
def test_http_deps_resolve_the_apps_zeal_and_store(
    table_zeal: Zeal, lifespan: bool, middleware: bool
) -> None:
    """Either the lifespan or the middleware is enough to make the dependencies work."""
    store = table_zeal.store
    table = _table(store)
    app = _app(table_zeal, lifespan=lifespan, middleware=middleware)

    @app.get("/rows/{key}")
    async def put(key: str, store: StoreDep, zeal: ZealDep) -> dict[str, Any]:
        await store.set(table, key, {"name": key, "n": 1})
        return {
            "row": await store.get(table, key),
            "same_zeal": zeal is table_zeal,
            "started": zeal.started,
        }

    with TestClient(app) as client:
        body = client.get("/rows/alice").json()
    assert body == {"row": {"name": "alice", "n": 1}, "same_zeal": True, "started": True}
    assert store.table(table).get("alice") == {"name": "alice", "n": 1}


def test_plain_depends_spelling_works(table_zeal: Zeal) -> None:
    """``Depends(get_store)`` / ``Depends(get_zeal)`` as in API.md."""
    app = _app(table_zeal)

    @app.get("/kind")
    async def kind(
        store: Store = Depends(get_store),  # noqa: B008 - FastAPI's documented spelling
        zeal: Zeal = Depends(get_zeal),  # noqa: B008
    ) -> dict[str, str]:
        return {"kind": str(store.kind), "zeal_store_kind": str(zeal.store.kind)}

    with TestClient(app) as client:
        assert client.get("/kind").json() == {"kind": "table", "zeal_store_kind": "table"}


def test_counter_dependency_is_shared_and_declared_once(table_zeal: Zeal) -> None:
    store = table_zeal.store
    name = f"hits-{uuid.uuid4().hex[:8]}"
    dep = get_counter(name, store=store)
    again = get_counter(name, store=store)  # a second route asking for it reuses the same one
    app = _app(table_zeal)

    @app.get("/a")
    async def a(c: Counter = Depends(dep)) -> dict[str, int]:  # noqa: B008 - a local dep
        return {"n": await c.increment()}

    @app.get("/b")
    async def b(c: Counter = Depends(again)) -> dict[str, int]:  # noqa: B008
        return {"n": await c.increment(10)}

    with TestClient(app) as client:
        assert client.get("/a").json() == {"n": 1}
        assert client.get("/b").json() == {"n": 11}
        assert client.get("/a").json() == {"n": 12}
    counters: dict[str, Any] = store._counters
    assert counters[name].atomic.get() == 12


def test_counter_dependency_refuses_a_store_without_that_counter(table_zeal: Zeal) -> None:
    """A counter declared on another store is not silently created per worker at request time."""
    other_backend = TableBackend(namespace=f"o-{uuid.uuid4().hex[:8]}")
    other = Store(backend=other_backend)
    try:
        dep = get_counter(f"elsewhere-{uuid.uuid4().hex[:6]}", store=other)
        app = _app(table_zeal)

        @app.get("/c")
        async def c(counter: Counter = Depends(dep)) -> dict[str, int]:  # noqa: B008
            return {"n": await counter.increment()}

        with TestClient(app, raise_server_exceptions=True) as client, pytest.raises(ConfigError):
            client.get("/c")
    finally:
        other_backend.close_all()


def test_websocket_route_gets_the_same_dependencies(table_zeal: Zeal) -> None:
    store = table_zeal.store
    table = _table(store)
    name = f"ws-{uuid.uuid4().hex[:8]}"
    counter_dep = get_counter(name, store=store)
    app = _app(table_zeal)

    @app.websocket("/ws")
    async def ws(
        websocket: WebSocket,
        store: StoreDep,
        zeal: ZealDep,
        counter: Counter = Depends(counter_dep),  # noqa: B008 - a local dependency
    ) -> None:
        await websocket.accept()
        key = await websocket.receive_text()
        await store.incr(table, key, "n")
        await websocket.send_json(
            {
                "row": await store.get(table, key),
                "n": await counter.increment(),
                "same_zeal": zeal is table_zeal,
            }
        )
        await websocket.close()

    with TestClient(app) as client:
        for expected in (1, 2):
            with client.websocket_connect("/ws") as conn:
                conn.send_text("k")
                assert conn.receive_json() == {
                    "row": {"name": "", "n": expected},
                    "n": expected,
                    "same_zeal": True,
                }


def test_without_zeal_the_dependency_says_what_to_add() -> None:
    app = FastAPI()

    @app.get("/s")
    async def s(store: StoreDep) -> dict[str, str]:
        return {"kind": str(store.kind)}

    with TestClient(app) as client, pytest.raises(ConfigError, match="ZealMiddleware"):
        client.get("/s")


def test_ws_router_dependency_without_a_router_is_a_clear_error(table_zeal: Zeal) -> None:
    app = _app(table_zeal)

    @app.get("/r")
    async def r(router: Annotated[Any, Depends(get_ws_router)]) -> dict[str, str]:
        return {"router": type(router).__name__}

    with TestClient(app) as client, pytest.raises(ConfigError, match="WSRouter"):
        client.get("/r")


def test_plain_starlette_gets_the_same_objects_from_request_state(table_zeal: Zeal) -> None:
    store = table_zeal.store
    table = _table(store)

    async def endpoint(request: Request) -> JSONResponse:
        zeal: Zeal = request.state.zeal
        await zeal.store.set(table, "k", {"n": 7})
        return JSONResponse(
            {
                "n": await zeal.store.get(table, "k", "n"),
                "zeal_of": zeal_of(request) is zeal,
                "pid": os.getpid(),
            }
        )

    app = Starlette(routes=[Route("/", endpoint)])
    app.add_middleware(ZealMiddleware, zeal=table_zeal)
    with TestClient(app) as client:
        body = client.get("/").json()
    assert body["n"] == 7 and body["zeal_of"] is True
    assert table_zeal.started is False  # the middleware ran startup and shutdown around it
