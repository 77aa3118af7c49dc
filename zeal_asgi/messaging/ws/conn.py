"""Pieces of the WebSocket router: names and their limits, message encoding, local sockets."""

from __future__ import annotations

import asyncio
import base64
import json
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from zeal_asgi.errors import InvalidKeyError, KeyTypeError, SerializationError, ValueTooLargeError

ROOM_RE = re.compile(r"^[A-Za-z0-9_.-]{1,64}$")
CLIENT_ID_MAX = 200
MAX_MESSAGE = 64 * 1024
CONN_RE = re.compile(r"^[0-9a-f]{32}$")
Message = str | bytes | Mapping[str, Any] | list[Any]


def check_client_id(client_id: object) -> str:
    """A client id (non-empty str of at most 200 UTF-8 bytes), or a typed error."""
    if not isinstance(client_id, str):
        raise KeyTypeError(f"a client id is a str, got {type(client_id).__name__}")
    try:
        n = len(client_id.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise InvalidKeyError("client id is not encodable as UTF-8") from exc
    if not 0 < n <= CLIENT_ID_MAX:
        raise InvalidKeyError(f"client id must be 1..{CLIENT_ID_MAX} bytes, got {n}")
    return client_id


def check_room(room: object) -> str:
    """A room name matching ``[A-Za-z0-9_.-]{1,64}``, or a typed error."""
    if not isinstance(room, str):
        raise KeyTypeError(f"a room name is a str, got {type(room).__name__}")
    if not ROOM_RE.match(room):
        raise InvalidKeyError(f"room name {room[:80]!r} must match {ROOM_RE.pattern}")
    return room


def encode_message(message: Message) -> dict[str, Any]:
    """The envelope fields of a message (``p``, and ``b=1`` for base64 bytes)."""
    out: dict[str, Any]
    if isinstance(message, str):
        size, out = len(message.encode("utf-8", "surrogatepass")), {"p": message}
    elif isinstance(message, bytes):
        size, out = len(message), {"p": base64.b64encode(message).decode("ascii"), "b": 1}
    elif isinstance(message, (Mapping, list)):
        try:
            text = json.dumps(message, separators=(",", ":"), allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise SerializationError(f"a WebSocket message must be JSON-encodable: {exc}") from exc
        size, out = len(text.encode("utf-8")), {"p": text}
    else:
        raise SerializationError(
            f"a WebSocket message is str, bytes, or a dict/list (sent as JSON), got "
            f"{type(message).__name__}"
        )
    if size > MAX_MESSAGE:
        raise ValueTooLargeError(
            f"WebSocket message of {size} bytes exceeds the limit of {MAX_MESSAGE} bytes"
        )
    return out


@dataclass(eq=False)
class Conn:
    """One local socket: its conn_id (128 random bits), bounded send queue, sender task, rooms."""

    client_id: str
    websocket: Any
    queue: asyncio.Queue[str | bytes]
    sender: asyncio.Task[None] = field(init=False)
    """Sends the queue to the socket (started by the router right after the socket is owned)."""
    conn_id: str = field(default_factory=lambda: secrets.token_hex(16))
    rooms: set[str] = field(default_factory=set)
    registered: asyncio.Future[None] | None = None
    """The background write of the owner row."""
