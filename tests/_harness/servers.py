"""Real servers on loopback: redis-server (plain, TLS, Cluster, Sentinel) and memcached.

Every server binds 127.0.0.1 on a port picked by the kernel, runs in its own session and temp dir
(which also holds its log), and is stopped on teardown, by an ``atexit`` safety net, and checked
for at session finish (``tests._harness.plugin``). Startup polls readiness every few milliseconds
instead of sleeping, and ``start_all`` launches several servers before waiting for any of them.
Redis is spoken through redis-py; nothing here needs pytest at import time (``bench/`` uses it).
``tests._harness.apps.AppServer`` is the same kind of process handle for an ASGI app, and
``CommandServer`` for the server a given command starts.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any, Self, TypedDict, TypeVar

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

__all__ = [
    "HOST",
    "ClusterNodeSpec",
    "Memcached",
    "RedisCluster",
    "RedisSentinel",
    "RedisServer",
    "SentinelServer",
    "Server",
    "ServerError",
    "TlsFiles",
    "active_servers",
    "free_port",
    "generate_tls_files",
    "require_binary",
    "running",
    "start_all",
    "stop_all",
    "stop_leftovers",
]

HOST = "127.0.0.1"
"""The only address any helper binds or connects to."""

STARTUP_TIMEOUT = 20.0
STOP_TIMEOUT = 3.0
POLL_INTERVAL = 0.005
_PROBE_TIMEOUT = 0.5
_BIND_ATTEMPTS = 5
_LOG_TAIL_LINES = 40
_ADDR_IN_USE = "address already in use"
"""Lower-cased: redis, memcached and gunicorn capitalise it, uvicorn does not."""

S = TypeVar("S", bound="Server")


class ServerError(RuntimeError):
    """A test server could not be started, did not become ready, or did not answer."""


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
    import pytest  # here, not at the top: bench/ imports this module without pytest

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
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)


def _terminate(servers: Iterable[Server], timeout: float) -> list[int | None]:
    """Ask every server's process to stop, SIGKILL what is left after ``timeout``; exit statuses.

    All are signalled before any is waited for, so their shutdowns overlap.
    """
    procs = [(s, s.process) for s in servers if s.process is not None]
    for server, proc in procs:
        server._signal_stop(proc)
    deadline = time.monotonic() + timeout
    statuses: list[int | None] = []
    for server, proc in procs:
        try:
            proc.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            proc.wait()
        server._after_exit(proc)
        server.process = None
        statuses.append(proc.returncode)
    return statuses


class _Managed:
    """``with``: ``start()`` on entering, ``stop()`` on leaving; when the block raises, the logs
    of :meth:`processes` go with the failing test's report."""

    def processes(self) -> Sequence[Server]:
        """Every process handle (their logs are shown when a wait times out or a block fails)."""
        raise NotImplementedError

    def start(self) -> Self:
        raise NotImplementedError

    def stop(self) -> object:
        raise NotImplementedError

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc is not None:
            _print_logs(self.processes())
        self.stop()


