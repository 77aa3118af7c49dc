"""Real servers for the test suite: redis-server (plain, TLS, cluster, sentinel) and memcached.

The helper classes do not need pytest at run time (benchmarks use them too); the fixtures at the
end wrap them for the suite, which loads this module as a plugin (``pytest_plugins``).

Every server binds 127.0.0.1 on a port picked by the kernel, runs in its own session and temp dir
(which also holds its log), and is stopped on teardown, by an ``atexit`` safety net, and checked
for at session finish. Startup polls readiness every few milliseconds instead of sleeping.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import BinaryIO, Self, TypeAlias, TypedDict

import pytest

__all__ = [
    "HOST",
    "ClusterNodeSpec",
    "Memcached",
    "RedisCluster",
    "RedisReplyError",
    "RedisSentinel",
    "RedisServer",
    "SentinelServer",
    "Server",
    "ServerError",
    "TlsFiles",
    "active_servers",
    "free_port",
    "generate_tls_files",
    "redis_command",
    "require_binary",
    "stop_all",
]

HOST = "127.0.0.1"
"""The only address any helper binds or connects to."""

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 3.0
POLL_INTERVAL = 0.005
_PROBE_TIMEOUT = 0.5
_BIND_ATTEMPTS = 5
_LOG_TAIL_LINES = 40
_ADDR_IN_USE = "Address already in use"

Resp: TypeAlias = "bytes | int | list[Resp] | None"
"""A decoded RESP2 reply."""


class ServerError(RuntimeError):
    """A test server could not be started, did not become ready, or did not answer."""


class RedisReplyError(Exception):
    """An error reply (``-ERR ...``) from a Redis server."""


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that was free a moment ago (another process may take it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def _free_port_except(*taken: int) -> int:
    while True:
        port = free_port()
        if port not in taken:
            return port


def require_binary(name: str) -> str:
    """Return the path of ``name``; skip the test if it is missing, or fail it when CI=true.

    A service missing in CI is a broken CI setup, so it must never turn into a silent skip.
    """
    path = shutil.which(name)
    if path is not None:
        return path
    msg = f"{name!r} not found on PATH; run scripts/install-test-deps.sh"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{msg} (CI=true: a missing service is a failure)", pytrace=False)
    pytest.skip(msg)


def _binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise ServerError(f"{name!r} not found on PATH; run scripts/install-test-deps.sh")
    return path


# --- a minimal RESP2 client: readiness probes must not depend on the project's redis extra ----


def _encode_command(args: Sequence[str | bytes | int]) -> bytes:
    parts = [b"*%d\r\n" % len(args)]
    for arg in args:
        data = arg if isinstance(arg, bytes) else str(arg).encode()
        parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(parts)


def _read_reply(reader: BinaryIO) -> Resp:
    line = reader.readline()
    if not line.endswith(b"\r\n"):
        raise ConnectionError("connection closed in the middle of a reply")
    kind, rest = line[:1], line[1:-2]
    if kind == b"+":
        return rest
    if kind == b"-":
        raise RedisReplyError(rest.decode(errors="replace"))
    if kind == b":":
        return int(rest)
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return None
        data = reader.read(size + 2)
        if len(data) != size + 2:
            raise ConnectionError("connection closed in the middle of a reply")
        return data[:-2]
    if kind == b"*":
        count = int(rest)
        if count < 0:
            return None
        return [_read_reply(reader) for _ in range(count)]
    raise ConnectionError(f"not a RESP2 reply: {line!r}")


def redis_command(
    host: str,
    port: int,
    *args: str | bytes | int,
    password: str | None = None,
    ssl_context: ssl.SSLContext | None = None,
    server_hostname: str | None = None,
    timeout: float = 2.0,
) -> Resp:
    """Send one command on a new connection and return its decoded reply.

    Raises ``OSError`` (including ``ssl.SSLError``) if the server cannot be reached and
    ``RedisReplyError`` for an error reply.
    """
    commands: list[Sequence[str | bytes | int]] = []
    if password is not None:
        commands.append(("AUTH", password))
    commands.append(args)
    with contextlib.ExitStack() as stack:
        sock = stack.enter_context(socket.create_connection((host, port), timeout=timeout))
        if ssl_context is not None:
            sock = stack.enter_context(
                ssl_context.wrap_socket(sock, server_hostname=server_hostname or host)
            )
        reader = stack.enter_context(sock.makefile("rb"))
        sock.sendall(b"".join(_encode_command(c) for c in commands))
        reply: Resp = None
        for _ in commands:
            reply = _read_reply(reader)
        return reply


def _info_fields(reply: Resp) -> dict[str, str]:
    if not isinstance(reply, bytes):
        return {}
    fields: dict[str, str] = {}
    for line in reply.decode().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key] = value
    return fields


def _pairs(reply: Resp) -> dict[str, str]:
    if not isinstance(reply, list):
        return {}
    items = [x.decode() if isinstance(x, bytes) else str(x) for x in reply]
    return dict(zip(items[::2], items[1::2], strict=False))


# --- TLS material -------------------------------------------------------------------------------

_OPENSSL_CONFIG = """\
[req]
distinguished_name = dn
prompt = no
x509_extensions = ca_ext
[dn]
CN = zeal-asgi throwaway test CA
[ca_ext]
basicConstraints = critical, CA:TRUE
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
[server_ext]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature, keyEncipherment
extendedKeyUsage = serverAuth, clientAuth
subjectAltName = DNS:localhost, IP:127.0.0.1
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


