"""Typed face of the compiled lock path (checked against it by mypy.stubtest)."""

import asyncio
from collections.abc import Callable, Coroutine, Generator
from types import TracebackType
from typing import Any

from typing_extensions import disjoint_base

from zeal_asgi.locks.host import HostLocks
from zeal_asgi.locks.lock import Immediate, Locker, Scope

YEAR: int

@disjoint_base
class LockLease:
    @property
    def name(self) -> str: ...
    @property
    def token(self) -> int: ...
    @property
    def ttl(self) -> float: ...
    lost: bool
    _key: tuple[Any, Scope, str]
    _handle: Any
    _task: asyncio.Task[Any] | None
    _renewal: asyncio.Task[None] | None
    _renew_at: float
    _cancelling: int
    @property
    def scope(self) -> str: ...

@disjoint_base
class LockerBase:
    _owners: dict[tuple[Any, Scope, str], LockLease | None]
    _waiters: dict[tuple[Any, Scope, str], Any]
    _timers: dict[Any, tuple[float, asyncio.TimerHandle]]
    def start(
        self, scope: Scope, name: str, ttl: float, wait: float | None, *, cancel: bool = True
    ) -> LockLease | Coroutine[Any, Any, LockLease | None]: ...
    def _hold(
        self, key: tuple[Any, Scope, str], ttl: float, grant: Any, task: asyncio.Task[Any] | None
    ) -> LockLease: ...
    def _next(self, key: tuple[Any, Scope, str]) -> None: ...
    def release_now(self, lease: LockLease, scope: Immediate) -> None: ...

@disjoint_base
class LockContext:
    def __init__(
        self,
        locker: LockerBase,
        resolve: Callable[[str], Scope] | None,
        scope: str | Scope,
        name: str,
        ttl: float,
        timeout: float | None,
    ) -> None: ...
    async def __aenter__(self) -> LockLease: ...
    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...
    async def _enter(
        self, scope: Scope, got: Coroutine[Any, Any, LockLease | None]
    ) -> LockLease: ...
    async def _exit(
        self, lease: LockLease, exc_type: type[BaseException] | None, exc: BaseException | None
    ) -> None: ...

@disjoint_base
class _Ready:
    def __await__(self) -> Generator[Any, None, Any]: ...
    def __next__(self) -> Any: ...

@disjoint_base
class LocksBase:
    locker: Locker
    host: HostLocks
    _names: set[str]
    def lock(
        self, name: str, ttl: float, scope: str = "host", timeout: float | None = None
    ) -> LockContext: ...