class Server(_Managed):
    """One server process on a loopback port, in its own session and temp dir holding its log.

    ``start()`` picks a free port (retrying with a new one if the bind fails); after ``kill()``
    or in ``restart()`` it comes back on the same port and temp dir. ``stop()`` ends the
    process and removes the temp dir (its log stays readable), so a later ``start()`` begins
    afresh. ``launch()`` and ``wait_ready()`` are the two halves of ``start()``.
    """

    kind = "server"
    startup_timeout = STARTUP_TIMEOUT
    stop_timeout = STOP_TIMEOUT
    poll_interval = POLL_INTERVAL

    def __init__(self) -> None:
        self.host = HOST
        self.port = 0
        self.dir: Path | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._argv_run: list[str] = []
        self._log_offset = 0
        self._deadline = 0.0
        self._same_port = False
        self._last_log = ""

    # Subclass hooks.
    def _argv(self, port: int) -> list[str]:
        raise NotImplementedError

    def _env(self) -> dict[str, str] | None:
        """The process's environment (None: this one's)."""
        return None

    def _prepare(self, workdir: Path) -> None:
        """Write what the server needs in its fresh temp dir before the first start."""

    def _cwd(self) -> Path:
        """The process's working directory (its temp dir unless the command needs another)."""
        return self.workdir

    def _answering_pid(self) -> int | None:
        """The pid of the server answering on ``self.port``, or None if none answers yet."""
        raise NotImplementedError

    def _ready(self, proc: subprocess.Popen[bytes]) -> bool:
        """True once ``proc`` itself answers (not another server that holds the port)."""
        return self._answering_pid() == proc.pid

    def _signal_stop(self, proc: subprocess.Popen[bytes]) -> None:
        """Ask the process to stop: SIGTERM to its whole group (forked children such as
        diskless-sync senders go too), SIGCONT so that a paused server acts on it."""
        _signal_group(proc, signal.SIGTERM)
        _signal_group(proc, signal.SIGCONT)

    def _after_exit(self, proc: subprocess.Popen[bytes]) -> None:
        """Called once the stopped process has been reaped."""

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

    def log_text(self) -> str:
        """Everything the server printed (after ``stop()`` too, until the next start)."""
        if self.dir is None:
            return self._last_log
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_since_launch(self) -> str:
        """What the process started last printed so far."""
        try:
            with self.log_path.open("rb") as f:
                f.seek(self._log_offset)
                return f.read().decode(errors="replace")
        except (OSError, ServerError):
            return ""

    def log_tail(self, lines: int = _LOG_TAIL_LINES) -> str:
        """The last ``lines`` lines of the server log, for error messages."""
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def start(self) -> Self:
        """Start the server and wait until it answers; return self."""
        if self.running:
            return self
        return self.launch().wait_ready()

    def launch(self) -> Self:
        """Start the process without waiting for it to answer (``wait_ready()`` does)."""
        with _LOCK:
            _ACTIVE[id(self)] = self
        self._deadline = time.monotonic() + self.startup_timeout
        try:
            if self.dir is None:
                self.dir = Path(tempfile.mkdtemp(prefix=f"zeal-{self.kind}-"))
                self._prepare(self.dir)
            self._same_port = bool(self.port)
            self._spawn(self.port or free_port())
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self) -> Self:
        """Wait until the launched process answers; a failed bind launches it again, on a new
        port (or, after ``kill()``, on the same one, which something may hold for a moment)."""
        try:
            attempts = 1
            while not self._await_answer():
                if self._same_port:
                    if time.monotonic() > self._deadline:
                        raise ServerError(f"port {self.port} stayed in use:\n{self.log_tail()}")
                    time.sleep(0.05)
                    self._spawn(self.port)
                    continue
                attempts += 1
                if attempts > _BIND_ATTEMPTS:
                    raise ServerError(f"{self.kind}: no free port after {_BIND_ATTEMPTS} attempts")
                self._spawn(free_port())
        except BaseException:
            self.stop()
            raise
        return self

    def _spawn(self, port: int) -> None:
        log = self.log_path
        self._log_offset = log.stat().st_size if log.exists() else 0
        # Set first: the hooks below may put the port in the environment too.
        self.port = port
        self._argv_run = self._argv(port)
        with log.open("ab") as out:
            self.process = subprocess.Popen(
                self._argv_run,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self._cwd(),
                env=self._env(),
                start_new_session=True,
            )

    def _await_answer(self) -> bool:
        """Poll until the process answers (True) or exits having failed to bind (False)."""
        proc = self.process
        assert proc is not None
        command = " ".join(self._argv_run)
        while True:
            if proc.poll() is not None:
                self.process = None
                if _ADDR_IN_USE in self.log_since_launch().lower():
                    return False
                raise ServerError(
                    f"{command} exited with status {proc.returncode} during startup; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            if self._ready(proc):
                return True
            if time.monotonic() > self._deadline:
                _terminate([self], self.stop_timeout)
                raise ServerError(
                    f"{command} not ready after {self.startup_timeout} s; "
                    f"log {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(self.poll_interval)

    def stop(self, timeout: float | None = None) -> int | None:
        """Stop the process (SIGKILL after ``timeout``, default ``stop_timeout``) and remove the
        temp dir; the process's exit status (None if none was running)."""
        status = _terminate([self], self.stop_timeout if timeout is None else timeout)
        if self.dir is not None:
            self._last_log = self.log_text()
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None
        self.port = 0
        with _LOCK:
            _ACTIVE.pop(id(self), None)
        return status[0] if status else None

    def kill(self) -> None:
        """SIGKILL the process group and reap it; the temp dir and port are kept for ``start()``."""
        if self.process is not None:
            _signal_group(self.process, signal.SIGKILL)
            self.process.wait()
            self._after_exit(self.process)
            self.process = None

    def restart(self) -> Self:
        """Stop the process if it runs (keeping the temp dir) and start it on the same port."""
        _terminate([self], self.stop_timeout)
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

    def processes(self) -> Sequence[Server]:
        """This one process (its log is shown when a ``with`` block fails)."""
        return [self]

    def __repr__(self) -> str:
        pid = self.process.pid if self.process is not None else None
        return f"{type(self).__name__}({self.host}:{self.port}, pid={pid}, dir={self.dir})"


def _print_logs(servers: Iterable[Server]) -> None:
    # Printed output goes with the failing test's report.
    for server in servers:
        print(f"--- log of {server!r}:\n{server.log_tail()}")


def start_all(servers: Iterable[S]) -> list[S]:
    """Start several servers at once: all are launched before any is waited for, so their
    startups overlap; if one fails, every one is stopped."""
    started = list(servers)
    try:
        for server in started:
            server.launch()
        for server in started:
            server.wait_ready()
    except BaseException:
        stop_all(started)
        raise
    return started


def stop_all(servers: Iterable[Server]) -> None:
    """Stop several servers at once: signal all first so their shutdowns overlap."""
    servers = list(servers)
    _terminate(servers, max((s.stop_timeout for s in servers), default=STOP_TIMEOUT))
    for server in servers:
        server.stop()


@contextlib.contextmanager
def running(*servers: S) -> Iterator[tuple[S, ...]]:
    """``with running(a, b) as (a, b):`` starts them together and stops them all on exit (with
    their logs printed, to go with the test's failure, if the block raised)."""
    start_all(servers)
    try:
        yield servers
    except BaseException:
        _print_logs(servers)
        raise
    finally:
        stop_all(servers)


# --- Redis --------------------------------------------------------------------------------------


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

    def _prepare(self, workdir: Path) -> None:
        if self.tls:
            self.tls_files = generate_tls_files(workdir)

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

    def client(self, timeout: float = 2.0) -> redis.Redis:
        """A redis-py client of this server (AUTH and TLS as configured, no retries); close it."""
        return redis.Redis(
            self.host,
            self.port,
            password=self.password,
            ssl=self.tls_files is not None,
            ssl_ca_certs=str(self.ca_path) if self.tls_files is not None else None,
            socket_timeout=timeout,
            socket_connect_timeout=timeout,
            retry=Retry(NoBackoff(), 0),
        )

    def command(self, *args: str | bytes | int, timeout: float = 2.0) -> Any:
        """Run one command on a new connection; the reply as redis-py parses it.

        Raises ``redis.ConnectionError`` when the server cannot be reached and
        ``redis.ResponseError`` for an error reply.
        """
        with self.client(timeout) as client:
            return client.execute_command(*args)

    def info(self, section: str) -> dict[str, Any]:
        """``INFO section`` as redis-py parses it."""
        with self.client() as client:
            info: dict[str, Any] = client.info(section)
        return info

    def _answering_pid(self) -> int | None:
        try:
            pid = self.command("INFO", "server", timeout=_PROBE_TIMEOUT).get("process_id")
        except redis.RedisError:
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
        except (OSError, redis.RedisError):
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


class _Topology(_Managed):
    """Several server processes started and stopped together (a context manager)."""

    def _logs(self) -> str:
        return "\n".join(f"--- {s!r}\n{s.log_tail(10)}" for s in self.processes())


class RedisCluster(_Topology):
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

    def routing_conn(self, **extra: Any) -> dict[str, Any]:
        """Store connection options for a test of where keys, rows and messages go, not of how
        fast: every node, and a 30 s socket timeout, since the first call loads the slot map
        within the call's deadline (1.5 s by default), which a loaded machine can overrun."""
        return {"cluster": [f"{h}:{p}" for h, p in self.nodes], "socket_timeout": 30.0, **extra}

    def start(self) -> Self:
        """Start the nodes, create the cluster and wait until every node reports it healthy."""
        try:
            start_all(self.servers)
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
            with server.client() as client:
                info = client.cluster("INFO")
            if (
                info.get("cluster_state") != "ok"
                or int(info.get("cluster_slots_assigned", 0)) != 16384
                or int(info.get("cluster_known_nodes", 0)) != len(self.servers)
            ):
                return False
            replication = server.info("replication")
            if replication.get("role") == "slave":
                if replication.get("master_link_status") != "up":
                    return False
                replicas_up += 1
        return replicas_up == self.masters * self.replicas

    def processes(self) -> Sequence[Server]:
        """The nodes."""
        return self.servers

    def stop(self) -> None:
        """Stop every node and remove their temp dirs."""
        stop_all(self.servers)


class SentinelServer(RedisServer):
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

    def master_address(self) -> tuple[str, int] | None:
        """What this sentinel currently reports as the master's address."""
        with self.client() as client:
            address = client.sentinel_get_master_addr_by_name(self.service)
        if not address:
            return None
        host, port = address
        return (host.decode() if isinstance(host, bytes) else str(host)), int(port)


class RedisSentinel(_Topology):
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

    def processes(self) -> Sequence[Server]:
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
            start_all(self.sentinel_servers)
            _wait_for(self._sentinels_ready, "sentinels to see everything", logs=self._logs)
        except BaseException:
            self.stop()
            raise
        return self

    def _replica_synced(self) -> bool:
        info = self.replica.info("replication")
        attached = self.master.info("replication").get("slave0", {})
        online = attached.get("port") == self.replica.port and attached.get("state") == "online"
        return online and info.get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for sentinel in self.sentinel_servers:
            with sentinel.client() as client:
                master = client.sentinel_master(self.service)
                replicas = client.sentinel_slaves(self.service)
            if (
                master.get("flags") != "master"
                or master.get("num-other-sentinels") != self.sentinel_count - 1
                or master.get("num-slaves") != 1
            ):
                return False
            if len(replicas) != 1:
                return False
            if replicas[0].get("flags") != "slave" or replicas[0].get("master-link-status") != "ok":
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

    def stop(self) -> None:
        """Stop sentinels, replica and master, and remove their temp dirs."""
        # Sentinels first, so none of them starts a failover while the servers go down.
        stop_all(self.sentinel_servers)
        stop_all([self.replica, self.master])


# --- memcached ----------------------------------------------------------------------------------


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

    def _answering_pid(self) -> int | None:
        # memcached's text protocol, one command: no client library needed for the probe.
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


def stop_leftovers() -> list[str]:
    """Stop every server still active; what each one was (for the leak report)."""
    leftovers = active_servers()
    descriptions = [
        f"{s!r} ({'process alive' if s.running else 'temp dir left'})" for s in leftovers
    ]
    for server in leftovers:
        with contextlib.suppress(Exception):
            server.stop()
    return descriptions


atexit.register(stop_leftovers)
