"""A worker process for the concurrency tests: tasks incrementing one row column and a counter.

``python -m tests.memcached._hammer URL PREFIX TASKS PER_TASK`` prints ``ok`` when done.
"""

from __future__ import annotations

import asyncio
import sys
from typing import Any

from zeal_asgi import Counter
from zeal_asgi.store import Store
from zeal_asgi.store.backends.memcached import MemcachedBackend

TABLES: dict[str, dict[str, Any]] = {
    "multi": {"n": (Store.TYPE_INT,), "f": (Store.TYPE_FLOAT,), "s": (Store.TYPE_STRING, 8)},
    "single": {"n": (Store.TYPE_INT,)},
}


def declare(store: Store) -> Counter:
    """Declare the contended tables and counter on ``store``."""
    for name, columns in TABLES.items():
        store.make(name, 16, columns)
    return Counter(0, name="hammered", store=store)


async def hammer(store: Store, counter: Counter, tasks: int, per_task: int) -> None:
    """``tasks`` tasks, each adding 1 ``per_task`` times to every contended value."""

    async def one() -> None:
        for _ in range(per_task):
            await store.incr("multi", "hot", "n", 1)
            await store.incr("multi", "hot", "f", 0.5)
            await store.incr("single", "hot", "n", 1)
            await counter.increment()
            await counter.decrement(2)

    await asyncio.gather(*(one() for _ in range(tasks)))


async def main(url: str, prefix: str, tasks: int, per_task: int) -> None:
    """Run :func:`hammer` on its own backend."""
    store = Store(backend=MemcachedBackend(url, prefix=prefix, timeout=5.0, cas_timeout=30.0))
    try:
        await hammer(store, declare(store), tasks, per_task)
    finally:
        await store.aclose()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
    print("ok")