@dataclass(frozen=True)
class TlsFiles:
    """Paths of a throwaway CA certificate and a server certificate/key signed by it."""

    ca_path: Path
    cert_path: Path
    key_path: Path


def generate_tls_files(directory: Path) -> TlsFiles:
    """Write a new CA and a server certificate for ``localhost`` and ``127.0.0.1``.

    Uses the ``openssl`` command line (EC P-256 keys, 2 days), so no Python dependency is needed.
    The extensions satisfy ``ssl.VERIFY_X509_STRICT``.
    """
    openssl = _binary("openssl")
    config = directory / "openssl.cnf"
    config.write_text(_OPENSSL_CONFIG)
    files = TlsFiles(directory / "ca.crt", directory / "server.crt", directory / "server.key")
    ca_key, csr = directory / "ca.key", directory / "server.csr"
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    serial = str(int.from_bytes(os.urandom(8), "big"))
    ca_args = ["-keyout", str(ca_key), "-out", str(files.ca_path), "-days", "2"]
    csr_args = ["-keyout", str(files.key_path), "-out", str(csr), "-subj", "/CN=localhost"]
    sign_args = ["-in", str(csr), "-CA", str(files.ca_path), "-CAkey", str(ca_key), "-days", "2"]
    sign_args += ["-set_serial", serial, "-extfile", str(config), "-extensions", "server_ext"]
    commands = [
        [openssl, "req", "-x509", "-config", str(config), *ec, *ca_args],
        [openssl, "req", "-new", *ec, *csr_args],
        [openssl, "x509", "-req", *sign_args, "-out", str(files.cert_path)],
    ]
    for command in commands:
        result = subprocess.run(
            command, stdin=subprocess.DEVNULL, capture_output=True, check=False, timeout=30
        )
        if result.returncode != 0:
            output = (result.stdout + result.stderr).decode(errors="replace")
            raise ServerError(f"{' '.join(command)} failed:\n{output}")
    return files


# --- process lifecycle --------------------------------------------------------------------------

_LOCK = threading.RLock()
_ACTIVE: dict[int, Server] = {}
"""Servers that own a process or a temp dir, keyed by id(): what the safety nets clean up."""


def active_servers() -> list[Server]:
    """Servers started by these helpers that still own a process or a temp dir."""
    with _LOCK:
        return list(_ACTIVE.values())


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    # poll() first: an unreaped child keeps its pid (and so its group id) from being reused.
    # The whole group is signalled so forked children (diskless-sync senders) go too.
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _terminate(procs: Iterable[subprocess.Popen[bytes]], timeout: float = STOP_TIMEOUT) -> None:
    procs = list(procs)
    for proc in procs:
        _signal_group(proc, signal.SIGTERM)
        # A SIGSTOPped server only acts on SIGTERM once continued.
        _signal_group(proc, signal.SIGCONT)
    deadline = time.monotonic() + timeout
    for proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()


