"""Whole-table operations of the Redis backend: count, iterate, mget, mset, clear.

Batched and pipelined (one round trip for ``mget``/``mset``), streaming (SSCAN/SCAN cursors,
never a whole key set in memory), and slot-aware on a Cluster: every key of a table shares the
slot of its hash tag, so a SCAN runs on the one node that holds them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Mapping, Sequence
from functools import partial
from typing import Any

from redis.asyncio.cluster import RedisCluster

from zeal_asgi._redis.scripts import CLEAR_BATCH, MSET
from zeal_asgi.store.backends.redis.rows import RedisRows
from zeal_asgi.store.base import Key, Row, TableSpec

_BATCH = 256


class RedisTables(RedisRows):
    """Counting, iterating and batch operations over whole tables."""

    async def _batches(
        self, spec: TableSpec, count: int
    ) -> AsyncIterator[list[tuple[bytes, bytes]]]:
        """The rows of ``spec``, about ``count`` at a time, as ``(raw key, row key)`` pairs: SSCAN
        of the membership set (tracked) or SCAN of the table's exact pattern (ttl) on the node
        that holds them."""
        name, layout, tracked = spec.name, self.layout, spec.mode == "tracked"
        members, pattern = layout.members(name), layout.scan_pattern(name)

        async def step(c: Any, cursor: int) -> Any:
            if tracked:
                return await c.sscan(members, cursor, count=count)
            if isinstance(c, RedisCluster):
                await c.initialize()
                node = c.get_node_from_key(members)  # type: ignore[arg-type]  # bytes work
                return await c.execute_command(
                    "SCAN", cursor, "MATCH", pattern, "COUNT", count, target_nodes=node
                )
            return await c.scan(cursor, match=pattern, count=count)

        what, cursor = f"{'sscan' if tracked else 'scan'} {name!r}", 0
        while True:
            nxt, keys = await self._conn.run(
                partial(step, cursor=cursor), what=what, idempotent=True
            )
            if tracked:
                yield [(r, layout.row(name, r)) for r in keys]
            else:
                yield [(r, k) for k in keys if (r := layout.raw_key(name, k)) is not None]
            if isinstance(nxt, dict):  # cluster replies {node: cursor}
                (nxt,) = nxt.values()
            cursor = int(nxt)
            if cursor == 0:
                return

    async def count(self, spec: TableSpec) -> int:
        """Tracked: SCARD (O(1)).  TTL: SCAN of the table's exact pattern (O(keyspace))."""
        t = self._table(spec)
        if spec.mode == "tracked":
            return int(await self._call(t, ("SCARD", t.members), "count"))
        await self._ensure(t)
        return sum([len(batch) async for batch in self._batches(spec, 1000)])

    async def iterate(self, spec: TableSpec) -> AsyncIterator[tuple[Any, Row]]:
        """Stream every row: SSCAN (tracked) or SCAN (ttl) batches + pipelined HGETALL."""
        t = self._table(spec)
        await self._ensure(t)
        async for batch in self._batches(spec, _BATCH):
            found = await self._pipelined([("HGETALL", k) for _, k in batch], "pipelined HGETALL")
            for (raw, _), fields in zip(batch, found, strict=True):
                key = t.key_out(raw)
                row = t.decode(fields, key)
                if row is not None:  # deleted since the scan
                    yield key, row

    async def _pipelined(self, commands: Sequence[tuple[Any, ...]], what: str) -> list[Any]:
        """The replies to idempotent ``commands`` sent in one round trip (redis-py parses
        them: an ``HGETALL`` is a dict)."""
        if not commands:
            return []

        async def op(c: Any) -> list[Any]:
            pipe = c.pipeline(transaction=False)
            for command in commands:
                pipe.execute_command(*command)
            result: list[Any] = await pipe.execute()
            return result

        return await self._conn.run(op, what=what, idempotent=True)

    async def mget(self, spec: TableSpec, keys: Sequence[Key]) -> list[Row | None]:
        """Rows for ``keys`` in order (``None`` for misses), one pipelined round trip."""
        t = self._table(spec)
        raws = [spec.check_key(k) for k in keys]
        if not raws:
            return []
        await self._ensure(t)
        found = await self._pipelined(
            [("HGETALL", self.layout.row(spec.name, r)) for r in raws], "pipelined HGETALL"
        )
        return [t.decode(f, k) for f, k in zip(found, keys, strict=True)]

    async def mset(self, spec: TableSpec, rows: Mapping[Key, Mapping[str, Any]]) -> int:
        """Validate every row first (all or nothing), then write them in one round trip."""
        t = self._table(spec)
        encoded = [(spec.check_key(k), t.encode(r)) for k, r in rows.items()]
        if not encoded:
            return 0
        await self._ensure(t)
        calls: list[tuple[Any, ...]] = []
        for start in range(0, len(encoded), _BATCH):
            keys: list[bytes] = []
            args: list[Any] = [*t.head]
            for raw, fields in encoded[start : start + _BATCH]:
                keys.append(self.layout.row(spec.name, raw))
                zeros = t.zero_fields(fields)
                flat = [x for kv in fields.items() for x in kv]
                args += [raw, len(zeros), len(flat), *zeros, *flat]
            # EVAL, not EVALSHA: a pipeline cannot fall back on NOSCRIPT
            calls.append(("EVAL", MSET.body, len(keys) + 1, *keys, t.members, *args))
        await self._pipelined(calls, f"mset in {spec.name!r}")
        return len(encoded)

    async def clear(self, spec: TableSpec) -> int:
        """Remove every row with UNLINK in batches (never the whole key set in memory)."""
        t = self._table(spec)
        await self._ensure(t)
        removed = 0
        kw: dict[str, Any] = {"idempotent": True, "table": spec.name}
        async for batch in self._batches(spec, _BATCH):
            if batch:
                keys = [k for _, k in batch]
                if spec.mode == "tracked":  # each row goes with its membership
                    members = [r for r, _ in batch]
                    n = self._conn.script(CLEAR_BATCH, [*keys, t.members], members, "clear", **kw)
                else:
                    n = self._conn.call(("UNLINK", *keys), "clear", **kw)
                removed += int(await n)
        return removed
