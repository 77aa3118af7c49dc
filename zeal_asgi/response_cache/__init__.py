"""HTTP response caching shared by every worker and node: ``zeal_asgi.response_cache``.

::

    from zeal_asgi.response_cache import cache_response, invalidate, ResponseCacheMiddleware

    @app.get("/items/{item_id}")
    @cache_response(ttl=60, vary=("accept-language",), tags=("items", "item:{item_id}"))
    async def read_item(item_id: int) -> Item: ...

    await invalidate(tags=["item:42"])

Responses are stored in the `Cache` (memory tier on the Store's backend plus the file tier);
invalidation goes through a token per path and tag in the Store (`zeal_asgi.response_cache.tokens`
explains why that is safe).  FastAPI is imported only when a FastAPI route is served.
"""

from __future__ import annotations

from collections.abc import Collection

from zeal_asgi.cache import Cache
from zeal_asgi.response_cache.decorator import cache_response
from zeal_asgi.response_cache.middleware import ResponseCacheMiddleware
from zeal_asgi.response_cache.tokens import check_names, path_name, tag_name, tokens_of
from zeal_asgi.shm.hoststats import host_stats

__all__ = ["ResponseCacheMiddleware", "cache_response", "invalidate"]


async def invalidate(
    tags: Collection[str] = (), paths: Collection[str] = (), *, cache: Cache | None = None
) -> int:
    """Drop every cached response carrying one of ``tags`` or served for one of ``paths``
    (exact request paths, any query string or varied header), on every worker and node: the
    next request for any of them is a miss.

    Returns how many of the tags and paths had cached responses (tokens) to drop.  Raises
    KeyTypeError / InvalidKeyError for a bare string or an empty name, and the backend's error
    if the Store cannot be reached (an invalidation is never silently lost).
    """
    names = [tag_name(t) for t in check_names(tags, "tags")]
    names += [path_name(p) for p in check_names(paths, "paths")]
    dropped = await tokens_of(cache if cache is not None else Cache.default()).drop(names)
    if dropped:
        host_stats().incr("response_cache_invalidations", dropped)
    return dropped
