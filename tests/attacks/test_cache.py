"""Cache defects found by black-box testing (issue 12), each reproduced through the public API."""

from __future__ import annotations

import asyncio
import logging
import multiprocessing
import os
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._harness.servers import RedisServer
from zeal_asgi import Cache, Store
from zeal_asgi.cache import MISSING
from zeal_asgi.store.backends.table import TableBackend

SECRET = "attack-cache-secret-0123456789abcdef"


@pytest.fixture
def table_store() -> Iterator[Store]:
    """A table-backend Store of its own; its shared memory is unlinked afterwards."""
    backend = TableBackend(namespace=f"atk{uuid.uuid4().hex[:8]}")
    yield Store(backend=backend)
    backend.close_all()


@pytest.fixture
def restore_default_cache() -> Iterator[None]:
    """Tests of ``Cache.init`` replace the default cache: put it back afterwards."""
    before = Cache._default
    Cache.set_default(None)
    yield
    if Cache._default is not None:
        Cache._default.close()
    Cache.set_default(before)


def _writer(cache: Cache, tag: str, keys: list[str], together: Any) -> None:
    """A worker process: writes its version of every key, each at the same moment as the
    other writer (``together`` is a barrier of the two)."""

    async def run() -> None:
        for i, key in enumerate(keys):
            # every third value oversize: those live in a file behind a pointer row
            pad = "x" * 10_000 if i % 3 == 0 else ""
            together.wait()
            await cache.set(key, f"{tag}{pad}")

    asyncio.run(run())


def test_concurrent_sets_from_two_processes_leave_both_tiers_agreeing(
    table_store: Store, tmp_path: Path
) -> None:
    """Item 5: two processes setting the same keys at once must leave the memory tier and the
    file tier with the same value for every key, so a restart serves what readers last saw."""
    cache_dir = str(tmp_path / "cache")
    namespace = f"c{uuid.uuid4().hex[:8]}"
    cache = Cache(
        1024, cache_dir, 0, secret=SECRET, namespace=namespace, store=table_store
    )  # the tables exist before the fork: both writers share them
    keys = [f"k{i}" for i in range(500)]
    ctx = multiprocessing.get_context("fork")
    together = ctx.Barrier(2)
    writers = [ctx.Process(target=_writer, args=(cache, tag, keys, together)) for tag in "AB"]
    for w in writers:
        w.start()
    for w in writers:
        w.join(120)
        assert w.exitcode == 0
    # what this server's readers see (memory tier), then what a restarted one reads (files)
    memory = [asyncio.run(cache.get(k, MISSING)) for k in keys]
    stats = cache.stats()
    assert stats["hits_memory"] + stats["hits_file"] == len(keys) and "misses" not in stats
    fresh = TableBackend(namespace=f"atk{uuid.uuid4().hex[:8]}")  # a new server's memory
    after = Cache(
        1024, cache_dir, 0, secret=SECRET, namespace=namespace, store=Store(backend=fresh)
    )
    try:
        files = [asyncio.run(after.get(k, MISSING)) for k in keys]
    finally:
        after.close()
        cache.close()
        fresh.close_all()
    diverged = [(k, m[:1], f[:1]) for k, m, f in zip(keys, memory, files, strict=True) if m != f]
    assert diverged == [], f"{len(diverged)} of {len(keys)} keys differ between the tiers"


def test_max_rows_on_redis_without_a_ttl_logs_the_advisory(
    redis_server: RedisServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    restore_default_cache: None,
) -> None:
    """Item 14: like the seed, a non-default ``max_rows`` on Redis without ``ttl_seconds``
    warns that nothing enforces it; the default, or a TTL, gives no warning."""
    store = Store("redis", {"url": redis_server.url, "prefix": f"p{uuid.uuid4().hex[:8]}"})
    caplog.set_level(logging.WARNING, logger="zeal_asgi.cache")
    Cache.init(10_000, str(tmp_path / "a"), 0, store=store, namespace="adv1")
    (record,) = [r for r in caplog.records if "max_rows" in r.getMessage()]
    assert "10000" in record.getMessage() and "ttl_seconds" in record.getMessage()
    caplog.clear()
    quiet = [
        Cache(4096, str(tmp_path / "b"), 0, store=store, namespace="adv2"),
        Cache(10_000, str(tmp_path / "c"), 0, 3600, store=store, namespace="adv3"),
    ]
    for c in quiet:
        c.close()
    assert not [r for r in caplog.records if "max_rows" in r.getMessage()]


async def test_class_level_gc_sweeps_the_default_cache(
    table_store: Store, tmp_path: Path, restore_default_cache: None
) -> None:
    """Item 14: ``Cache.gc()`` on the class (seed style) sweeps the default cache instead of
    raising TypeError."""
    Cache.init(64, str(tmp_path / "cache"), 0, secret=SECRET, store=table_store, namespace="gc")
    await Cache.set("short", 1, ttl=0.05)
    await Cache.set("kept", 2)
    await asyncio.sleep(0.1)
    out = await Cache.gc()
    assert out["memory_expired"] == 1 and out["expired"] == 1
    assert await Cache.get("kept") == 2 and await Cache.count() == 1
    assert os.listdir(tmp_path / "cache") == [Cache.default().files.name(b"kept")]
