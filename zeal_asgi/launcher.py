"""``zeal-asgi``: run an app with N uvicorn workers, shared memory allocated in the master first.

``zeal-asgi run example_app.main:app --workers 2`` imports the app once in the master, so every
``Store.make`` / ``Counter`` allocates its shared memory there, checks that the app starts its
``Zeal`` and that the backend answers, then starts the workers, which attach by name.  The
master owns the segments and unlinks them when it exits.  Listening sockets get TCP_NODELAY
(uvicorn's own ``--workers`` path does not set it, which stalls every keep-alive request on the
pure-Python h11 stack by ~40 ms), and uvloop + httptools are used when installed.
``zeal-asgi inspect`` lists a running server's tables, counters and segments.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import json
import logging
import os
import socket
import sys
import traceback
from collections.abc import Sequence
from typing import Any

from zeal_asgi.app import NAMES_TABLE, instances, segment_key
from zeal_asgi.errors import ZealError
from zeal_asgi.shm.ext import Table
from zeal_asgi.shm.segments import (
    attach_path,
    process_alive,
    process_start_time,
    segment_path,
    segments_of_server,
    server_ids,
    shm_dir,
    sweep_stale,
)

__all__ = ["main", "make_socket", "run"]

log = logging.getLogger("zeal_asgi.launcher")

_MIDDLEWARE = "zeal_asgi.middleware.ZealMiddleware"
STARTUP_FAILURE = 3
"""Exit status when a worker failed to start (uvicorn's own code for it)."""


def _claim_server_identity() -> str:
    """Make this process the owner of the server's shared memory (before the app is imported)."""
    pid = os.getpid()
    server_id = os.environ.get("ZEAL_SERVER_ID") or f"{pid}-{process_start_time(pid)}"
    os.environ["ZEAL_SERVER_ID"] = server_id
    os.environ["ZEAL_SERVER_OWNER_PID"] = str(pid)
    return server_id


def make_socket(host: str, port: int, backlog: int = 2048) -> socket.socket:
    """A listening TCP socket with TCP_NODELAY (inherited by accepted connections on Linux)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.set_inheritable(True)
    except BaseException:
        sock.close()
        raise
    return sock


def _fast_stack() -> tuple[str, str]:
    loop = "uvloop" if importlib.util.find_spec("uvloop") else "asyncio"
    http = "httptools" if importlib.util.find_spec("httptools") else "h11"
    if loop == "asyncio" or http == "h11":
        log.warning(
            "zeal-asgi: uvloop/httptools not installed (pip install 'uvicorn[standard]'); "
            "running on the pure-Python stack"
        )
    return loop, http


def _import_app(target: str) -> Any:
    """``module:attribute``, imported here; any failure is one line naming what failed."""
    from uvicorn.importer import ImportFromStringError, import_from_string

    try:
        return import_from_string(target)
    except ImportFromStringError as exc:
        raise SystemExit(f"zeal-asgi: cannot import {target}: {exc}") from None
    except Exception as exc:  # the app's own code failed: say where, not the whole traceback
        frame = traceback.extract_tb(exc.__traceback__)[-1]
        raise SystemExit(
            f"zeal-asgi: importing {target} failed: {type(exc).__name__}: {exc} "
            f"({frame.filename}:{frame.lineno})"
        ) from None


def _starts_zeal(app: Any) -> bool:
    """False only for a Starlette/FastAPI app with no lifespan and no ``ZealMiddleware``.

    Such an app never starts its ``Zeal``: every request that needs it would answer 500.  A
    lifespan of the app's own may start it (``async with zeal``), so any lifespan counts.
    """

    def is_ours(cls: Any) -> bool:
        return any(f"{c.__module__}.{c.__qualname__}" == _MIDDLEWARE for c in cls.__mro__)

    router, middleware = getattr(app, "router", None), getattr(app, "user_middleware", None)
    if is_ours(type(app)) or router is None or middleware is None:
        return True  # wrapped in ZealMiddleware, or not a Starlette app: nothing to inspect
    if any(isinstance(m.cls, type) and is_ours(m.cls) for m in middleware):
        return True
    # Starlette's and FastAPI's default lifespan (none given) runs on_startup handlers only.
    default = type(router.lifespan_context).__name__ == "_DefaultLifespan"
    return not default or bool(getattr(router, "on_startup", None))


def _boot_check(app: Any, target: str) -> list[str]:
    """Fail the boot, in one line, when the app cannot work; describe its stores otherwise."""
    zeals = instances()
    if zeals and not _starts_zeal(app):
        raise SystemExit(
            f"zeal-asgi: {target} never starts its Zeal: pass FastAPI(lifespan=zeal.lifespan) "
            "or app.add_middleware(ZealMiddleware, zeal=zeal)"
        )
    described: dict[int, str] = {}
    for zeal in zeals:
        if id(zeal.store) in described:
            continue
        try:
            asyncio.run(zeal.check_backend())  # the seed's boot PING, before any worker starts
        except ZealError as exc:
            raise SystemExit(f"zeal-asgi: {exc}") from None
        tables = ", ".join(zeal.store.names()) or "no tables"
        described[id(zeal.store)] = f"{zeal.store.kind} backend ({tables})"
    return list(described.values())


def run(
    app: str,
    *,
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    log_level: str = "info",
    access_log: bool = False,
    app_dir: str = ".",
    timeout_graceful_shutdown: float | None = 10.0,
    timeout_worker_healthcheck: int = 5,
) -> int:
    """Import ``app`` (``module:attr``) in this process, then serve it with ``workers`` workers.

    Returns 0 after a clean shutdown and :data:`STARTUP_FAILURE` when a worker failed to start;
    a busy port, an app that cannot be imported or cannot work, and an unreachable backend
    exit at once with a one-line message.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if workers < 1:
        raise SystemExit("zeal-asgi: --workers must be >= 1")
    try:
        sock = make_socket(host, port)  # first: a busy port fails before anything is allocated
    except OSError as exc:
        raise SystemExit(
            f"zeal-asgi: cannot listen on {host}:{port}: {exc.strerror} (another server? choose "
            "another --port)"
        ) from None
    try:
        server_id = _claim_server_identity()
        sys.path.insert(0, os.path.abspath(app_dir))
        stores = _boot_check(_import_app(app), app)
        loop, http = _fast_stack()
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            workers=workers,
            loop=loop,
            http=http,
            lifespan="on",
            log_level=log_level,
            access_log=access_log,
            timeout_graceful_shutdown=int(timeout_graceful_shutdown)
            if timeout_graceful_shutdown
            else None,
            timeout_worker_healthcheck=timeout_worker_healthcheck,
        )
        log.warning(
            "zeal-asgi: server %s, %d worker(s) on http://%s:%d, %s, %d shared segment(s)",
            server_id,
            workers,
            host,
            sock.getsockname()[1],
            "; ".join(stores) or "no Zeal app",
            len(segments_of_server()),
        )
        if workers == 1:
            server = uvicorn.Server(config)
            server.run(sockets=[sock])
            return 0 if server.started else STARTUP_FAILURE
        supervisor = Multiprocess(config, sockets=[sock])
        supervisor.run()
        failed = any(p.exitcode == STARTUP_FAILURE for p in supervisor.processes)
        return STARTUP_FAILURE if failed else 0
    finally:
        sock.close()


