"""Counters and task helpers of pub/sub, Streams and WebSockets, and ``messaging_stats()``."""

from __future__ import annotations

import asyncio
import functools
import inspect
import logging
import weakref
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store.base import Capability, StoreBackend, unsupported
from zeal_asgi.store.facade import add_stats_section

if TYPE_CHECKING:
    from zeal_asgi._redis.link import RedisLink

log = logging.getLogger("zeal_asgi.messaging")

RUNNERS: weakref.WeakSet[Any] = weakref.WeakSet()
"""Every PubSub and Streams of this process (for the state of the started ones)."""


class Counters:
    """A runner's counters (``names`` space-separated) in this worker; also summed per host as
    ``<family>_<name>``."""

    def __init__(self, family: str, names: str) -> None:
        self.family = family
        self.values = dict.fromkeys(names.split(), 0)
        self._host = {name: f"{family}_{name}" for name in self.values}  # per message: no format

    def incr(self, name: str, by: int = 1) -> None:
        """Add ``by`` to ``name`` here and in the host-wide table."""
        self.values[name] += by
        host_stats().incr(self._host[name], by)


async def call(fn: Callable[..., Any], *args: Any) -> Any:
    """``fn(*args)``, awaited when it returns an awaitable (handlers may be sync or async)."""
    res = fn(*args)
    return await res if inspect.isawaitable(res) else res


def spawn(
    tasks: set[asyncio.Task[Any]], coro: Coroutine[Any, Any, Any], failures: str | None = None
) -> asyncio.Task[Any]:
    """Run ``coro`` as a background task kept in ``tasks`` until it ends; its failure is logged
    (and counted in the host counter ``failures``, when given)."""
    task = asyncio.get_running_loop().create_task(coro)
    tasks.add(task)
    task.add_done_callback(tasks.discard)
    task.add_done_callback(functools.partial(_log_failure, failures))
    return task


async def cancel_tasks(*tasks: asyncio.Task[Any] | None) -> None:
    """Cancel ``tasks`` and wait for them; their failures are logged, our own cancellation
    propagates.

    The caller's cancellation propagates as its own ``CancelledError``, never as a task's: a
    cancel scope (anyio, ``asyncio.timeout``) recognises only the one it sent.
    """
    live = {task for task in tasks if task is not None and not task.done()}
    if not live:
        return
    for task in live:
        task.cancel()
    await asyncio.wait(live)  # raises only our own cancellation, never a task's outcome
    for task in live:
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("zeal_asgi: task %r failed while stopping", task.get_name(), exc_info=exc)


def _log_failure(failures: str | None, task: asyncio.Task[Any]) -> None:
    """Done-callback of a background task: log (and count) its exception, if any."""
    if not task.cancelled() and task.exception() is not None:
        log.warning("zeal_asgi: background task %r failed: %s", task.get_name(), task.exception())
        if failures is not None:
            host_stats().incr(failures)


def messaging_link(backend: StoreBackend, what: str) -> RedisLink | None:
    """The Redis link that carries ``what`` (pub/sub, WebSockets) on ``backend``; ``None`` on the
    table backend (shared memory: one host); UnsupportedOperationError on any other."""
    link = backend.redis_link()
    if link is None and Capability.PUBSUB not in backend.capabilities:
        raise unsupported(backend, what, Capability.PUBSUB)
    return link


def messaging_stats() -> dict[str, Any]:
    """Pub/sub, Streams and WebSocket counters: this worker's and the host's sums.

    ``pubsub.state`` and ``streams.state`` are ``failed`` when a started runner of this worker
    gave up (``max_attempts``): it receives nothing any more.
    """
    sums = {"worker": host_stats().worker(), "host": host_stats().host()}
    out: dict[str, Any] = {}
    for family in ("pubsub", "streams", "ws"):
        pre = family + "_"
        out[family] = {
            scope: {k[len(pre) :]: v for k, v in counts.items() if k.startswith(pre)}
            for scope, counts in sums.items()
        }
        mine = [r.stats() for r in RUNNERS if r.started and r.counters.family == family]
        if mine:
            failed = any(r["state"] == "failed" for r in mine)
            out[family]["state"] = "failed" if failed else mine[0]["state"]
        if family == "pubsub":  # each subscriber of this worker, with its transport
            out[family]["runners"] = mine
    return out


add_stats_section(messaging_stats)  # Store.stats() reports pub/sub, Streams and ws counters
