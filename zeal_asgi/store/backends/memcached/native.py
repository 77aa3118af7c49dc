"""Signed 64-bit integers on memcached's native ``incr``: counters and single-INT(8) rows.

memcached's ``incr`` adds an unsigned 64-bit delta modulo 2**64 (and ``decr`` clamps at 0), so a
value is stored as the decimal of ``value + 2**63``, which maps the signed range exactly onto the
unsigned one, and *every* step, negative ones included, is sent as ``incr`` of
``step mod 2**64``.  The server applies it atomically, and the value before the step is
recovered exactly from the reply (``before = reply - delta mod 2**64``), so overflow past either
end of the signed range is detected without ambiguity.

An overflowing step has already been applied when it is detected: it is reverted at once with
the opposite ``incr`` (one more round trip, shielded from cancellation) and
``IntegerOverflowError`` is raised with the value unchanged.  Caveat, documented and warned about
once: between the step and its revert, another client working on the same key can see (and
return) the wrapped value.  That can only happen at the edge of the 64-bit range (beyond
9.2e18); anywhere else every operation is atomic and exact.

Compare-and-set uses ``gets``/``cas`` (optimistic, retried until ``cas_timeout``: see
``MemcachedBackend``).  A value that is not such a number (written by another program) raises
``BackendResponseError``, as the other network backends do; it is never read as 0.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable

from zeal_asgi.errors import BackendError, BackendResponseError, ContentionError
from zeal_asgi.store.backends.memcached.conn import ServerPool
from zeal_asgi.store.base import count

logger = logging.getLogger("zeal_asgi.store.backends.memcached")

BIAS = 2**63
U64 = 2**64
_warned = False


def encode_i64(value: int) -> bytes:
    """The stored form of a signed 64-bit value (decimal of ``value + 2**63``)."""
    return b"%d" % (value + BIAS)


def decode_i64(raw: bytes, what: str) -> int:
    """The signed value stored by :func:`encode_i64`.

    memcached pads a number that got shorter in place with trailing spaces; those are ignored.

    Raises:
        BackendResponseError: ``raw`` is not such a number.
    """
    digits = raw.rstrip(b" ")
    if digits and len(digits) <= 20 and digits.isdigit():
        u = int(digits)
        if u < U64:
            return u - BIAS
    shown = raw[:40] + (b"..." if len(raw) > 40 else b"")
    raise BackendResponseError(
        f"{what}: the stored value {shown!r} is not a 64-bit number written by zeal_asgi "
        "(another program, or a table whose schema changed?)"
    )


async def backoff(attempt: int, deadline: float, what: str) -> None:
    """Sleep before retry ``attempt`` of a lost ``cas`` race (full jitter), or give up.

    Raises:
        ContentionError: ``deadline`` (monotonic) has passed (a BackendTimeoutError that a
            circuit breaker does not count as an outage).
    """
    count("memcached", "cas_retries")
    if time.monotonic() >= deadline:
        count("memcached", "cas_exhausted")
        raise ContentionError(
            f"memcached: {what} lost the compare-and-swap race {attempt} times in a row; gave up "
            "at the cas_timeout (the key is heavily contended)"
        )
    await asyncio.sleep(random.uniform(0, min(0.05, 0.0005 * 2 ** min(attempt, 8))))


async def native_add(
    pool: ServerPool,
    key: bytes,
    step: int,
    *,
    what: str,
    exptime: int,
    cas_timeout: float,
    overflow: Callable[[int], Exception],
) -> int:
    """Atomically add ``step`` (a missing value counts as 0); the new value.

    Raises:
        overflow(before): the result would leave the signed 64-bit range (value unchanged, and
            ``before``).
        BackendResponseError: the stored value is not a number of ours.
    """
    i = pool.index(key)
    delta = step % U64
    deadline = time.monotonic() + cas_timeout
    attempt = 0
    while True:
        reply = await pool.run(i, what, lambda c: c.incr(key, delta))
        if reply is None:
            if await pool.run(i, what, lambda c: c.add(key, encode_i64(step), exptime)):
                return step
        else:
            before = (reply - delta) % U64
            if 0 <= before + step < U64:
                if exptime:
                    await pool.run(i, what, lambda c: c.touch(key, exptime))
                return reply - BIAS
            await asyncio.shield(_revert(pool, i, key, step, what))
            raise overflow(before - BIAS)
        attempt += 1
        await backoff(attempt, deadline, what)


async def _revert(pool: ServerPool, i: int, key: bytes, step: int, what: str) -> None:
    global _warned
    if not _warned:
        _warned = True
        logger.warning(
            "memcached: an increment overflowed the signed 64-bit range and is being reverted; "
            "until the revert lands, other clients of that key may see the wrapped value "
            "(only at the edge of the 64-bit range; see zeal_asgi.store.backends.memcached)"
        )
    count("memcached", "overflow_reverts")
    try:
        # Not retried: a timed-out incr may have been applied, and a second one would not cancel.
        await pool.run(i, f"revert of an overflowing {what}", lambda c: c.incr(key, -step % U64))
    except BackendError:
        logger.error(
            "memcached: could not revert an overflowing increment of %r: the key holds a "
            "wrapped value until it is set again",
            key.decode(),
        )
        raise
