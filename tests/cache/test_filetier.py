"""The file tier on its own: directory checks, format, temp cleanup, sweep, disk errors."""

from __future__ import annotations

import asyncio
import logging
import os
import resource
import signal
import stat
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cache.conftest import SECRET, entry_files, is_root, temp_files
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.cache.files.tier import HEAD_LEN, NAME_RE, FileTier
from zeal_asgi.errors import ConfigError, InsecureCacheDirError
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store import Store

KEYS = dict(mac_key=b"m" * 32, name_key=b"n" * 32, max_entry_bytes=1 << 20, max_key_bytes=4096)


@pytest.fixture
def tier_factory(tmp_path: Path) -> Iterator[Callable[..., FileTier]]:
    """Factory of file tiers (default directory ``tmp_path/ft``), closed after the test."""
    made: list[FileTier] = []

    def factory(directory: Path | None = None, **kw: Any) -> FileTier:
        tier = FileTier(directory or tmp_path / "ft", **{**KEYS, **kw})
        made.append(tier)
        return tier

    yield factory
    for tier in made:
        tier.close()


def test_directory_is_created_0700(tier_factory: Callable[..., FileTier], tmp_path: Path) -> None:
    old = os.umask(0)
    try:
        tier = tier_factory(tmp_path / "a" / "b")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tier.path).st_mode) == 0o700


def test_symlinked_directory_is_refused(
    tier_factory: Callable[..., FileTier], tmp_path: Path
) -> None:
    (tmp_path / "real").mkdir(mode=0o700)
    (tmp_path / "link").symlink_to(tmp_path / "real")
    with pytest.raises(InsecureCacheDirError, match="symlink"):
        tier_factory(tmp_path / "link")


def test_a_file_in_place_of_the_directory_is_refused(
    tier_factory: Callable[..., FileTier], tmp_path: Path
) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(InsecureCacheDirError, match="not a directory"):
        tier_factory(tmp_path / "f")


@pytest.mark.skipif(not is_root(), reason="chown to another user needs root")
def test_directory_of_another_user_is_refused(
    tier_factory: Callable[..., FileTier], tmp_path: Path
) -> None:
    d = tmp_path / "theirs"
    d.mkdir(mode=0o700)
    os.chown(d, 65534, 65534)
    with pytest.raises(InsecureCacheDirError, match="belongs to uid 65534"):
        tier_factory(d)


def test_group_writable_directory_is_refused_readable_one_tightened(
    tier_factory: Callable[..., FileTier], tmp_path: Path
) -> None:
    d = tmp_path / "gw"
    d.mkdir()
    d.chmod(0o770)
    with pytest.raises(InsecureCacheDirError, match="writable by other users"):
        tier_factory(d)
    d.chmod(0o755)
    tier_factory(d)
    assert stat.S_IMODE(d.stat().st_mode) == 0o700


def test_world_writable_ancestor_without_sticky_bit_is_refused(
    tier_factory: Callable[..., FileTier], tmp_path: Path
) -> None:
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    open_dir.chmod(0o777)
    with pytest.raises(InsecureCacheDirError, match="writable by every user"):
        tier_factory(open_dir / "cache")
    open_dir.chmod(0o1777)  # sticky, like /tmp: others cannot rename our entries
    tier_factory(open_dir / "cache2")


def test_entry_format_and_file_names(tier_factory: Callable[..., FileTier]) -> None:
    tier = tier_factory()
    assert tier.write(b"key", 1, 0.0, b"payload", b"N" * 16)
    (f,) = entry_files(tier.path)
    assert NAME_RE.match(f.name) and f.name == tier.name(b"key")
    assert stat.S_IMODE(f.stat().st_mode) == 0o600
    data = f.read_bytes()
    assert data[:4] == b"ZC\x01\x00" and len(data) == HEAD_LEN + 3 + 7
    assert data.endswith(b"keypayload")
    entry = tier.read(b"key", time.time())
    assert entry is not None and entry.payload == b"payload" and entry.nonce == b"N" * 16
    # another name key gives other file names: names are not predictable without the key
    other = tier_factory(Path(tier.path).parent / "other", name_key=b"x" * 32)
    assert other.name(b"key") != tier.name(b"key")


@pytest.mark.parametrize(
    "key",
    [b"../../etc/passwd", b"/abs/path", b"a\x00b", b"line\r\nbreak", "é/..".encode(), b"." * 300],
)
def test_hostile_keys_only_ever_make_files_inside_the_directory(
    tier_factory: Callable[..., FileTier], tmp_path: Path, key: bytes
) -> None:
    tier = tier_factory()
    before = {p for p in tmp_path.rglob("*")}
    assert tier.write(key, 1, 0.0, b"v", b"\0" * 16)
    created = {p for p in tmp_path.rglob("*")} - before
    assert [p.parent for p in created] == [Path(tier.path)]
    assert all(NAME_RE.match(p.name) for p in created)
    assert tier.read(key, time.time()) is not None


def test_stale_temp_files_are_removed_at_start(
    tier_factory: Callable[..., FileTier], tmp_path: Path
) -> None:
    d = tmp_path / "ft"
    d.mkdir(mode=0o700)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    live = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    try:
        (d / f".tmp.{dead.pid}.ab12").write_bytes(b"partial")
        (d / f".tmp.{live.pid}.cd34").write_bytes(b"in progress")
        old = d / f".tmp.{live.pid}.ef56"
        old.write_bytes(b"old")
        os.utime(old, (time.time() - 3600, time.time() - 3600))
        (d / "unrelated.txt").write_text("not ours")
        tier = tier_factory(d)
        assert tier.temp_removed_at_start == 2
        assert [p.name for p in temp_files(d)] == [f".tmp.{live.pid}.cd34"]
        assert (d / "unrelated.txt").exists()
    finally:
        live.kill()
        live.wait()


