"""The Redis/Valkey backend: the same rows and counters as the shared table, across hosts.

Select it with ``Store.default_backend("redis", "redis://host:6379/0")`` (or ``rediss://`` for
TLS, verified; or an options dict: ``url``, ``pool_size`` (64), ``prefix`` ("zeal"),
``socket_timeout``, ``connect_timeout``, ``acquire_timeout``, ``deadline``, ``retries``,
``health_check_interval``, ``ssl_ca_certs``/``ssl_certfile``/``ssl_keyfile``; ``cluster:
["host:port", ...]``; ``sentinel: ["host:port", ...]`` with ``service``; or ``client``: a ready
``redis.asyncio`` client), or ``ZEAL_STORE_BACKEND=redis`` with ``ZEAL_REDIS_URL``.  Options are
validated at once, without I/O; connections open lazily in each worker (``start()`` PINGs).

Layout (every key and channel carries the prefix, ``zeal`` by default)::

    zeal:{users}:alice       hash, one field per column: a row of table "users", key "alice"
    zeal:{users}:__keys__    set of the keys of a tracked table ("users"): count() is SCARD
    zeal:schema:{users}      string, the declaration of "users" (columns, key rules, mode): an
                             app declaring the table differently gets a SchemaError
    zeal:counter:requests    string, Counter "requests" (INCRBY)
    zeal:ch:news             pub/sub channel "news" (Store.publish)
    zeal:stream:jobs         stream "jobs" (Store.publish_reliable)
    zeal:<key>               keys given to Store.eval (KEYS[i] = prefix + ":" + key)

The braces around the table name are a Redis Cluster hash tag: Cluster hashes only
``users``, so every row of a table and its membership set live in one slot, and one Lua script
updates a row and its membership atomically (a table is therefore served by one shard).  A user
key that reads ``__keys__`` (or that with more leading underscores) is stored with one more
leading ``_`` so it cannot collide with the membership set.  Field values are encoded by
:mod:`zeal_asgi.store.codec` (INT decimal, FLOAT ``repr``, STRING UTF-8, BYTES raw).

Semantics are the shared table's: merge on set, zero defaults, typed values, range-checked
``incr`` (Lua; INT(8) through HINCRBY), ``compare_and_set`` where a missing row compares as
zeros.  ``mode="tracked"`` keeps the membership set in the same script as every write that
creates or deletes a row (a row that exists is already a member); ``mode="ttl"`` sets ``EXPIRE
ttl`` on every write and counts by SCAN of the exact table pattern.
Errors are the ZealError hierarchy (redis-py exceptions never escape).  Run Redis with
``maxmemory-policy noeviction`` for tracked tables: an evicted row leaves its key in the
membership set, so count() would over-count.

Every call takes one of ``pool_size`` slots (waiting at most ``acquire_timeout``, then
PoolTimeoutError) and ends within ``deadline`` (default ``acquire_timeout + socket_timeout``);
each attempt waits at most ``socket_timeout`` for its reply.  Single commands skip redis-py's
client layers: they share one pipelined connection per server (per Cluster node), those issued
together written together (:mod:`zeal_asgi._redis.pipe`; ``auto_pipeline=False``: each command
written on its own, on the same connection); pipelines and scans go through redis-py's pooled
client.
Idempotent commands (reads, merges, deletes) are retried on connection errors and timeouts with
full-jitter backoff inside that deadline; INCR/HINCRBY scripts, compare-and-set, PUBLISH, XADD and
``eval`` never are, since a lost reply does not mean the command did not run.  Clients are per
worker process and event loop (rebuilt after a fork or on a new loop): call ``Store.aclose()`` on
the loop that used them (the lifespan does).
"""

from __future__ import annotations

from zeal_asgi._redis.link import RedisLink
from zeal_asgi.store.backends.redis.counter import RedisCounter
from zeal_asgi.store.backends.redis.tables import RedisTables
from zeal_asgi.store.base import Capability, StoreBackend, StoreBackendKind

__all__ = ["RedisBackend", "RedisCounter"]


class RedisBackend(RedisTables, StoreBackend):
    """Store backend over Redis, Valkey, Redis Cluster or Sentinel (``Store.BACKEND_REDIS``).

    It is the :class:`~zeal_asgi._redis.link.RedisLink` that code built on it (tiered backend,
    pub/sub, Streams, WebSockets, the cache's stampede lock) gets from :meth:`redis_link`.
    """

    kind = StoreBackendKind.REDIS
    capabilities = frozenset(Capability)

    def redis_link(self) -> RedisLink:
        """This backend: the tables and the link share one connector."""
        return self

    def counter(self, name: str, initial: int) -> RedisCounter:
        """The counter at ``{prefix}:counter:{name}``; ``initial`` is written with SET NX."""
        c = self._counters.get(name)
        if c is None or c.initial != initial:
            c = self._counters[name] = RedisCounter(self._conn, self.layout, name, initial)
        return c
