"""The crash points compiled into the test build of the extension (ext/zt_core.h)."""

from __future__ import annotations

import os

import pytest

from zeal_asgi.shm import _shmtable

UPDATE_AFTER_ODD = 1
UPDATE_MID = 2
INSERT_BUSY = 3
INSERT_UNPUBLISHED = 4
DELETE_FREED = 5
DELETE_MID_SHIFT = 6
INCR_AFTER_ODD = 7


def require() -> None:
    """Skip (fail in CI) unless the extension is the test build, the only one with crash points."""
    if _shmtable.FAULT_INJECTION:
        return
    why = "needs the test build: CFLAGS=-DZT_FAULT_INJECTION pip install -e . (scripts/test)"
    if os.environ.get("CI") == "true":
        pytest.fail(why)
    pytest.skip(why)
