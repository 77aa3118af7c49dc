"""Counters and task helpers shared by the pub/sub runners, and ``messaging_stats()``."""

from __future__ import annotations

import asyncio
import logging
import weakref
from typing import Any

from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store.facade import add_stats_section

__all__ = ["RUNNERS", "Counters", "cancel_task", "log_failure", "messaging_stats"]

log = logging.getLogger("zeal_asgi.messaging.pubsub")

RUNNERS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every PubSub of this process (for the stats of the started ones)."""


class Counters:
    """A runner's counters in this worker; also summed per host as ``<family>_<name>``."""

    def __init__(self, family: str, names: tuple[str, ...]) -> None:
        self.family = family
        self.values = dict.fromkeys(names, 0)
        self._host = {name: f"{family}_{name}" for name in names}  # per message: no formatting

    def incr(self, name: str, by: int = 1) -> None:
        """Add ``by`` to ``name`` here and in the host-wide table."""
        self.values[name] += by
        host_stats().incr(self._host[name], by)


async def cancel_task(task: asyncio.Task[Any] | None) -> None:
    if task is None or task.done():
        return
    task.cancel()
    try:
        await task
    except asyncio.CancelledError:
        # Our own cancellation must propagate; the task's is what we asked for.
        current = asyncio.current_task()
        if current is not None and current.cancelling():
            raise
    except Exception:
        log.exception("zeal_asgi pub/sub: task %r failed while stopping", task.get_name())


def log_failure(task: asyncio.Task[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("zeal_asgi pub/sub: dynamic subscribe failed: %s", task.exception())


def messaging_stats() -> dict[str, Any]:
    """Pub/sub, Streams and WebSocket counters: this worker's and the host's sums."""
    host = host_stats().host()
    worker = host_stats().worker()
    out: dict[str, Any] = {}
    for family in ("pubsub", "streams", "ws"):
        pre = family + "_"
        out[family] = {
            "worker": {k[len(pre) :]: v for k, v in worker.items() if k.startswith(pre)},
            "host": {k[len(pre) :]: v for k, v in host.items() if k.startswith(pre)},
        }
    runners = [p.stats() for p in RUNNERS if getattr(p, "_runner", None) is not None]
    out["pubsub"]["runners"] = runners
    if runners:
        states = {r["state"] for r in runners}
        out["pubsub"]["state"] = "failed" if "failed" in states else runners[0]["state"]
    return out


add_stats_section(messaging_stats)  # Store.stats() reports pub/sub, Streams and ws counters
