"""Keys: the documented layout, hashing of unsafe or long keys, and no protocol injection."""

from __future__ import annotations

import hashlib

import pytest

from tests._harness.servers import Memcached
from tests.memcached.conftest import raw_get, raw_set
from zeal_asgi import Counter
from zeal_asgi.errors import InvalidKeyError, KeyTooLongError, KeyTypeError
from zeal_asgi.store import Store
from zeal_asgi.store.backends.memcached import MemcachedBackend
from zeal_asgi.store.backends.memcached.conn import KeyMapper

pytestmark = pytest.mark.memcached


def test_literal_keys_follow_the_documented_layout() -> None:
    keys = KeyMapper("zeal")
    assert keys.row("users", b"alice") == b"zeal:users:alice"
    assert keys.counter("requests") == b"zeal:counter:requests"
    assert keys.row("t", b"x" * (250 - len("zeal:t:"))) == b"zeal:t:" + b"x" * 243


@pytest.mark.parametrize(
    "key",
    [
        b"a b",
        b"a\tb",
        b"\r\nflush_all\r\n",
        b"nul\x00",
        b"del\x7f",
        "caf\u00e9".encode(),
        b"x" * 244,  # one byte over the 250-byte limit once prefixed
    ],
)
def test_unsafe_or_long_keys_are_hashed(key: bytes) -> None:
    mapped = KeyMapper("zeal").row("t", key)
    digest = hashlib.blake2b(b"zeal:t:" + key, digest_size=32, person=b"zeal-mc-row").hexdigest()
    assert mapped == b"zeal:h:" + digest.encode()
    assert len(mapped) <= 250


def test_hashed_and_literal_namespaces_never_meet() -> None:
    keys = KeyMapper("p")
    # Tables called "h" and "counter" would otherwise produce keys of the other namespaces.
    assert keys.row("h", b"abc").startswith(b"p:h:") and keys.row("h", b"abc") != b"p:h:abc"
    assert keys.row("counter", b"hits") != keys.counter("hits")
    # The same unsafe text as a row of table "counter" and as a counter name: distinct hashes.
    assert keys.row("counter", b"a b") != keys.counter("a b")
    assert keys.counter("a b").startswith(b"p:h:")
    assert keys.row("t1", b"k") != keys.row("t2", b"k")


async def test_crlf_key_cannot_inject_commands(
    store: Store, backend: MemcachedBackend, memcached_server: Memcached, prefix: str
) -> None:
    store.make("t", 16, {"v": (Store.TYPE_STRING, 32)})
    await store.set("t", "victim", {"v": "still here"})
    evil = "\r\nflush_all\r\n"
    assert await store.set("t", evil, {"v": "evil"})
    assert not await store.delete("t", f"x\r\ndelete {prefix}:t:victim\r\n")
    assert await store.get_strict("t", evil) == {"v": "evil"}
    # Neither the flush nor a delete ran: the other row survived.
    assert await store.get_strict("t", "victim") == {"v": "still here"}
    hashed = backend.keys.row("t", evil.encode())
    assert hashed.startswith(f"{prefix}:h:".encode())
    assert raw_get(memcached_server.port, hashed) is not None
    assert raw_get(memcached_server.port, f"{prefix}:t:victim".encode()) is not None

    c = Counter(0, name="n\r\nflush_all", store=store)
    assert await c.increment(3) == 3
    assert await store.get_strict("t", "victim") == {"v": "still here"}


async def test_rows_and_counters_land_at_the_documented_keys(
    store: Store, memcached_server: Memcached, prefix: str
) -> None:
    store.make("users", 16, {"n": (Store.TYPE_INT, 4), "s": (Store.TYPE_STRING, 8)})
    await store.set("users", "alice", {"n": 1})
    assert (raw_get(memcached_server.port, f"{prefix}:users:alice".encode()) or b"")[:3] == (b"ZR1")
    c = Counter(5, name="requests", store=store)
    assert await c.increment() == 6
    assert raw_get(memcached_server.port, f"{prefix}:counter:requests".encode()) == (
        str(6 + 2**63).encode()
    )
    # A value written behind our back at a literal key is read back through the same mapping.
    raw_set(memcached_server.port, f"{prefix}:counter:requests".encode(), str(2**63 - 4).encode())
    assert await c.get() == -4


async def test_key_validation_matches_the_table(store: Store) -> None:
    store.make("t", 16, {"v": (Store.TYPE_INT,)}, key_size=300)
    store.make("short", 16, {"v": (Store.TYPE_INT,)})
    with pytest.raises(InvalidKeyError, match="empty key"):
        await store.set("t", "", {"v": 1})
    with pytest.raises(KeyTypeError):
        await store.get("t", 42)  # type: ignore[arg-type]
    with pytest.raises(InvalidKeyError, match="UTF-8"):
        await store.get("t", b"\xff")
    with pytest.raises(InvalidKeyError, match="UTF-8"):
        await store.get("t", "\ud800")
    with pytest.raises(KeyTooLongError, match="key limit of 64 bytes"):
        await store.set("short", "k" * 65, {"v": 1})
    long_key = "k" * 300  # allowed by this table, beyond memcached's limit: hashed, round-trips
    await store.set("t", long_key, {"v": 7})
    assert await store.get_strict("t", long_key) == {"v": 7}
    assert await store.get_strict("t", "k" * 299) is None
