"""Messaging between workers and nodes: pub/sub, Redis Streams, and the WebSocket router."""
