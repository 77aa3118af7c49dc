"""The Store contract, run unchanged on every backend (table, redis, tiered, memcached, breaker)."""
