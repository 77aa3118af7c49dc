"""``@cache_response``: cache a route's responses, under FastAPI's route decorators.

::

    @app.get("/items/{item_id}")
    @cache_response(60, vary=("accept-language",), tags=("items", "item:{item_id}"))
    async def read_item(item_id: int) -> Item: ...

The wrapper keeps the route's signature, so FastAPI sees the same parameters, response model
and OpenAPI schema; it only adds, when the function has none, a ``Request`` and a ``Response``
parameter that FastAPI fills and the wrapper removes (they never appear in the schema).  A value
the function returns is rendered exactly as FastAPI would render it for that route (response
model, response class, status code, headers and cookies set on the ``Response`` parameter), and
those bytes are what is stored.  A Starlette endpoint (``async def page(request)`` returning a
``Response``) can be decorated too.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Collection
from typing import Any, TypeVar, cast

from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import Response

from zeal_asgi.cache import Cache
from zeal_asgi.errors import ConfigError
from zeal_asgi.response_cache.engine import Engine, Passthrough
from zeal_asgi.response_cache.entry import Captured
from zeal_asgi.response_cache.policy import DEFAULT_MAX_BODY, make_policy, tag_fields

F = TypeVar("F", bound=Callable[..., Any])

_REQUEST = "_zeal_cache_request"
_RESPONSE = "_zeal_cache_response"
_READ = ("GET", "HEAD")


def _param_of(sig: inspect.Signature, cls: type) -> str | None:
    for p in sig.parameters.values():
        if isinstance(p.annotation, type) and issubclass(p.annotation, cls):
            return p.name
    return None


def _typed(fn: Callable[..., Any]) -> inspect.Signature:
    """The signature with postponed (string) annotations resolved where they can be."""
    try:
        return inspect.signature(fn, eval_str=True)
    except Exception:  # a forward reference not defined yet: FastAPI resolves it later
        return inspect.signature(fn)


def _with_params(sig: inspect.Signature, extra: list[inspect.Parameter]) -> inspect.Signature:
    params = list(sig.parameters.values())
    at = next((i for i, p in enumerate(params) if p.kind is p.VAR_KEYWORD), len(params))
    return sig.replace(parameters=[*params[:at], *extra, *params[at:]])


def capture(response: Response) -> Captured | None:
    """The complete response, or ``None`` for a stream (a response without a ``body``)."""
    body = getattr(response, "body", None)
    if isinstance(body, memoryview):
        body = body.tobytes()
    if type(body) is not bytes:
        return None
    return Captured(response.status_code, list(response.raw_headers), body)


async def render(request: Request, result: Any, sub: Response | None) -> Response:
    """``result`` as the response the route would send (a Response is kept as it is)."""
    if isinstance(result, Response):
        return result
    route = request.scope.get("route")
    from zeal_asgi.response_cache.fastapi_render import is_api_route, render_value

    if not is_api_route(route):
        raise TypeError(
            f"a @cache_response endpoint outside a FastAPI route must return a Response, "
            f"got {type(result).__name__}"
        )
    return await render_value(route, result, sub)


def cache_response(
    ttl: float,
    *,
    vary: Collection[str] = (),
    tags: Collection[str] = (),
    private: bool = False,
    statuses: Collection[int] = (200,),
    max_body_bytes: int = DEFAULT_MAX_BODY,
    cache: Cache | None = None,
) -> Callable[[F], F]:
    """Cache the GET/HEAD responses of a route for ``ttl`` seconds, in the Cache.

    Args:
        ttl: seconds a response stays fresh (``Cache-Control: max-age`` counts down to 0).
        vary: request headers whose values are part of the key (and listed in ``Vary``).
        tags: names for ``invalidate(tags=...)``; ``{param}`` fields are
            filled with the route's arguments (``"item:{item_id}"``).
        private: cache requests that carry ``Authorization`` too, one entry per credential,
            answered with ``Cache-Control: private``; without it such requests are not cached.
        statuses: response statuses that are stored (others are served, never stored).
        max_body_bytes: larger bodies are served, never stored.
        cache: the Cache to store in (default: ``Cache.default()``, from ``Cache.init``).

    Responses with ``Set-Cookie``, streaming responses and bodies over ``max_body_bytes`` pass
    through unchanged.  Every cached answer carries a strong ``ETag``, ``Cache-Control``
    (``public``/``private``, ``max-age`` = the remaining time), ``Vary`` and, on hits, ``Age``;
    a matching ``If-None-Match`` is answered ``304`` with those headers and no body.
    """

    def decorate(fn: F) -> F:
        where = f"@cache_response on {getattr(fn, '__qualname__', fn)!r}"
        if inspect.isasyncgenfunction(fn) or inspect.isgeneratorfunction(fn):
            raise ConfigError(f"{where}: a streaming (generator) endpoint cannot be cached")
        policy = make_policy(where, ttl, vary, tags, private, statuses, max_body_bytes, cache)
        sig = inspect.signature(fn)
        typed = _typed(fn)
        req_name = _param_of(typed, Request)
        resp_name = _param_of(typed, Response)
        params = set(sig.parameters)
        takes_request_only = req_name is not None or list(params) == ["request"]
        for tag in policy.tags:
            for field in tag_fields(tag, where):
                if field not in params and not takes_request_only:
                    raise ConfigError(f"{where}: tag {tag!r} names {{{field}}}, not a parameter")
        kw = inspect.Parameter.KEYWORD_ONLY
        extra = []
        if req_name is None:
            extra.append(inspect.Parameter(_REQUEST, kw, annotation=Request))
        if resp_name is None:
            extra.append(inspect.Parameter(_RESPONSE, kw, annotation=Response))
        is_async = inspect.iscoroutinefunction(fn)
        engine = Engine(policy)
        engine.declare()

        @functools.wraps(fn)
        async def wrapper(*args: Any, **kwargs: Any) -> Any:
            request = kwargs.pop(_REQUEST, None)
            sub = kwargs.pop(_RESPONSE, None)
            if request is None:
                request = kwargs.get(req_name) if req_name else None
                if request is None and args and isinstance(args[0], Request):
                    request = args[0]  # a Starlette endpoint
            if sub is None and resp_name is not None:
                sub = kwargs.get(resp_name)

            async def call() -> Any:
                if is_async:
                    return await fn(*args, **kwargs)
                result = await run_in_threadpool(fn, *args, **kwargs)
                return await result if inspect.isawaitable(result) else result

            if not isinstance(request, Request) or request.scope["method"] not in _READ:
                return await call()

            async def produce() -> tuple[Captured | None, Any]:
                response = await render(request, await call(), sub)
                return capture(response), response

            fields = {**request.path_params, **kwargs} if policy.tags else {}
            plan = await engine.plan(request.scope, fields)
            if plan is None:
                return await call()
            out = await engine.run(plan, produce)
            return out.original if isinstance(out, Passthrough) else out

        wrapper.__signature__ = _with_params(sig, extra)  # type: ignore[attr-defined]
        return cast(F, wrapper)

    return decorate
