"""E9: tampered cache files (bit flips, truncation, zeroed, swapped, forged, a planted malicious
pickle) are all detected, become misses and are removed; the pickle never runs (canary file).

Prints ``E9 <mode>: N tampered, N detected (100.0 %), canary created: False`` and the
detections by reason.
"""

from __future__ import annotations

import os
import pickle
import random
import shutil
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.cache.conftest import SECRET, entry_files
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.cache.files.tier import HEAD_LEN, HEADER, FileTier
from zeal_asgi.cache.serializer import PICKLE_ID
from zeal_asgi.cache.tiers import HEAD, INLINE, MAC_BYTES, memory_key

CANARY_ENV = "ZEAL_E9_CANARY"


class Evil:
    """Unpickling this creates the canary file (``open(path, "w")``)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (str(self.path), "w"))


def _flip(data: bytes, pos: int) -> bytes:
    b = bytearray(data)
    b[pos] ^= 1 << random.randrange(8)
    return bytes(b)


def _forged(cache: Cache, key: bytes, payload: bytes, serializer: int, kid: int | None) -> bytes:
    """A well-formed entry for ``key`` made with a key the attacker guessed (wrong)."""
    d = Path(cache.files.path).parent / "forger"
    forger = FileTier(
        d, mac_key=os.urandom(32), name_key=b"n" * 32, max_entry_bytes=1 << 20, max_key_bytes=4096
    )
    try:
        forger.write(key, serializer, 0.0, payload, b"\0" * 16)
        data = (d / forger.name(key)).read_bytes()
    finally:
        forger.close()
        shutil.rmtree(d)
    if kid is not None:  # the key id is public (any header shows it): copy the right one
        data = data[:8] + struct.pack("<I", kid) + data[12:]
    return data


def _tamper(
    kind: str, data: bytes, other: bytes, evil: bytes, forged: Callable[..., bytes]
) -> bytes:
    if kind == "flip-header":
        return _flip(data, random.randrange(HEADER.size))
    if kind == "flip-mac":
        return _flip(data, random.randrange(HEADER.size, HEAD_LEN))
    if kind == "flip-body":
        return _flip(data, random.randrange(HEAD_LEN, len(data)))
    if kind == "truncate":
        return data[: random.randrange(1, len(data))]
    if kind == "extend":
        return data + b"\0"
    if kind == "zeroed":
        return b"\0" * len(data)
    if kind == "empty":
        return b""
    if kind == "swapped":
        return other  # an authentic entry of another key
    if kind == "raw-pickle":
        return evil
    if kind == "forged-pickle":
        return forged(PICKLE_ID, None)
    if kind == "forged-pickle-kid":
        return forged(PICKLE_ID, "real")
    raise AssertionError(kind)


KINDS = [
    "flip-header",
    "flip-mac",
    "flip-body",
    "truncate",
    "extend",
    "zeroed",
    "empty",
    "swapped",
    "raw-pickle",
    "forged-pickle",
    "forged-pickle-kid",
]


@pytest.mark.parametrize("mode", ["json", "pickle"])
async def test_e9_tampered_files_are_all_misses_and_the_pickle_never_runs(
    mode: str,
    store_factory: Callable[[str], Any],
    cache_factory: Callable[..., Cache],
    tmp_path: Path,
) -> None:
    random.seed(9)
    canary = tmp_path / "CANARY"
    evil = pickle.dumps(Evil(canary))
    writer = cache_factory(await store_factory("table"), secret=SECRET, serializer=mode)
    rounds = 4
    keys = [f"k{i}" for i in range(len(KINDS) * rounds)]
    for i, k in enumerate(keys):
        await writer.set(k, {"k": k, "pad": "x" * (20_000 if i % 2 else 10)})
    await writer.set("control", "untouched")
    d = Path(writer.files.path)
    # the planted-file variants also appear where no entry was ever written
    tampered = {}
    for i, k in enumerate(keys):
        kind = KINDS[i % len(KINDS)]
        path = d / writer.files.name(k.encode())
        other = (d / writer.files.name(keys[(i + 1) % len(keys)].encode())).read_bytes()

        def forged(ser: int, kid: str | None, k: str = k) -> bytes:
            return _forged(writer, k.encode(), evil, ser, writer.files.kid if kid else None)

        path.write_bytes(_tamper(kind, path.read_bytes(), other, evil, forged))
        tampered[k] = kind
    # a restarted server: empty memory tier, every read goes to the files
    reader = cache_factory(
        await store_factory("table"), secret=SECRET, serializer=mode, namespace=writer.namespace
    )
    wrong = [k for k in keys if await reader.get(k, MISSING) is not MISSING]
    assert await reader.get("control") == "untouched"
    stats = reader.stats()
    reasons = {k[5:]: v for k, v in stats.items() if k.startswith("file_") and k != "file_writes"}
    detected = sum(reasons.values())
    print(
        f"\nE9 {mode}: {len(keys)} tampered, {detected} detected "
        f"({100 * detected / len(keys):.1f} %), canary created: {canary.exists()}"
    )
    print(f"E9 {mode} detections by reason: {dict(sorted(reasons.items()))}")
    assert wrong == []
    assert detected == len(keys)
    assert not canary.exists()
    assert {p.name for p in entry_files(d)} == {writer.files.name(b"control")}


async def test_e9_pickle_entries_under_a_wrong_key_or_read_as_json_never_load(
    store_factory: Callable[[str], Any], cache_factory: Callable[..., Cache], tmp_path: Path
) -> None:
    canary = tmp_path / "CANARY"
    writer = cache_factory(await store_factory("table"), secret=SECRET, serializer="pickle")
    await writer.set("a", Evil(canary))  # an authentic pickle entry that would run on load
    assert not canary.exists()
    ns = writer.namespace
    as_json = cache_factory(await store_factory("table"), secret=SECRET, namespace=ns)
    assert await as_json.get("a", MISSING) is MISSING  # JSON mode never unpickles
    assert as_json.stats()["serializer_mismatch"] == 1
    await writer.set("a", Evil(canary))
    other_key = cache_factory(
        await store_factory("table"), secret="t" * 32, serializer="pickle", namespace=ns
    )
    # another secret names files differently: copy the entry under the name it would look for
    d = Path(writer.files.path)
    (d / other_key.files.name(b"a")).write_bytes((d / writer.files.name(b"a")).read_bytes())
    assert await other_key.get("a", MISSING) is MISSING
    assert other_key.stats()["file_key_id"] == 1
    print(f"\nE9 pickle with a wrong key / read as JSON: canary created: {canary.exists()}")
    assert not canary.exists()


async def test_e9_planted_symlink_is_never_followed(table_cache: Cache, tmp_path: Path) -> None:
    secret_file = tmp_path / "outside"
    secret_file.write_bytes(b"private")
    link = Path(table_cache.files.path) / table_cache.files.name(b"k")
    link.symlink_to(secret_file)
    assert await table_cache.get("k", MISSING) is MISSING
    assert not link.is_symlink() and secret_file.read_bytes() == b"private"
    assert table_cache.stats()["file_not_regular"] == 1


@pytest.mark.parametrize("kind", ["table", "redis"])
async def test_e9_forged_pickle_row_in_the_memory_tier_never_loads(
    kind: str,
    store_factory: Callable[[str], Any],
    cache_factory: Callable[..., Cache],
    tmp_path: Path,
) -> None:
    canary = tmp_path / "CANARY"
    cache = cache_factory(await store_factory(kind), secret=SECRET, serializer="pickle")
    # row keys: the key itself in shared memory, its hash on shared backends
    mk = b"k" if kind == "table" else memory_key(b"k")
    forged = HEAD.pack(INLINE, PICKLE_ID, 0.0) + os.urandom(MAC_BYTES) + pickle.dumps(Evil(canary))
    await cache.store.set(
        f"__{cache.namespace}", mk, {"v": forged}
    )  # someone with access to the tier
    assert await cache.get("k", MISSING) is MISSING
    assert cache.stats()["memory_corrupt"] == 1
    print(f"\nE9 forged pickle row in the {kind} memory tier: canary created: {canary.exists()}")
    assert not canary.exists()
