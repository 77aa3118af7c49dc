"""``zeal-asgi``: run an app with N uvicorn workers, shared memory allocated in the master first.

``zeal-asgi run example_app.main:app --workers 2`` imports the app once in the master, so every
``Store.make`` / ``Counter`` allocates its shared memory there, then starts the workers, which
attach by name.  The master owns the segments and unlinks them when it exits.  Listening sockets
get TCP_NODELAY (uvicorn's own ``--workers`` path does not set it, which stalls every keep-alive
request on the pure-Python h11 stack by ~40 ms), and uvloop + httptools are used when installed.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import socket
import sys
from collections.abc import Sequence

__all__ = ["main", "make_socket", "run"]

log = logging.getLogger("zeal_asgi.launcher")


def _claim_server_identity() -> str:
    """Make this process the owner of the server's shared memory (before the app is imported)."""
    from zeal_asgi.shm.process import process_start_time

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
) -> int:
    """Import ``app`` (``module:attr``) in this process, then serve it with ``workers`` workers."""
    import uvicorn
    from uvicorn.supervisors import Multiprocess

    if workers < 1:
        raise SystemExit("zeal-asgi: --workers must be >= 1")
    server_id = _claim_server_identity()
    sys.path.insert(0, os.path.abspath(app_dir))
    from uvicorn.importer import import_from_string

    import_from_string(app)  # allocates every declared table and counter, here in the master
    from zeal_asgi.shm.segments import segments_of_server

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
    )
    sock = make_socket(host, port)
    log.warning(
        "zeal-asgi: server %s, %d worker(s) on http://%s:%d, %d shared segment(s) allocated",
        server_id,
        workers,
        host,
        sock.getsockname()[1],
        len(segments_of_server()),
    )
    server = uvicorn.Server(config)
    try:
        if workers == 1:
            server.run(sockets=[sock])
        else:
            Multiprocess(config, sockets=[sock]).run()
    finally:
        sock.close()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``zeal-asgi`` command and ``python -m zeal_asgi``."""
    parser = argparse.ArgumentParser(
        prog="zeal-asgi", description="Run an ASGI app whose workers share zeal_asgi state."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    p_run = sub.add_parser("run", help="serve APP (module:attribute) with N workers")
    p_run.add_argument("app", help="the ASGI app, e.g. example_app.main:app")
    p_run.add_argument("--host", default=os.environ.get("ZEAL_HOST", "127.0.0.1"))
    p_run.add_argument("--port", type=int, default=int(os.environ.get("ZEAL_PORT", "8000")))
    p_run.add_argument("--workers", type=int, default=int(os.environ.get("ZEAL_WORKERS", "1")))
    p_run.add_argument("--log-level", default="info")
    p_run.add_argument("--access-log", action="store_true")
    p_run.add_argument("--app-dir", default=".")
    sub.add_parser("sweep", help="remove shared-memory segments left by killed servers")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.command == "sweep":
        from zeal_asgi.shm.segments import sweep_stale

        removed = sweep_stale(force=True)
        print(f"removed {len(removed)} stale segment(s)")
        for path in removed:
            print(f"  {path}")
        return 0
    return run(
        args.app,
        host=args.host,
        port=args.port,
        workers=args.workers,
        log_level=args.log_level,
        access_log=args.access_log,
        app_dir=args.app_dir,
    )
