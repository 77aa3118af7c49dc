"""``ResponseCacheMiddleware``: the response cache for a whole Starlette (or any ASGI) app.

::

    app = Starlette(routes=..., middleware=[Middleware(ResponseCacheMiddleware, ttl=30)])

Pure ASGI: GET requests under ``prefixes`` are looked up as with ``@cache_response``; on a miss
the app runs once per key (across workers and nodes) and its response is captured, stored and
answered with the cache headers.  A ``HEAD`` request is answered from the GET entry when there
is one and otherwise passed to the app untouched (it never fills the cache).  A response sent
in several body messages (``StreamingResponse``, ``FileResponse``) goes to the client as it is
produced and is never stored.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import Any

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.errors import ConfigError, ZealError
from zeal_asgi.response_cache.engine import STATS, Engine, Passthrough, Plan
from zeal_asgi.response_cache.entry import PASS, Captured, RawResponse, decode
from zeal_asgi.response_cache.policy import DEFAULT_MAX_BODY, make_policy


async def _send_captured(c: Captured, scope: Scope, send: Send) -> None:
    await RawResponse(c.status, c.headers, c.body)(scope, _no_receive, send)


async def _no_receive() -> Message:  # pragma: no cover - RawResponse never reads
    return {"type": "http.disconnect"}


class ResponseCacheMiddleware:
    """Cache the GET responses of ``app`` (see ``cache_response`` for the rules and the headers).

    Args:
        app: the ASGI app to wrap.
        ttl: seconds a response stays fresh.
        vary: request headers whose values are part of the key (and listed in ``Vary``).
        tags: fixed tags of every entry stored by this middleware (no ``{fields}``).
        private: cache ``Authorization`` requests too, one entry per credential.
        statuses: response statuses that are stored.
        max_body_bytes: larger bodies are served, never stored.
        prefixes: only paths starting with one of these are cached (default: every path).
        cache: the Cache to store in (default: ``Cache.default()``).
    """

    def __init__(
        self,
        app: ASGIApp,
        ttl: float,
        *,
        vary: Collection[str] = (),
        tags: Collection[str] = (),
        private: bool = False,
        statuses: Collection[int] = (200,),
        max_body_bytes: int = DEFAULT_MAX_BODY,
        prefixes: Sequence[str] = ("/",),
        cache: Cache | None = None,
    ) -> None:
        where = "ResponseCacheMiddleware"
        policy = make_policy(where, ttl, vary, tags, private, statuses, max_body_bytes, cache)
        if any("{" in t for t in policy.tags):
            raise ConfigError(f"{where}: tags are fixed here (no {{fields}}): {policy.tags}")
        if isinstance(prefixes, str) or not all(
            isinstance(p, str) and p.startswith("/") for p in prefixes
        ):
            raise ConfigError(f"{where}: prefixes must be a list of paths, got {prefixes!r}")
        self.app = app
        self.prefixes = tuple(prefixes)
        self.engine = Engine(policy)
        self.engine.declare()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Answer from the cache, or run the app (once per key) and store its response."""
        if (
            scope["type"] != "http"
            or scope["method"] not in ("GET", "HEAD")
            or not scope["path"].startswith(self.prefixes)
        ):
            await self.app(scope, receive, send)
            return
        plan = await self.engine.plan(scope, {})
        if plan is None:
            await self.app(scope, receive, send)
            return
        if scope["method"] == "HEAD":
            await self._head(scope, receive, send, plan)
            return
        engine = self.engine
        cache = engine.cache()

        async def produce() -> tuple[Captured | None, Any]:
            return await _run_app(self.app, scope, receive, send, cache, plan.key, engine), None

        out = await engine.run(plan, produce)
        if isinstance(out, Passthrough):
            if out.captured is not None:
                await _send_captured(out.captured, scope, send)
            return
        await out(scope, receive, send)

    async def _head(self, scope: Scope, receive: Receive, send: Send, plan: Plan) -> None:
        try:
            value = await self.engine.cache().get(plan.key, MISSING)
        except ZealError as exc:
            STATS.failed(exc, "looking up a response")
            value = MISSING
        entry = decode(value) if type(value) is bytes and value != PASS else None
        if entry is None:
            await self.app(scope, receive, send)
            return
        STATS.incr("hits")
        await self.engine.answer(plan, entry, hit=True, original=None)(scope, receive, send)


async def _run_app(
    app: ASGIApp,
    scope: Scope,
    receive: Receive,
    send: Send,
    cache: Cache,
    key: str,
    engine: Engine,
) -> Captured | None:
    """Run ``app``; a complete response is captured (not sent), a streamed one is forwarded as
    it comes (and the key marked not cacheable at its first chunk, so no one waits for it)."""
    start: Message | None = None
    chunks: list[bytes] = []
    streaming = False

    async def capture(message: Message) -> None:
        nonlocal start, streaming
        if streaming:
            await send(message)
            return
        kind = message["type"]
        if kind == "http.response.start":
            start = message
            return
        if kind == "http.response.body" and not message.get("more_body", False):
            chunks.append(message.get("body", b""))
            return
        # a stream (several body messages, or an extension such as pathsend): pass it on live
        streaming = True
        await engine.mark_pass(cache, key)
        if start is not None:
            await send(start)
        await send(message)

    await app(scope, receive, capture)
    if streaming or start is None:
        return None
    headers = [(bytes(n).lower(), bytes(v)) for n, v in start.get("headers", [])]
    return Captured(int(start["status"]), headers, b"".join(chunks))
