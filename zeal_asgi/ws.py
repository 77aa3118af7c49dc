"""``zeal_asgi.ws``: the public path of the WebSocket router (:mod:`zeal_asgi.messaging.ws`)."""

from zeal_asgi.messaging.ws.conn import CLIENT_ID_MAX, ROOM_RE, check_client_id, check_room
from zeal_asgi.messaging.ws.router import WSRouter

__all__ = ["CLIENT_ID_MAX", "ROOM_RE", "WSRouter", "check_client_id", "check_room"]
