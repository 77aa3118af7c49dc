"""The WebSocket router: owner rows with conn_id nonces, rooms, worker liveness (public path:
:mod:`zeal_asgi.ws`)."""
