"""Real gunicorn workers (forked after --preload) sharing counters through the redis backend."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

from tests._harness.apps import AppServers
from tests._harness.servers import RedisServer

from .conftest import unique_prefix

APP = "tests.redis.apps.counter_app:app"


def test_gunicorn_preload_workers_share_redis_counters(
    redis_server: RedisServer, app_servers: AppServers
) -> None:
    prefix = unique_prefix()
    env = {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": redis_server.url,
        "ZEAL_KEY_PREFIX": prefix,
        "REDIS_APP_WARM": "1",
    }
    server = app_servers.start(APP, server="gunicorn-preload", env=env)
    total = 200
    with ThreadPoolExecutor(8) as pool:
        replies = list(pool.map(lambda _: server.get("/hit"), range(total)))
    pids = {r["pid"] for r in replies}
    assert len(pids) == 2, f"one worker served everything: {pids}"
    assert sorted(r["n"] for r in replies) == list(range(1, total + 1))
    assert sorted(r["c"] for r in replies) == list(range(1, total + 1))
    assert redis_server.command("GET", f"{prefix}:counter:requests") == str(total).encode()
    assert redis_server.command("HGET", f"{prefix}:{{hits}}:all", "n") == b"200"
    status = server.stop()
    text = server.log_text()
    assert "Traceback" not in text, text
    assert status == 0, text
