"""The harness as a pytest plugin (``pytest_plugins`` in ``tests/conftest.py``): the shared
server fixtures, and the session's leak checks (server processes, temp dirs, shared memory).

Servers shared by the session start on first use; ``fresh_*`` ones belong to one test, which may
kill, pause or restart them.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import pytest

from tests._harness.apps import AppServers
from tests._harness.servers import (
    Memcached,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    require_binary,
    stop_leftovers,
)
from zeal_asgi.shm.process import process_alive
from zeal_asgi.shm.segments import server_identity, shm_dir


def pytest_sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    """Fail the run if a test left a server process (or its temp dir) behind."""
    leaked = stop_leftovers()
    if not leaked:
        return
    message = "test servers left behind (now stopped); a fixture or test did not stop them:"
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.write_sep("!", "LEAKED TEST SERVERS", red=True, bold=True)
        reporter.write_line(message, red=True)
        for line in leaked:
            reporter.write_line(f"  {line}", red=True)
    else:
        print(message, *leaked, sep="\n  ", file=sys.stderr)
    if session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def _stale_segments() -> set[str]:
    """Segments of this user whose server process is gone (what a leaky server leaves behind).

    Live servers (of this run or of another run on the same machine) are not counted."""
    mine = f"zeal.{os.geteuid()}."
    own = f"{mine}{server_identity().server_id}."
    try:
        names = os.listdir(shm_dir())
    except OSError:
        return set()
    stale = set()
    for n in names:
        if not n.startswith(mine) or n.startswith(own):
            continue
        sid = n[len(mine) :].split(".")[0]
        pid, _, start = sid.partition("-")
        if pid.isdigit() and start.isdigit() and process_alive(int(pid), int(start)):
            continue
        stale.add(n)
    return stale


@pytest.fixture(scope="session", autouse=True)
def _no_leaked_segments() -> Iterator[None]:
    """Servers started by tests must leave no shared memory behind (checked at session end)."""
    before = _stale_segments()
    yield
    deadline = time.monotonic() + 5.0
    leaked = _stale_segments() - before
    while leaked and time.monotonic() < deadline:  # janitors unlink right after their server
        time.sleep(0.1)
        leaked = _stale_segments() - before
    assert not leaked, f"shared-memory segments leaked by test servers: {sorted(leaked)}"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """A redis-server shared by the session. Use ``redis_url`` for a flushed one."""
    require_binary("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def redis_url(redis_server: RedisServer) -> str:
    """The session redis-server's URL, after FLUSHALL."""
    redis_server.command("FLUSHALL")
    return redis_server.url


@pytest.fixture(scope="session")
def redis_tls_server() -> Iterator[RedisServer]:
    """A TLS-only redis-server; clients verify it with ``ca_path`` and the name ``localhost``."""
    require_binary("redis-server")
    require_binary("openssl")
    with RedisServer(tls=True) as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisCluster]:
    """A 3-master Redis Cluster shared by the session."""
    require_binary("redis-server")
    require_binary("redis-cli")
    with RedisCluster() as cluster:
        yield cluster


@pytest.fixture(scope="session")
def redis_sentinel() -> Iterator[RedisSentinel]:
    """Master, replica and 3 sentinels shared by the session; don't kill them (make your own)."""
    require_binary("redis-server")
    require_binary("redis-sentinel")
    with RedisSentinel() as sentinel:
        yield sentinel


@pytest.fixture(scope="session")
def memcached_server() -> Iterator[Memcached]:
    """A memcached shared by the session."""
    require_binary("memcached")
    with Memcached() as server:
        yield server


@pytest.fixture
def fresh_redis() -> Iterator[RedisServer]:
    """A private redis-server for this test only, free to kill, pause or restart."""
    require_binary("redis-server")
    with RedisServer() as server:
        yield server


@pytest.fixture
def fresh_memcached() -> Iterator[Memcached]:
    """A private memcached for this test only, free to kill, pause or restart."""
    require_binary("memcached")
    with Memcached() as server:
        yield server


@pytest.fixture
def app_servers() -> Iterator[AppServers]:
    """Apps under real server programs: ``app_servers.start(app, server=..., workers=...,
    env=...)``; every one is stopped (gracefully, then killed) when the test ends."""
    servers = AppServers()
    yield servers
    servers.stop()
