"""Redis/Valkey plumbing shared by the Redis-based backends and messaging.

Configuration, clients, the connector and its pipelined connections, error translation,
every Lua script with its key layout, and the supervised subscriber.  Internal to the package:
users reach Redis through the Store and its backends.
"""
