"""Tests of the harness (``tests/_harness``): real servers, the app launcher, their fixtures."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import pytest
import redis
import redis.cluster
import redis.sentinel

from tests._harness import servers
from tests._harness.apps import PORT, REPO, AppServer, CommandServer
from tests._harness.servers import (
    HOST,
    Memcached,
    RedisCluster,
    RedisSentinel,
    RedisServer,
    Server,
    ServerError,
    active_servers,
    free_port,
    require_binary,
    stop_all,
)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def _assert_gone(handles: list[tuple[int, Path]]) -> None:
    for pid, workdir in handles:
        assert not _pid_alive(pid), f"pid {pid} still alive"
        assert not workdir.exists(), f"{workdir} still exists"


def _handles(servers_: Sequence[Server]) -> list[tuple[int, Path]]:
    return [(s.pid, s.workdir) for s in servers_]


def _memcached_roundtrip(port: int, key: bytes, value: bytes) -> bytes:
    with socket.create_connection((HOST, port), timeout=2.0) as sock:
        sock.sendall(b"set %s 0 0 %d\r\n%s\r\n" % (key, len(value), value))
        assert sock.recv(64) == b"STORED\r\n"
        sock.sendall(b"get %s\r\n" % key)
        reply = b""
        while not reply.endswith(b"END\r\n"):
            chunk = sock.recv(4096)
            assert chunk, "memcached closed the connection"
            reply += chunk
        return reply


def _discover(
    sentinels: list[tuple[str, int]],
) -> tuple[tuple[str, int], list[tuple[str, int]]]:
    """Master and replicas of "mymaster" as redis-py's Sentinel client finds them."""
    client = redis.sentinel.Sentinel(sentinels, socket_timeout=2.0)
    try:
        host, port = client.discover_master("mymaster")
        master = (str(host), int(port))
        replicas = [(str(h), int(p)) for h, p in client.discover_slaves("mymaster")]
    finally:
        client.close()
    return master, replicas


@pytest.fixture
def client(redis_url: str) -> Iterator[redis.Redis]:
    r = redis.Redis.from_url(redis_url, socket_timeout=2.0)
    yield r
    r.close()


def test_free_port_is_bindable_on_loopback() -> None:
    port = free_port()
    assert 0 < port < 65536
    with socket.socket() as sock:
        sock.bind((HOST, port))


def test_require_binary_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    assert require_binary(sys.executable) == sys.executable
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_binary("zeal-no-such-binary")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require_binary("zeal-no-such-binary")


@pytest.mark.redis
def test_redis_server_answers_on_loopback_with_debug(
    redis_server: RedisServer, client: redis.Redis
) -> None:
    assert redis_server.url == f"redis://127.0.0.1:{redis_server.port}"
    assert client.ping() is True
    assert client.config_get("bind") == {"bind": "127.0.0.1"}
    assert client.config_get("save") == {"save": ""}
    assert redis_server.command("DEBUG", "SLEEP", "0") == b"OK"


@pytest.mark.redis
def test_redis_url_flushes(redis_server: RedisServer, request: pytest.FixtureRequest) -> None:
    redis_server.command("SET", "leftover", "1")
    url = request.getfixturevalue("redis_url")
    assert url == redis_server.url
    assert redis_server.command("DBSIZE") == 0


@pytest.mark.redis
def test_redis_tls_verifies_with_the_throwaway_ca(redis_tls_server: RedisServer) -> None:
    assert redis_tls_server.url == f"rediss://localhost:{redis_tls_server.port}"
    ca = str(redis_tls_server.ca_path)
    r = redis.Redis.from_url(redis_tls_server.url, ssl_ca_certs=ca, socket_timeout=2.0)
    try:
        assert r.ping() is True
    finally:
        r.close()
    # Also by IP: the certificate names 127.0.0.1 too.
    r = redis.Redis(host=HOST, port=redis_tls_server.port, ssl=True, ssl_ca_certs=ca)
    try:
        assert r.ping() is True
    finally:
        r.close()
    # The system trust store does not know the throwaway CA.
    r = redis.Redis.from_url(redis_tls_server.url, socket_timeout=2.0)
    try:
        with pytest.raises(redis.ConnectionError, match="certificate verify failed"):
            r.ping()
    finally:
        r.close()


@pytest.mark.redis
def test_redis_password() -> None:
    require_binary("redis-server")
    with RedisServer(password="p@ss word") as server:
        assert server.url == f"redis://:p%40ss%20word@127.0.0.1:{server.port}"
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(HOST, server.port).ping()
        r = redis.Redis.from_url(server.url)
        try:
            assert r.ping() is True
        finally:
            r.close()


@pytest.mark.redis
def test_redis_cluster(redis_cluster: RedisCluster) -> None:
    assert len(redis_cluster.nodes) == 3
    for server in redis_cluster.servers:
        assert b"cluster_state:ok" in server.command("CLUSTER", "INFO")
    nodes = [
        redis.cluster.ClusterNode(**n)  # type: ignore[no-untyped-call]
        for n in redis_cluster.startup_nodes
    ]
    rc = redis.cluster.RedisCluster(startup_nodes=nodes, socket_timeout=2.0)
    try:
        keys = [f"zeal-test:{i}" for i in range(20)]
        for key in keys:
            rc.set(key, key)
        assert [rc.get(k) for k in keys] == [k.encode() for k in keys]
        # The keys spread over more than one master.
        assert sum(s.command("DBSIZE") != 0 for s in redis_cluster.servers) > 1
        rc.delete(*keys)
    finally:
        rc.close()


