"""The WebSocket router: owner rows with conn_id nonces, rooms, worker liveness."""

from zeal_asgi.messaging.ws.router import WSRouter

__all__ = ["WSRouter"]
