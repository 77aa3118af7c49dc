"""``zeal_asgi.ws``: the public path of the WebSocket router (:mod:`zeal_asgi.messaging.ws`)."""

from zeal_asgi.messaging.ws.router import (
    CLIENT_ID_MAX,
    ROOM_RE,
    WSRouter,
    check_client_id,
    check_room,
)

__all__ = ["CLIENT_ID_MAX", "ROOM_RE", "WSRouter", "check_client_id", "check_room"]