@pytest.mark.redis
def test_redis_sentinel_discovery(redis_sentinel: RedisSentinel) -> None:
    assert redis_sentinel.service == "mymaster"
    assert len(redis_sentinel.sentinels) == 3
    master, replicas = _discover(redis_sentinel.sentinels)
    assert master == (HOST, redis_sentinel.master.port)
    assert replicas == [(HOST, redis_sentinel.replica.port)]


@pytest.mark.memcached
def test_memcached_set_get(memcached_server: Memcached) -> None:
    assert memcached_server.url == f"memcached://127.0.0.1:{memcached_server.port}"
    reply = _memcached_roundtrip(memcached_server.port, b"zeal", b"hello")
    assert reply == b"VALUE zeal 0 5\r\nhello\r\nEND\r\n"


@pytest.mark.redis
def test_kill_and_restart_keep_the_port(fresh_redis: RedisServer) -> None:
    port, pid = fresh_redis.port, fresh_redis.pid
    fresh_redis.command("SET", "k", "v")
    fresh_redis.kill()
    assert not _pid_alive(pid)
    with pytest.raises(redis.ConnectionError, match="Connection refused"):
        fresh_redis.command("PING")
    fresh_redis.restart()
    assert (fresh_redis.port, fresh_redis.command("PING")) == (port, True)
    assert fresh_redis.pid != pid
    # No persistence: a restarted server is empty.
    assert fresh_redis.command("GET", "k") is None
    # Restart of a running server too.
    pid = fresh_redis.pid
    fresh_redis.restart()
    assert fresh_redis.port == port
    assert fresh_redis.pid != pid


@pytest.mark.redis
def test_pause_and_resume(fresh_redis: RedisServer) -> None:
    r = redis.Redis.from_url(fresh_redis.url, socket_timeout=0.2)
    try:
        assert r.ping() is True
        fresh_redis.pause()
        with pytest.raises(redis.TimeoutError):
            r.ping()
        fresh_redis.resume()
        r.connection_pool.disconnect()
        assert r.ping() is True
    finally:
        r.close()


@pytest.mark.redis
def test_start_retries_when_the_port_is_taken(monkeypatch: pytest.MonkeyPatch) -> None:
    require_binary("redis-server")
    with socket.socket() as squatter:
        squatter.bind((HOST, 0))
        squatter.listen()
        taken = squatter.getsockname()[1]
        real_free_port = servers.free_port
        picks = iter([taken])
        monkeypatch.setattr(servers, "free_port", lambda: next(picks, 0) or real_free_port())
        with RedisServer() as server:
            assert server.port != taken
            assert server.command("PING") is True
            assert "Address already in use" in server.log_path.read_text()


@pytest.mark.redis
def test_startup_failure_reports_the_log() -> None:
    require_binary("redis-server")
    server = RedisServer(extra_args=("--no-such-directive", "1"))
    with pytest.raises(ServerError, match=r"(?s)exited with status.*no-such-directive"):
        server.start()
    assert server not in active_servers()
    assert (server.process, server.dir) == (None, None)


@pytest.mark.redis
@pytest.mark.memcached
def test_stop_leaves_no_process_and_no_temp_dir() -> None:
    for binary in ("redis-server", "openssl", "memcached", "redis-cli"):
        require_binary(binary)
    before = set(map(id, active_servers()))
    server = RedisServer(tls=True).start()
    mc = Memcached().start()
    cluster = RedisCluster().start()
    handles = _handles([server, mc, *cluster.servers])
    stop_all([server, mc])
    cluster.stop()
    _assert_gone(handles)
    server.stop()  # idempotent
    assert set(map(id, active_servers())) == before


@pytest.mark.redis
def test_sentinel_failover_after_master_sigkill() -> None:
    require_binary("redis-server")
    require_binary("redis-sentinel")
    with RedisSentinel() as setup:
        handles = _handles(setup.processes())
        old_master, old_replica = setup.master, setup.replica
        old_master.command("SET", "before-failover", "1")
        _wait_replicated(old_replica, "before-failover")
        old_master.kill()
        started = time.monotonic()
        address = setup.wait_for_failover(timeout=30.0)
        elapsed = time.monotonic() - started
        assert address == (HOST, old_replica.port)
        assert (setup.master, setup.replica) == (old_replica, old_master)
        assert elapsed < 20, f"failover took {elapsed:.1f} s"
        assert _discover(setup.sentinels)[0] == address
        assert setup.master.command("GET", "before-failover") == b"1"
        assert setup.master.command("SET", "after-failover", "1") is True
    _assert_gone(handles)


