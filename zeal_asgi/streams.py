"""``zeal_asgi.streams``: public path of reliable messaging (``zeal_asgi.messaging.streams``)."""

from zeal_asgi.messaging.streams import (
    ReliableSubscription,
    StreamEntry,
    StreamHandler,
    Streams,
    apply_once,
    idempotent,
)

__all__ = [
    "ReliableSubscription",
    "StreamEntry",
    "StreamHandler",
    "Streams",
    "apply_once",
    "idempotent",
]