class Server:
    """One server process on a loopback port, in its own temp dir holding its log.

    ``start()`` picks a free port (retrying with a new one if the bind fails); after ``kill()``
    or in ``restart()`` it comes back on the same port and temp dir. ``stop()`` ends the
    process and removes the temp dir, so a later ``start()`` begins afresh.
    """

    kind = "server"

    def __init__(self) -> None:
        self.host = HOST
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None

    # Subclass hooks.
    def _argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def _probe(self) -> int | None:
        """The pid of the server answering on ``self.port``, or None if none answers yet."""
        raise NotImplementedError

    def _prepare(self, workdir: Path) -> None:
        """Write what the server needs in its fresh temp dir before the first start."""

    @property
    def workdir(self) -> Path:
        """The server's temp dir (created by ``start()``)."""
        if self.dir is None:
            raise ServerError(f"{self!r} has no temp dir: not started")
        return self.dir

    @property
    def log_path(self) -> Path:
        """The file that receives the server's stdout and stderr."""
        return self.workdir / "server.log"

    @property
    def pid(self) -> int:
        """The pid of the running server process."""
        if self.process is None:
            raise ServerError(f"{self!r} is not running")
        return self.process.pid

    @property
    def running(self) -> bool:
        """True while the process exists (also when paused)."""
        return self.process is not None and self.process.poll() is None

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log, for error messages."""
        try:
            text = self.log_path.read_text(errors="replace")
        except (OSError, ServerError):
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    def start(self) -> Self:
        """Start the server and wait until it answers; return self."""
        if self.running:
            return self
        with _LOCK:
            _ACTIVE[id(self)] = self
        deadline = time.monotonic() + STARTUP_TIMEOUT
        try:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix=f"zeal-{self.kind}-"))
                self._prepare(self.dir)
            if self.port:
                # Same port as before: something else may hold it for a moment, so keep trying.
                while not self._launch(self.port, deadline):
                    if time.monotonic() > deadline:
                        raise ServerError(f"port {self.port} stayed in use:\n{self.log_tail()}")
                    time.sleep(0.05)
                return self
            for _ in range(_BIND_ATTEMPTS):
                if self._launch(free_port(), deadline):
                    return self
            raise ServerError(f"{self.kind}: no free port after {_BIND_ATTEMPTS} attempts")
        except BaseException:
            self.stop()
            raise

    def _launch(self, port: int, deadline: float) -> bool:
        """Run the process on ``port``; False if the bind failed, ServerError on other failures."""
        log = self.log_path
        offset = log.stat().st_size if log.exists() else 0
        argv = self._argv(port)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
                start_new_session=True,
            )
        self.process, self.port = proc, port
        while True:
            if proc.poll() is not None:
                self.process = None
                with log.open("rb") as f:
                    f.seek(offset)
                    output = f.read().decode(errors="replace")
                if _ADDR_IN_USE in output:
                    return False
                raise ServerError(
                    f"{' '.join(argv)} exited with status {proc.returncode} during startup; "
                    f"log {log}:\n{self.log_tail()}"
                )
            # Compare pids: until our process fails to bind, another server that holds the
            # port (say, from a parallel test run) could answer the probe.
            if self._probe() == proc.pid:
                return True
            if time.monotonic() > deadline:
                _terminate([proc])
                self.process = None
                raise ServerError(
                    f"{' '.join(argv)} not ready after {STARTUP_TIMEOUT} s; "
                    f"log {log}:\n{self.log_tail()}"
                )
            time.sleep(POLL_INTERVAL)

    def stop(self) -> None:
        """Stop the process (SIGTERM, SIGKILL after a short wait) and remove the temp dir."""
        if self.process is not None:
            _terminate([self.process])
            self.process = None
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.port = 0
        with _LOCK:
            _ACTIVE.pop(id(self), None)

    def kill(self) -> None:
        """SIGKILL the process and reap it; the temp dir and port are kept for ``restart()``."""
        if self.process is not None:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait()
            self.process = None

    def restart(self) -> Self:
        """Stop the process if it runs (keeping the temp dir) and start it on the same port."""
        if self.process is not None:
            _terminate([self.process])
            self.process = None
        return self.start()

    def pause(self) -> None:
        """SIGSTOP the server: it keeps its sockets open but answers nothing."""
        if self.process is None:
            raise ServerError(f"{self!r} is not running")
        _signal_group(self.process, signal.SIGSTOP)
        self._wait_state("T")

    def resume(self) -> None:
        """SIGCONT a paused server."""
        if self.process is None:
            raise ServerError(f"{self!r} is not running")
        _signal_group(self.process, signal.SIGCONT)

    def _wait_state(self, state: str, timeout: float = 2.0) -> None:
        # Signal delivery is asynchronous; a test that pauses and then expects a timeout must not
        # race the kernel. Without /proc there is nothing to wait on.
        stat = Path(f"/proc/{self.pid}/stat")
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                fields = stat.read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                return
            if fields and fields[0] == state:
                return
            time.sleep(POLL_INTERVAL)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"{type(self).__name__}({self.host}:{self.port}, pid={pid}, dir={self.dir})"


def stop_all(servers: Iterable[Server]) -> None:
    """Stop several servers at once: signal all first so their shutdowns overlap."""
    servers = list(servers)
    _terminate(s.process for s in servers if s.process is not None)
    for server in servers:
        server.process = None
        server.stop()


class RedisServer(Server):
    """A ``redis-server`` on 127.0.0.1 with no persistence and ``DEBUG`` enabled for local clients.

    With ``tls=True`` it serves TLS only, with a throwaway CA (``ca_path``) and a certificate
    for ``localhost`` and 127.0.0.1; ``url`` is then ``rediss://localhost:PORT``.
    """

    kind = "redis"
    binary = "redis-server"

    def __init__(
        self, tls: bool = False, password: str | None = None, extra_args: Sequence[str] = ()
    ) -> None:
        super().__init__()
        self.tls = tls
        self.password = password
        self.extra_args = tuple(extra_args)
        self.tls_files: TlsFiles | None = None
        self._ssl_context: ssl.SSLContext | None = None

    def _prepare(self, workdir: Path) -> None:
        if self.tls:
            self.tls_files = generate_tls_files(workdir)
            self._ssl_context = ssl.create_default_context(cafile=str(self.tls_files.ca_path))

    def _argv(self, port: int) -> list[str]:
        argv = [_binary(self.binary), "--bind", HOST, "--daemonize", "no", "--logfile", ""]
        argv += ["--dir", str(self.workdir), "--save", "", "--appendonly", "no"]
        # Replicas sync at once instead of after the default 5 s wait for more replicas.
        argv += ["--enable-debug-command", "local", "--repl-diskless-sync-delay", "0"]
        if self.tls_files is not None:
            argv += ["--port", "0", "--tls-port", str(port)]
            argv += ["--tls-cert-file", str(self.tls_files.cert_path)]
            argv += ["--tls-key-file", str(self.tls_files.key_path)]
            argv += ["--tls-ca-cert-file", str(self.tls_files.ca_path)]
            argv += ["--tls-auth-clients", "no"]
        else:
            argv += ["--port", str(port)]
        if self.password is not None:
            argv += ["--requirepass", self.password]
        return argv + list(self.extra_args)

    @property
    def ca_path(self) -> Path:
        """The CA certificate that signed the server certificate (TLS mode only)."""
        if self.tls_files is None:
            raise ServerError("ca_path exists only for RedisServer(tls=True) once started")
        return self.tls_files.ca_path

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT``, or ``rediss://[:password@]localhost:PORT``."""
        auth = "" if self.password is None else f":{urllib.parse.quote(self.password, safe='')}@"
        if self.tls:
            return f"rediss://{auth}localhost:{self.port}"
        return f"redis://{auth}{self.host}:{self.port}"

    def ssl_context(self) -> ssl.SSLContext:
        """A client context that trusts only this server's throwaway CA (TLS mode only)."""
        return ssl.create_default_context(cafile=str(self.ca_path))

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> Resp:
        """Run one command on a new connection (with AUTH and TLS as configured)."""
        return redis_command(
            self.host,
            self.port,
            *args,
            password=self.password,
            ssl_context=self._ssl_context,
            server_hostname="localhost",
            timeout=timeout,
        )

    def info(self, section: str) -> dict[str, str]:
        """``INFO section`` as a dict of strings."""
        return _info_fields(self.command("INFO", section))

    def _probe(self) -> int | None:
        return _redis_pid(self.command)


