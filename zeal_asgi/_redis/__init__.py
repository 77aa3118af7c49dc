"""Redis/Valkey plumbing shared by the Redis-based backends and messaging.

Configuration, clients, the connector with its deadlines and fast path, error translation,
every Lua script with its key layout, and the supervised subscriber.  Internal to the package:
users reach Redis through the Store and its backends.
"""