def _wait_replicated(replica: RedisServer, key: str) -> None:
    deadline = time.monotonic() + 5
    while replica.command("EXISTS", key) != 1:
        assert time.monotonic() < deadline, "replication did not catch up"
        time.sleep(0.005)


@pytest.mark.redis
def test_session_finish_fails_on_a_leaked_server(tmp_path: Path) -> None:
    require_binary("redis-server")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    (tmp_path / "test_leak.py").write_text(
        textwrap.dedent(
            """
            from tests._harness.servers import RedisServer

            def test_leak():
                server = RedisServer().start()
                print("LEAKED-PID", server.pid, server.workdir)
            """
        )
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("PYTEST_ADDOPTS", None)
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-s",
            "-p",
            "tests._harness.plugin",
            "-p",
            "no:cacheprovider",
        ],
        cwd=tmp_path,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    output = result.stdout + result.stderr
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, output
    assert "LEAKED TEST SERVERS" in output
    assert "1 passed" in output
    pid, workdir = output.split("LEAKED-PID ", 1)[1].split()[:2]
    _assert_gone([(int(pid), Path(workdir))])


ECHO_APP = "tests._harness.echo_app:app"


def _alive(pids: Iterable[int]) -> list[int]:
    return [pid for pid in pids if _pid_alive(pid) and not _zombie(pid)]


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.mark.servers
def test_app_server_waits_for_its_workers_and_stops_them_all(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ZEAL_FROM_THE_TEST_PROCESS", "1")
    server = AppServer(ECHO_APP, server="uvicorn-workers", workers=2, env={"GIVEN": "yes"})
    with server:
        master, workdir = server.pid, server.workdir
        assert len(server.worker_pids) == 2
        assert all(server.get_from("/pid", pid=p)["ppid"] == master for p in server.worker_pids)
        names = ["GIVEN", "ZEAL_FROM_THE_TEST_PROCESS", "PYTHONPATH"]
        seen = server.get("/env", name=names)
        assert seen["GIVEN"] == "yes"
        assert seen["ZEAL_FROM_THE_TEST_PROCESS"] is None  # ZEAL_* of the test never leak in
        assert str(REPO) in seen["PYTHONPATH"].split(os.pathsep)
        assert server in active_servers()
    assert _alive([master, *server.worker_pids]) == []
    assert not workdir.exists()
    assert server not in active_servers()
    assert server.log_text().count("Application startup complete") == 2  # kept after stop


@pytest.mark.servers
def test_app_server_without_a_pid_route_waits_for_every_workers_startup() -> None:
    # /env names no worker: readiness counts the startups the log shows instead.
    with AppServer(ECHO_APP, server="gunicorn", workers=2, ready="/env") as server:
        assert server.log_since_launch().count("Application startup complete") == 2
        assert server.worker_pids == set()


@pytest.mark.servers
def test_app_server_startup_failure_reports_the_log() -> None:
    server = AppServer("tests.no_such_module:app", server="uvicorn")
    with pytest.raises(ServerError, match=r"(?s)exited with status.*tests\.no_such_module"):
        server.start()
    assert server not in active_servers()
    assert (server.process, server.dir) == (None, None)


def test_app_server_refuses_an_unknown_server_model() -> None:
    with pytest.raises(ValueError, match="hypercorn"):
        AppServer(ECHO_APP, server="hypercorn")


@pytest.mark.servers
def test_command_server_runs_the_command_as_given_and_stops_its_whole_group(
    tmp_path: Path,
) -> None:
    # A shell that stays the parent of uvicorn and its two workers: SIGTERM to the shell alone
    # would leave them running.
    uvicorn = f"{sys.executable} -m uvicorn {ECHO_APP} --workers 2 --port {PORT}"
    env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "GIVEN": f"port {PORT}"}
    argv = ["bash", "-c", f"pwd; {uvicorn}; echo not reached"]
    with CommandServer(argv, ready="/pid", env=env, cwd=tmp_path) as server:
        shell, workdir = server.pid, server.workdir
        assert server.ready_status == 200
        assert server.fetch("/env?name=GIVEN") == (200, {"GIVEN": f"port {server.port}"})
        workers: set[int] = set()
        for _ in range(400):  # a new connection each, so that both workers answer
            workers.add(server.fetch("/pid")[1]["pid"])
            if len(workers) == 2:
                break
        assert len(workers) == 2
        assert server in active_servers()
    assert _alive([shell, *workers]) == []
    assert not workdir.exists()
    assert server not in active_servers()
    log = server.log_text()
    assert log.splitlines()[0] == str(tmp_path)  # run in ``cwd``
    assert log.count("Finished server process") == 2  # both workers stopped cleanly, not killed
    assert "not reached" not in log


@pytest.mark.servers
def test_command_server_startup_failure_reports_the_log(tmp_path: Path) -> None:
    server = CommandServer(
        ["bash", "-c", f"echo no server on port {PORT}; exit 3"],
        ready="/",
        env={"PATH": os.environ["PATH"]},
        cwd=tmp_path,
    )
    with pytest.raises(ServerError, match=r"(?s)exited with status 3.*no server on port \d+"):
        server.start()
    assert server not in active_servers()
    assert (server.process, server.dir) == (None, None)