def _redis_pid(command: Callable[..., Resp]) -> int | None:
    try:
        pid = _info_fields(command("INFO", "server", timeout=_PROBE_TIMEOUT)).get("process_id")
    except (OSError, RedisReplyError):
        return None
    return int(pid) if pid else None


def _wait_for(
    condition: Callable[[], bool],
    what: str,
    timeout: float = STARTUP_TIMEOUT,
    logs: Callable[[], str] = lambda: "",
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if condition():
                return
        except (OSError, RedisReplyError):
            pass
        if time.monotonic() > deadline:
            raise ServerError(f"timed out after {timeout} s waiting for {what}\n{logs()}")
        time.sleep(2 * POLL_INTERVAL)


class ClusterNodeSpec(TypedDict):
    """A startup node as keyword arguments: ``redis.cluster.ClusterNode(**spec)``."""

    host: str
    port: int


class _ClusterNode(RedisServer):
    kind = "redis-cluster"

    def __init__(self, node_timeout_ms: int) -> None:
        super().__init__(
            extra_args=(
                "--cluster-enabled",
                "yes",
                "--cluster-config-file",
                "nodes.conf",
                "--cluster-node-timeout",
                str(node_timeout_ms),
            )
        )
        self.bus_port = 0
        self._bus_for = 0

    def _argv(self, port: int) -> list[str]:
        # The default bus port (port + 10000) can be above 65535 for an ephemeral port, and
        # nobody checked it was free, so pick one; a restart on the same port keeps it.
        if self._bus_for != port:
            self.bus_port, self._bus_for = _free_port_except(port), port
        return [*super()._argv(port), "--cluster-port", str(self.bus_port)]


class RedisCluster:
    """A Redis Cluster of ``masters`` masters with ``replicas`` replicas each, all on 127.0.0.1."""

    def __init__(self, masters: int = 3, replicas: int = 0, node_timeout_ms: int = 2000) -> None:
        if masters < 3:
            raise ValueError("redis-cli --cluster create needs at least 3 masters")
        self.masters = masters
        self.replicas = replicas
        self.servers: list[RedisServer] = [
            _ClusterNode(node_timeout_ms) for _ in range(masters * (1 + replicas))
        ]

    @property
    def nodes(self) -> list[tuple[str, int]]:
        """(host, port) of every node."""
        return [(s.host, s.port) for s in self.servers]

    @property
    def startup_nodes(self) -> list[ClusterNodeSpec]:
        """Every node as ``{"host", "port"}``, e.g. ``[ClusterNode(**n) for n in ...]``."""
        return [ClusterNodeSpec(host=s.host, port=s.port) for s in self.servers]

    @property
    def url(self) -> str:
        """``redis://`` URL of the first node (a cluster client discovers the rest)."""
        return self.servers[0].url

    def start(self) -> Self:
        """Start the nodes, create the cluster and wait until every node reports it healthy."""
        try:
            for server in self.servers:
                server.start()
            command = [_binary("redis-cli"), "--cluster", "create"]
            command += [f"{host}:{port}" for host, port in self.nodes]
            command += ["--cluster-replicas", str(self.replicas), "--cluster-yes"]
            result = subprocess.run(
                command,
                stdin=subprocess.DEVNULL,
                capture_output=True,
                check=False,
                timeout=60,
                start_new_session=True,
            )
            if result.returncode != 0:
                output = (result.stdout + result.stderr).decode(errors="replace")
                raise ServerError(f"{' '.join(command)} failed:\n{output}")
            _wait_for(self._healthy, "cluster_state:ok on every node", logs=self._logs)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        replicas_up = 0
        for server in self.servers:
            info = _info_fields(server.command("CLUSTER", "INFO"))
            if (
                info.get("cluster_state") != "ok"
                or info.get("cluster_slots_assigned") != "16384"
                or info.get("cluster_known_nodes") != str(len(self.servers))
            ):
                return False
            replication = server.info("replication")
            if replication.get("role") == "slave":
                if replication.get("master_link_status") != "up":
                    return False
                replicas_up += 1
        return replicas_up == self.masters * self.replicas

    def _logs(self) -> str:
        return "\n".join(f"--- {s!r}\n{s.log_tail(10)}" for s in self.servers)

    def stop(self) -> None:
        """Stop every node and remove their temp dirs."""
        stop_all(self.servers)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class SentinelServer(Server):
    """One ``redis-sentinel`` process monitoring a master; its config file is in its temp dir."""

    kind = "redis-sentinel"
    binary = "redis-sentinel"

    def __init__(
        self,
        master_port: int,
        service: str = "mymaster",
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        super().__init__()
        self.master_port = master_port
        self.service = service
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self._config_port = 0

    def _argv(self, port: int) -> list[str]:
        config = self.workdir / "sentinel.conf"
        # Sentinel rewrites its config (ids, known peers); a restart on the same port keeps it.
        if self._config_port != port:
            name = self.service
            config.write_text(
                f"port {port}\n"
                f"bind {HOST}\n"
                f"dir {self.workdir}\n"
                'logfile ""\n'
                "daemonize no\n"
                "sentinel resolve-hostnames no\n"
                f"sentinel monitor {name} {HOST} {self.master_port} {self.quorum}\n"
                f"sentinel down-after-milliseconds {name} {self.down_after_ms}\n"
                f"sentinel failover-timeout {name} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {name} 1\n"
            )
            self._config_port = port
        return [_binary(self.binary), str(config)]

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> Resp:
        """Run one command on this sentinel."""
        return redis_command(self.host, self.port, *args, timeout=timeout)

    def master_address(self) -> tuple[str, int] | None:
        """What this sentinel currently reports as the master's address."""
        reply = self.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.service)
        if not isinstance(reply, list) or len(reply) != 2:
            return None
        host, port = reply
        if not isinstance(host, bytes) or not isinstance(port, bytes):
            return None
        return host.decode(), int(port)

    def _probe(self) -> int | None:
        return _redis_pid(self.command)


class RedisSentinel:
    """A master, one replica and ``sentinels`` sentinels (quorum 2) for service ``mymaster``.

    ``master`` and ``replica`` are ``RedisServer`` handles; after ``wait_for_failover()`` they
    are swapped to match the new roles.
    """

    service = "mymaster"

    def __init__(
        self,
        sentinels: int = 3,
        quorum: int = 2,
        down_after_ms: int = 1000,
        failover_timeout_ms: int = 5000,
    ) -> None:
        self.sentinel_count = sentinels
        self.quorum = quorum
        self.down_after_ms = down_after_ms
        self.failover_timeout_ms = failover_timeout_ms
        self.master = RedisServer()
        self.replica = RedisServer()
        self.sentinel_servers: list[SentinelServer] = []

    @property
    def sentinels(self) -> list[tuple[str, int]]:
        """(host, port) of every sentinel, as ``redis.sentinel.Sentinel`` takes them."""
        return [(s.host, s.port) for s in self.sentinel_servers]

    @property
    def servers(self) -> list[Server]:
        """Every process handle: sentinels, replica, master."""
        return [*self.sentinel_servers, self.replica, self.master]

    def start(self) -> Self:
        """Start master, replica and sentinels; wait until the sentinels see all of it."""
        try:
            self.master.start()
            self.replica.extra_args = ("--replicaof", HOST, str(self.master.port))
            self.replica.start()
            # Sentinels learn replicas from INFO on the master, sent every 10 s: the replica
            # must be attached before they start, or they would see it only 10 s later.
            _wait_for(self._replica_synced, "the replica to sync", logs=self._logs)
            self.sentinel_servers = [
                SentinelServer(
                    self.master.port,
                    self.service,
                    self.quorum,
                    self.down_after_ms,
                    self.failover_timeout_ms,
                )
                for _ in range(self.sentinel_count)
            ]
            for sentinel in self.sentinel_servers:
                sentinel.start()
            _wait_for(self._sentinels_ready, "sentinels to see everything", logs=self._logs)
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_synced(self) -> bool:
        info = self.replica.info("replication")
        master_info = self.master.info("replication")
        online = f"port={self.replica.port},state=online" in master_info.get("slave0", "")
        return online and info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinel_servers:
            master = _pairs(sentinel.command("SENTINEL", "MASTER", self.service))
            if (
                master.get("flags") != "master"
                or master.get("num-other-sentinels") != str(self.sentinel_count - 1)
                or master.get("num-slaves") != "1"
            ):
                return False
            replicas = sentinel.command("SENTINEL", "REPLICAS", self.service)
            if not isinstance(replicas, list) or len(replicas) != 1:
                return False
            replica = _pairs(replicas[0])
            if replica.get("flags") != "slave" or replica.get("master-link-status") != "ok":
                return False
        return True

    def wait_for_failover(self, timeout: float = 30.0) -> tuple[str, int]:
        """Wait until every live sentinel names a new master that has taken the role.

        Call it after killing or pausing ``master``. Returns the new master's (host, port)
        and swaps the ``master``/``replica`` handles.
        """
        old = (self.master.host, self.master.port)
        found: list[tuple[str, int]] = []

        def promoted() -> bool:
            addresses = {s.master_address() for s in self.sentinel_servers if s.running}
            if len(addresses) != 1:
                return False
            address = addresses.pop()
            if address is None or address == old or address[1] != self.replica.port:
                return False
            if self.replica.info("replication").get("role") != "master":
                return False
            found.append(address)
            return True

        _wait_for(promoted, f"sentinel failover away from {old}", timeout, logs=self._logs)
        self.master, self.replica = self.replica, self.master
        return found[0]

    def _logs(self) -> str:
        return "\n".join(f"--- {s!r}\n{s.log_tail(10)}" for s in self.servers)

    def stop(self) -> None:
        """Stop sentinels, replica and master, and remove their temp dirs."""
        # Sentinels first, so none of them starts a failover while the servers go down.
        stop_all(self.sentinel_servers)
        stop_all([self.replica, self.master])

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Memcached(Server):
    """A ``memcached`` on 127.0.0.1 (TCP only, 64 MiB)."""

    kind = "memcached"
    binary = "memcached"

    def _argv(self, port: int) -> list[str]:
        argv = [_binary(self.binary), "-l", HOST, "-p", str(port), "-U", "0", "-m", "64"]
        if os.geteuid() == 0:
            # memcached refuses to run as root unless told which user to be.
            argv += ["-u", "root"]
        return argv

    @property
    def url(self) -> str:
        """``memcached://127.0.0.1:PORT``."""
        return f"memcached://{self.host}:{self.port}"

    def _probe(self) -> int | None:
        reply = b""
        try:
            with socket.create_connection((self.host, self.port), timeout=_PROBE_TIMEOUT) as sock:
                sock.sendall(b"stats\r\n")
                while not reply.endswith(b"END\r\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        return None
                    reply += chunk
        except OSError:
            return None
        for line in reply.decode(errors="replace").splitlines():
            if line.startswith("STAT pid "):
                return int(line.split()[2])
        return None


def _stop_leftovers() -> list[str]:
    leftovers = active_servers()
    descriptions = [
        f"{s!r} ({'process alive' if s.running else 'temp dir left'})" for s in leftovers
    ]
    for server in leftovers:
        with contextlib.suppress(Exception):
            server.stop()
    return descriptions


atexit.register(_stop_leftovers)


# --- pytest plugin ------------------------------------------------------------------------------


def pytest_sessionfinish(session: pytest.Session, exitstatus: int | pytest.ExitCode) -> None:
    """Fail the run if a test left a server process (or its temp dir) behind."""
    leaked = _stop_leftovers()
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
