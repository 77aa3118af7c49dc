"""The test harness: real servers and real app servers, shared by the suite and by ``bench/``.

- ``servers``: redis-server (plain, TLS, 3-master Cluster, Sentinel) and memcached on free
  loopback ports, spoken to through redis-py; ``start_all``/``stop_all`` for several at once.
- ``apps``: ``AppServer``, an ASGI app under uvicorn, uvicorn --workers N, gunicorn (with or
  without --preload) or ``zeal-asgi run``: started, waited for, stopped, its output kept;
  ``CommandServer``, the server a given command starts (a document's, the Dockerfile's).
- ``proxy``: a TCP proxy that delays requests or hangs up on replies.
- ``plugin``: the pytest fixtures over these, and the session's leak checks.

The package never imports ``tests`` outside itself; ``bench/`` imports ``servers`` and ``apps``.
"""
