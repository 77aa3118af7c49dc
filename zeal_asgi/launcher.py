"""``zeal-asgi``: run an app with N uvicorn workers, shared memory allocated in the master first.

``zeal-asgi run example_app.main:app --workers 2`` imports the app once in the master, so every
``Store.make`` / ``Counter`` allocates its shared memory there, checks that the app starts its
``Zeal`` and that the backend answers, then starts the workers, which attach by name.  The
master owns the segments and unlinks them when it exits.  Listening sockets get TCP_NODELAY
(uvicorn's own ``--workers`` path does not set it, which stalls every keep-alive request on the
pure-Python h11 stack by ~40 ms), uvloop + httptools are used when installed, and each worker
freezes its start-up heap out of the cyclic collector's way (``ZEAL_GC_FREEZE``).
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

from uvicorn.config import STARTUP_FAILURE

from zeal_asgi.app import NAMES_TABLE, instances
from zeal_asgi.errors import ZealError
from zeal_asgi.shm.ext import Table
from zeal_asgi.shm.process import process_alive, process_start_time
from zeal_asgi.shm.segments import (
    attach_path,
    segment_path,
    segments_of_server,
    server_ids,
    shm_dir,
    sweep_stale,
)

log = logging.getLogger("zeal_asgi.launcher")

_MIDDLEWARE = "zeal_asgi.middleware.ZealMiddleware"


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


def _warn_if_pure_python() -> None:
    # uvicorn's defaults (loop and http "auto") pick uvloop and httptools when installed
    if not (importlib.util.find_spec("uvloop") and importlib.util.find_spec("httptools")):
        log.warning(
            "zeal-asgi: uvloop/httptools not installed (pip install 'uvicorn[standard]'); "
            "running on the pure-Python stack"
        )


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
    described = []
    for zeal in {id(z.store): z for z in zeals}.values():  # each store once
        try:
            asyncio.run(zeal.check_backend())  # the seed's boot PING, before any worker starts
        except ZealError as exc:
            raise SystemExit(f"zeal-asgi: {exc}") from None
        tables = ", ".join(zeal.store.names()) or "no tables"
        described.append(f"{zeal.store.kind} backend ({tables})")
    return described


def run(args: argparse.Namespace) -> int:
    """Serve ``args.app`` (``module:attr``, imported in this process) with ``args.workers``.

    Returns 0 after a clean shutdown and 3 (uvicorn's STARTUP_FAILURE) when a worker failed
    to start; a busy port, an app that cannot be imported or cannot work, and an unreachable
    backend exit at once with a one-line message.
    """
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if args.workers < 1 or not 1 <= args.timeout_worker_healthcheck <= 86400:
        raise SystemExit("zeal-asgi: --workers >= 1 and --timeout-worker-healthcheck 1..86400")
    try:
        sock = make_socket(args.host, args.port)  # first: a busy port fails before any memory
    except OSError as exc:
        raise SystemExit(
            f"zeal-asgi: cannot listen on {args.host}:{args.port}: {exc.strerror} (another "
            "server? choose another --port)"
        ) from None
    try:
        # This process owns the server's shared memory: claimed before the app is imported.
        pid = os.getpid()
        server_id = os.environ.get("ZEAL_SERVER_ID") or f"{pid}-{process_start_time(pid)}"
        os.environ.update(ZEAL_SERVER_ID=server_id, ZEAL_SERVER_OWNER_PID=str(pid))
        # Workers of a server, not a test process: freezing their start-up heap is safe (and
        # hides it from gc.get_referrers, which a test process may still need).
        os.environ.setdefault("ZEAL_GC_FREEZE", "1")
        sys.path.insert(0, os.path.abspath(args.app_dir))
        stores = _boot_check(_import_app(args.app), args.app)
        _warn_if_pure_python()
        options = {name: getattr(args, name) for name in _UVICORN_OPTIONS}
        config = uvicorn.Config(args.app, lifespan="on", **options)
        backends = "; ".join(stores) or "no Zeal app"
        where = f"http://{args.host}:{sock.getsockname()[1]}"
        log.warning(
            f"zeal-asgi: server {server_id}, {args.workers} worker(s) on {where}, {backends}, "
            f"{len(segments_of_server())} shared segment(s)"
        )
        if args.workers == 1:
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
    with contextlib.suppress(OSError, ZealError):  # no Zeal app started in this server yet
        registry = attach_path(segment_path("t", NAMES_TABLE, server_id))
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
        name = names.get(os.path.basename(path), "?")
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
    print(f"server {found['server_id']}: {state}; {len(found['segments'])} segment(s), ", end="")
    print(f"{total:,} bytes in {found['dir']}")
    for kind, columns in (("tables", ("rows", "capacity", "memory")), ("counters", ("value",))):
        print(f"\n{kind[:-1]:<32}" + "".join(f"{c:>14}" for c in columns) + "  segment")
        for row in sorted(found[kind], key=lambda r: (r["name"].startswith("__"), r["name"])):
            figures = "".join(f"{row[c]:>14,}" for c in columns)
            print(f"{row['name']:<32}{figures}  {os.path.basename(row['segment'])}")


_HEALTHCHECK_HELP = (
    "seconds a worker may go without answering the supervisor's ping before it is killed "
    "(SIGKILL) and replaced; a stopped worker (SIGSTOP, a debugger) does not answer, and a row "
    "lock it held is then recovered by the next writer (its half-written row is dropped); the "
    "supervisor waits this long for each worker in turn, so raise it with care; with --workers "
    "1 there is no supervisor"
)
_RUN_OPTIONS: tuple[tuple[str, type, str, str], ...] = (
    # flag, type, default, help; each is read from ZEAL_<FLAG> too, and passed to uvicorn
    ("--host", str, "127.0.0.1", "address to bind"),
    ("--port", int, "8000", "port to bind"),
    ("--workers", int, "1", "worker processes, all sharing the same tables"),
    ("--timeout-worker-healthcheck", int, "5", _HEALTHCHECK_HELP),
    ("--timeout-graceful-shutdown", int, "10", "seconds open requests get when a worker stops"),
    ("--log-level", str, "info", "critical, error, warning, info, debug or trace"),
)
_UVICORN_OPTIONS = [flag[2:].replace("-", "_") for flag, *_ in _RUN_OPTIONS] + ["access_log"]


def _parser() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentDefaultsHelpFormatter
    parser = argparse.ArgumentParser(
        prog="zeal-asgi", description="Run an ASGI app whose workers share zeal_asgi state."
    )
    parser.add_argument("--version", action="version", version=f"zeal-asgi {_version()}")
    sub = parser.add_subparsers(dest="command", required=True)
    serve = sub.add_parser("run", help="serve APP with N workers", formatter_class=fmt)
    serve.add_argument("app", help="the ASGI app as module:attribute, e.g. example_app.main:app")
    for flag, kind, default, help_ in _RUN_OPTIONS:
        env = "ZEAL_" + flag[2:].replace("-", "_").upper()
        value = os.environ.get(env) or default  # argparse converts (and checks) it with ``kind``
        unit = "SECONDS" if flag.startswith("--timeout") else None
        serve.add_argument(flag, type=kind, default=value, metavar=unit, help=f"{help_} ({env})")
    serve.add_argument("--access-log", action="store_true", help="log every request")
    serve.add_argument("--app-dir", default=".", help="directory added to sys.path to import APP")
    look = sub.add_parser("inspect", help="list a server's tables, counters and segments")
    look.add_argument("--server", help="server id (default: the only running server)")
    look.add_argument("--json", action="store_true", help="print JSON instead of a table")
    sub.add_parser("sweep", help="remove shared-memory segments left by killed servers")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zeal-asgi`` command and ``python -m zeal_asgi``."""
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "run":
        return run(args)
    if args.command == "sweep":
        removed = sweep_stale(force=True)
        print("\n  ".join([f"removed {len(removed)} stale segment(s)", *removed]))
    elif args.json:
        print(json.dumps(inspect(args.server), indent=2))
    else:
        _print_inspection(inspect(args.server))
    return 0


def _version() -> str:
    try:
        return importlib.metadata.version("zeal-asgi")
    except importlib.metadata.PackageNotFoundError:  # a source tree that was never installed
        return "unknown"
