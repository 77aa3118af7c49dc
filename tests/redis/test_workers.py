"""Real gunicorn workers (forked after --preload) sharing counters through the redis backend."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

from tests.servers import RedisServer, free_port, require_binary

from .conftest import unique_prefix

REPO = Path(__file__).resolve().parents[2]
APP = "tests.redis.apps.counter_app:app"


def test_gunicorn_preload_workers_share_redis_counters(redis_server: RedisServer) -> None:
    gunicorn = str(Path(sys.executable).parent / "gunicorn")
    require_binary(gunicorn)
    prefix = unique_prefix()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("ZEAL_")}
    env.update(
        PYTHONPATH=str(REPO),
        ZEAL_STORE_BACKEND="redis",
        ZEAL_REDIS_URL=redis_server.url,
        ZEAL_KEY_PREFIX=prefix,
        REDIS_APP_WARM="1",
    )
    argv = [gunicorn, "-k", "uvicorn_worker.UvicornWorker", "-w", "2", "--preload"]
    argv += ["-b", f"127.0.0.1:{port}", "--graceful-timeout", "5", APP]
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            base = f"http://127.0.0.1:{port}"
            limits = httpx.Limits(max_keepalive_connections=0)
            with httpx.Client(base_url=base, timeout=5.0, limits=limits) as client:
                _wait_ready(client, proc, log)
                total = 200
                with ThreadPoolExecutor(8) as pool:
                    replies = list(pool.map(lambda _: client.get("/hit").json(), range(total)))
            pids = {r["pid"] for r in replies}
            assert len(pids) == 2, f"one worker served everything: {pids}"
            assert sorted(r["n"] for r in replies) == list(range(1, total + 1))
            assert sorted(r["c"] for r in replies) == list(range(1, total + 1))
            assert redis_server.command("GET", f"{prefix}:counter:requests") == str(total).encode()
            assert redis_server.command("HGET", f"{prefix}:{{hits}}:all", "n") == b"200"
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        log.seek(0)
        text = log.read().decode(errors="replace")
    assert "Traceback" not in text, text
    assert proc.returncode == 0, text


def _wait_ready(client: httpx.Client, proc: subprocess.Popen[bytes], log: object) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        assert proc.poll() is None, "gunicorn exited during startup"
        try:
            client.get("/pid").raise_for_status()
            return
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError("gunicorn did not answer within 30 s")
