"""The cache: a memory tier on the Store plus a signed file tier (``zeal_asgi.cache.Cache``)."""

from zeal_asgi.cache.facade import MISSING, Cache

__all__ = ["MISSING", "Cache"]
