"""Shared memory of one host: the compiled table and atomic, their schemas and segments.

The lowest layer of the package: it imports nothing above itself.  ``Table`` and ``Atomic`` are
the compiled primitives (``zeal_asgi.shm._shmtable``, built from ``ext/``) on memory that
``segments`` names, creates, attaches and removes; ``process`` tells live processes from dead
ones, ``lease`` holds host-wide leases, ``bus`` is pub/sub between the workers of one host.
"""

from zeal_asgi.shm.ext import Atomic, Table

__all__ = ["Atomic", "Table"]