def _running(server_id: str) -> bool:
    pid, _, start = server_id.partition("-")
    return pid.isdigit() and start.isdigit() and process_alive(int(pid), int(start))


def inspect(server_id: str | None = None) -> dict[str, Any]:
    """Tables (rows, capacity, memory), counters and segments of a server of this host.

    ``server_id`` defaults to the only running server of this user; the names come from
    :data:`~zeal_asgi.app.NAMES_TABLE` (segments made after the workers started show ``?``).

    Raises:
        SystemExit: no such server, or not exactly one running and none named.
    """
    ids = server_ids()
    if server_id is None:
        running = [s for s in ids if _running(s)]
        if len(running) != 1:
            raise SystemExit(
                f"zeal-asgi: name one server with --server (running: {', '.join(running) or 'none'}"
                f"; with segments: {', '.join(ids) or 'none'})"
            )
        server_id = running[0]
    elif server_id not in ids:
        raise SystemExit(f"zeal-asgi: no segments of server {server_id!r} in {shm_dir()}")
    names: dict[str, str] = {}
    try:
        registry = attach_path(segment_path("t", NAMES_TABLE, server_id))
    except (OSError, ZealError):
        pass  # no Zeal app started in this server yet
    else:
        names = {str(key): str(row["name"]) for key, row in registry.items()}  # type: ignore[union-attr]
        registry.close()
    out: dict[str, Any] = {"server_id": server_id, "running": _running(server_id), "dir": shm_dir()}
    out.update(tables=[], counters=[], segments=[])
    for path in segments_of_server(server_id):
        with contextlib.suppress(OSError):
            out["segments"].append({"path": path, "bytes": os.stat(path).st_size})
        kind = os.path.basename(path).split(".")[-2]
        if kind not in ("t", "a"):
            continue  # the janitor's marker, a segment being built
        name = names.get(segment_key(path), "?")
        try:
            obj = attach_path(path, name)
        except (OSError, ZealError):
            continue  # removed or replaced while we looked
        if isinstance(obj, Table):
            figures = {"rows": len(obj), "capacity": obj.capacity, "memory": obj.memory_bytes}
            out["tables"].append({"name": name, **figures, "segment": path})
        else:
            out["counters"].append({"name": name, "value": obj.get(), "segment": path})
        obj.close()
    return out


