"""The Store's backends, one module or package each: table, redis, tiered, memcached, breaker.

Each is imported only when selected (``zeal_asgi.store.facade.build_backend``), so a backend's
client library is needed only by the apps that use it.
"""
