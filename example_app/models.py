"""Response models of the demo routes (so ``/docs`` shows what each button returns)."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

__all__ = [
    "BackendInfo",
    "CacheResult",
    "ChatMessage",
    "CounterResult",
    "DemoError",
    "DemoRow",
    "IncrResult",
    "PubSubLog",
    "PubSubLogEntry",
    "PublishReliableResult",
    "PublishResult",
    "RoomMembers",
    "RoomOnline",
    "RoomPush",
    "RoomState",
    "RoundtripResult",
    "SetGetResult",
]


class DemoRow(BaseModel):
    """A row of ``demo_table``."""

    name: str
    score: int


class DemoError(BaseModel):
    """What a demo answers when the backend cannot do it (e.g. pub/sub without a bus)."""

    ok: Literal[False] = False
    error: str
    error_type: str
    backend: str


class SetGetResult(BaseModel):
    """``/demo/store/set-get``."""

    alice: DemoRow | None
    total_rows: int
    worker_pid: int


class IncrResult(BaseModel):
    """``/demo/store/incr``: three atomic increments of ``page_hits``."""

    after_incr_1: int
    after_incr_2: int
    after_incr_5: int
    worker_pid: int


class RoundtripResult(BaseModel):
    """``/demo/store-roundtrip``: set, get, incr, exists, delete on a fresh key."""

    backend: str
    key: str
    set: DemoRow
    incr: DemoRow
    existed: bool
    after_del: Literal[False]
    """``Store.get`` on a missing row: ``False`` (``Store.get_strict`` gives ``None``)."""
    worker_pid: int


class BackendInfo(BaseModel):
    """``/demo/backend``: the Store backend serving the app."""

    backend: str
    """``table``, ``redis``, ``tiered`` or ``memcached``."""
    worker_pid: int


class CounterResult(BaseModel):
    """``/demo/counter/increment``."""

    total_requests: int
    pid: int


class PublishResult(BaseModel):
    """``/demo/pubsub/publish``."""

    ok: Literal[True] = True
    channel: str
    msg: str
    receivers: int
    """Subscribed workers (on every node) that got the message."""


class PublishReliableResult(BaseModel):
    """``/demo/pubsub/publish-reliable``."""

    ok: Literal[True] = True
    stream: str
    msg: str
    message_id: str


class PubSubLogEntry(BaseModel):
    """One message a demo subscriber received."""

    id: str
    channel: str
    payload: str
    pattern: str
    ts: float
    worker_pid: int


class PubSubLog(BaseModel):
    """``/demo/pubsub/log``: what the demo subscribers received, oldest first."""

    ok: Literal[True] = True
    count: int
    log: list[PubSubLogEntry] = Field(default_factory=list)


class CacheResult(BaseModel):
    """``/demo/cache``: a value computed once and then served from the cache."""

    ok: Literal[True] = True
    key: str
    value: dict[str, int | str]
    computed_by_pid: int
    """The worker that ran the computation (the same for every worker until it expires)."""
    worker_pid: int
    cache_count: int
    """Entries in the memory tier."""


class RoomMembers(BaseModel):
    """``/demo/rooms/members``."""

    ok: Literal[True] = True
    room: str
    size: int
    members: list[str]
    servers: list[str]


class RoomPush(BaseModel):
    """``/demo/rooms/push``."""

    ok: Literal[True] = True
    room: str
    msg: str
    receivers: int


class RoomState(BaseModel):
    """``/demo/rooms/state``: what this worker holds."""

    ok: Literal[True] = True
    worker_pid: int
    local_clients: list[str]


class RoomOnline(BaseModel):
    """``/demo/rooms/online``: chat clients connected to this host's workers."""

    ok: Literal[True] = True
    total: int
    by_worker: dict[str, int]


class ChatMessage(BaseModel):
    """A chat message as the WebSocket clients receive it."""

    type: Literal["message"] = "message"
    room: str
    sender: str
    text: str
    worker_pid: int