def _print_inspection(found: dict[str, Any]) -> None:
    total = sum(s["bytes"] for s in found["segments"])
    state = "running" if found["running"] else "not running (stale segments)"
    print(
        f"server {found['server_id']}: {state}; {len(found['segments'])} segment(s), "
        f"{total:,} bytes in {found['dir']}"
    )
    print(f"\n{'table':<32}{'rows':>10}{'capacity':>12}{'memory':>14}  segment")
    for t in sorted(found["tables"], key=lambda t: t["name"]):
        print(
            f"{t['name']:<32}{t['rows']:>10,}{t['capacity']:>12,}{t['memory']:>14,}  "
            f"{os.path.basename(t['segment'])}"
        )
    print(f"\n{'counter':<32}{'value':>22}  segment")
    for c in sorted(found["counters"], key=lambda c: c["name"]):
        print(f"{c['name']:<32}{c['value']:>22,}  {os.path.basename(c['segment'])}")


def _env(name: str, default: str) -> str:
    return os.environ.get(name) or default


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="zeal-asgi",
        description="Run an ASGI app whose workers share zeal_asgi state.",
        formatter_class=fmt,
    )
    parser.add_argument("--version", action="version", version=f"zeal-asgi {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    run_ = sub.add_parser(
        "run",
        help="serve APP with N workers; shared memory is allocated here, before they start",
        formatter_class=fmt,
    )
    add = run_.add_argument
    add("app", help="the ASGI app as module:attribute, e.g. example_app.main:app")
    add("--host", default=_env("ZEAL_HOST", "127.0.0.1"), help="address to bind (ZEAL_HOST)")
    add("--port", type=int, default=_env("ZEAL_PORT", "8000"), help="port to bind (ZEAL_PORT)")
    add(
        "--workers",
        type=int,
        default=_env("ZEAL_WORKERS", "1"),
        metavar="N",
        help="worker processes, all sharing the same tables (ZEAL_WORKERS)",
    )
    add(
        "--timeout-worker-healthcheck",
        type=int,
        default=_env("ZEAL_TIMEOUT_WORKER_HEALTHCHECK", "5"),
        metavar="SECONDS",
        help="seconds a worker may go without answering the supervisor's ping before it is "
        "killed (SIGKILL) and replaced; a stopped worker (SIGSTOP, a debugger) counts as not "
        "answering, and the row lock it held is then recovered by the next writer; the "
        "supervisor waits this long for each worker in turn, so raise it with care "
        "(ZEAL_TIMEOUT_WORKER_HEALTHCHECK; with --workers 1 there is no supervisor)",
    )
    add(
        "--timeout-graceful-shutdown",
        type=int,
        default=_env("ZEAL_TIMEOUT_GRACEFUL_SHUTDOWN", "10"),
        metavar="SECONDS",
        help="seconds a worker waits for open requests on shutdown "
        "(ZEAL_TIMEOUT_GRACEFUL_SHUTDOWN)",
    )
    add("--log-level", default="info", help="uvicorn's log level (critical ... trace)")
    add("--access-log", action="store_true", help="log every request")
    add("--app-dir", default=".", help="directory added to sys.path to import APP")
    look = sub.add_parser(
        "inspect",
        help="list a running server's tables, counters and shared-memory segments",
        formatter_class=fmt,
    )
    look.add_argument("--server", help="server id (default: the only running server)")
    look.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("sweep", help="remove shared-memory segments left by killed servers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zeal-asgi`` command and ``python -m zeal_asgi``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "sweep":
        removed = sweep_stale(force=True)
        print(f"removed {len(removed)} stale segment(s)")
        for path in removed:
            print(f"  {path}")
        return 0
    if args.command == "inspect":
        found = inspect(args.server)
        if args.json:
            print(json.dumps(found, indent=2))
        else:
            _print_inspection(found)
        return 0
    if not 1 <= args.timeout_worker_healthcheck <= 86400:
        raise SystemExit("zeal-asgi: --timeout-worker-healthcheck must be 1..86400 seconds")
    return run(
        args.app,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
        app_dir=args.app_dir,
        timeout_graceful_shutdown=args.timeout_graceful_shutdown,
        timeout_worker_healthcheck=args.timeout_worker_healthcheck,
    )


def _version() -> str:
    try:
        return importlib.metadata.version("zeal-asgi")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