def test_sweep_removes_expired_damaged_and_rotates(tier_factory: Callable[..., FileTier]) -> None:
    tier = tier_factory()
    now = time.time()
    tier.write(b"expired", 1, now - 1, b"v", b"\0" * 16)
    tier.write(b"alive", 1, now + 60, b"v", b"\0" * 16)
    tier.write(b"damaged", 1, 0.0, b"v", b"\0" * 16)
    damaged = Path(tier.path) / tier.name(b"damaged")
    damaged.write_bytes(damaged.read_bytes()[:20])
    for i in range(5):
        tier.write(b"k%d" % i, 1, 0.0, b"v", b"\0" * 16)
        path = Path(tier.path) / tier.name(b"k%d" % i)
        os.utime(path, (now - 100 + i, now - 100 + i))
    out = tier.sweep(now, max_files=3)
    assert out["expired"] == 1 and out["damaged"] == 1 and out["rotated"] == 3
    left = {p.name for p in entry_files(tier.path)}
    assert left == {tier.name(b"alive"), tier.name(b"k3"), tier.name(b"k4")}


def _with_a_full_disk(scenario: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run ``scenario`` in a forked child whose writes past 4 KiB fail with EFBIG, as a full disk
    fails with ENOSPC.  Never in this process: the limit would also cut pytest's own output."""
    host_stats()  # allocate the shared counters first: the limit applies to new segments too
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(r)
        failure = b""
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            _, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
            resource.setrlimit(resource.RLIMIT_FSIZE, (4096, hard))
            outcome: list[str] = []

            def run() -> None:  # a fresh thread: no event loop of the parent's test in it
                try:
                    asyncio.run(scenario())
                except BaseException:
                    outcome.append(traceback.format_exc())

            t = threading.Thread(target=run)
            t.start()
            t.join()
            failure = outcome[0].encode() if outcome else b""
        except BaseException:
            failure = traceback.format_exc().encode()
        finally:
            os.write(w, failure[-60000:] or b"OK")
            os._exit(0)
    os.close(w)
    chunks = []
    while chunk := os.read(r, 65536):
        chunks.append(chunk)
    os.close(r)
    os.waitpid(pid, 0)
    report = b"".join(chunks).decode(errors="replace")
    assert report == "OK", report


async def test_a_full_disk_is_never_an_error(table_cache: Cache) -> None:
    async def scenario() -> None:
        messages: list[str] = []
        handler = logging.Handler()
        handler.emit = lambda record: messages.append(record.getMessage())  # type: ignore[method-assign]
        logging.getLogger("zeal_asgi").addHandler(handler)
        await table_cache.set("big", "old")
        # oversize values only fit the file tier: not stored, and the older value is gone too
        assert await table_cache.set("big", "B" * 20_000) is False
        assert await table_cache.get("big", MISSING) is MISSING
        # small values are still served by the memory tier
        assert await table_cache.set("small", "s" * 5000) is True
        assert await table_cache.get("small") == "s" * 5000
        assert temp_files(table_cache.files.path) == []
        assert table_cache.stats()["file_io_errors"] >= 2
        assert sum("could not write an entry" in m for m in messages) == 1, messages

    _with_a_full_disk(scenario)


async def test_configured_limits_are_validated(
    store_factory: Callable[[str], Any], cache_dir: Path
) -> None:
    store: Store = await store_factory("table")
    bad: list[dict[str, Any]] = [
        {"max_rows": 0},
        {"gc_interval_ms": -1},
        {"memory_value_bytes": 0},
        {"max_entry_bytes": True},
        {"namespace": "a:b"},
        {"serializer": "yaml"},
        {"serializer": "pickle"},  # no secret
        {"serializer": "pickle", "secret": "short" * 3},
        {"secret": "short"},
        {"lock_lease": 0},
    ]
    for kw in bad:
        kw = {"cache_dir": str(cache_dir), "store": store, "gc_interval_ms": 0, **kw}
        with pytest.raises(ConfigError):
            Cache(**kw)


def test_secret_from_environment_is_used(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, cache_factory: Callable[..., Cache]
) -> None:
    monkeypatch.setenv("ZEAL_CACHE_SECRET", SECRET)
    from zeal_asgi.store.backends.table import TableBackend

    backend = TableBackend(namespace="envsecret")
    try:
        a = cache_factory(Store(backend=backend), serializer="pickle")  # needs the env secret
        monkeypatch.delenv("ZEAL_CACHE_SECRET")
        b = cache_factory(Store(backend=backend), secret=SECRET, namespace=a.namespace)
        assert a.files.name(b"k") == b.files.name(b"k")
    finally:
        backend.close_all()


def test_fsync_mode_writes_and_reads(tier_factory: Callable[..., FileTier]) -> None:
    tier = tier_factory(fsync=True)
    assert tier.write(b"k", 1, 0.0, b"durable", b"\0" * 16)
    entry = tier.read(b"k", time.time())
    assert entry is not None and entry.payload == b"durable"
