"""Each worker moves its start-up heap into the collector's permanent generation, once, after
collecting the garbage: by default under ``zeal-asgi run``, with ``ZEAL_GC_FREEZE=1`` under the
other servers; elsewhere, and with ``ZEAL_GC_FREEZE=0``, the collector is left alone."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from tests._harness.apps import AppServers

APP = """
    import gc
    import os
    import weakref

    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    from zeal_asgi import Zeal, ZealMiddleware

    # Garbage in a cycle, made while the collector is off: only a collection frees it, so it
    # is still there when the worker starts, and freezing it first would keep it for good.
    gc.disable()

    class Node:
        pass

    node = Node()
    node.me = node
    garbage = weakref.ref(node)
    del node

    async def state(request):
        return JSONResponse(
            {"pid": os.getpid(), "frozen": gc.get_freeze_count(), "garbage": garbage() is not None}
        )

    zeal = Zeal()
    app = Starlette(routes=[Route("/gc", state)], lifespan=zeal.lifespan)
    app.add_middleware(ZealMiddleware, zeal=zeal)
"""


@pytest.fixture(scope="module")
def app_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("gcapp")
    (d / "gc_app.py").write_text(textwrap.dedent(APP))
    return d


@pytest.mark.parametrize(
    ("server", "setting"), [("launcher", None), ("uvicorn-workers", "1"), ("gunicorn", "1")]
)
def test_every_worker_freezes_its_heap_after_collecting_the_garbage(
    app_servers: AppServers, app_dir: Path, server: str, setting: str | None
) -> None:
    env = {"PYTHONPATH": str(app_dir)} | ({"ZEAL_GC_FREEZE": setting} if setting else {})
    s = app_servers.start("gc_app:app", server=server, workers=2, env=env, ready="/gc")
    replies = s.on_each_worker("/gc")
    assert len(replies) == 2
    for pid, reply in replies.items():
        # the app's modules alone are tens of thousands of objects
        assert reply["frozen"] > 10_000, (pid, reply)
        assert reply["garbage"] is False, (pid, reply)


@pytest.mark.parametrize(("server", "setting"), [("launcher", "0"), ("uvicorn-workers", None)])
def test_otherwise_the_collector_is_left_alone(
    app_servers: AppServers, app_dir: Path, server: str, setting: str | None
) -> None:
    env = {"PYTHONPATH": str(app_dir)} | ({"ZEAL_GC_FREEZE": setting} if setting else {})
    s = app_servers.start("gc_app:app", server=server, workers=2, env=env, ready="/gc")
    for pid, reply in s.on_each_worker("/gc").items():
        assert reply["frozen"] == 0, (pid, reply)
        assert reply["garbage"] is True, (pid, reply)  # nothing collected it either
