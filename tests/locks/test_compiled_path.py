"""The compiled path of a host lock: built, importing only the errors of the package, and a free
lock is taken and given back without the event loop running anything else."""

from __future__ import annotations

import asyncio
import re
import uuid
from pathlib import Path

from zeal_asgi import Store, Zeal
from zeal_asgi.errors import LockTimeoutError
from zeal_asgi.locks import LockContext, LockLease, _fast


def test_the_lock_path_is_compiled() -> None:
    # its stub is checked with the table's (tests/core/test_ext.py)
    assert _fast.__file__ is not None and _fast.__file__.endswith(".so")


def test_the_compiled_path_imports_only_the_errors_of_the_package() -> None:
    """The layering test reads ``.py`` files with ``ast``; the ``.pyx`` of the locks layer is
    held to the same rule here (layer 6 may import lower layers; it needs only ``errors``)."""
    source = (Path(_fast.__file__).parent / "_fast.pyx").read_text()
    targets = re.findall(r"^(?:from|import|cimport)\s+([\w.]+)", source, re.MULTILINE)
    assert "zeal_asgi.errors" in targets
    assert [t for t in targets if t.startswith("zeal_asgi")] == ["zeal_asgi.errors"]


async def test_a_free_lock_is_taken_and_given_back_without_suspending() -> None:
    zeal, name = Zeal(store=Store("table")), f"lock-{uuid.uuid4().hex[:12]}"
    ran: list[int] = []
    tokens = []
    for i in range(3):  # the first call checks the name; the next ones take the compiled path
        asyncio.get_running_loop().call_soon(ran.append, i)
        context = zeal.lock(name, ttl=5)
        assert type(context) is LockContext
        async with context as lease:
            assert type(lease) is LockLease and not lease.lost
            tokens.append(lease.token)
        assert ran == list(range(i))  # nothing else ran: neither enter nor exit suspended
        await asyncio.sleep(0)
    assert tokens == sorted(set(tokens))
    # given back: another acquisition that may not wait gets it
    async with zeal.lock(name, ttl=5, timeout=0) as lease:
        assert lease.token > tokens[-1]


async def test_a_held_lock_sends_the_next_coroutine_to_the_waiting_path() -> None:
    zeal, name = Zeal(store=Store("table")), f"lock-{uuid.uuid4().hex[:12]}"
    async with zeal.lock(name, ttl=5):
        try:
            async with zeal.lock(name, ttl=5, timeout=0.01):
                raise AssertionError("a held lock was taken twice")
        except LockTimeoutError as exc:
            assert name in str(exc)
