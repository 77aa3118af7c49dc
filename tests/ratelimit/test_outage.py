"""Redis down: the ``on_backend_error`` policy answers within the call deadline (admit, counted,
or refuse: 503), and limiting resumes once Redis is back."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import httpx
import pytest

from tests._harness.apps import AppServers
from tests.ratelimit.conftest import unique
from zeal_asgi.ratelimit import RateLimiter
from zeal_asgi.store import Store

# Generous: a refused connection fails at once, a stopped server after the 1.5 s deadline.
ANSWER_WITHIN = 15.0


async def wait_back(lim: RateLimiter, key: str) -> Any:
    for _ in range(100):
        r = await lim.hit(key)
        if r.error is None:
            return r
        await asyncio.sleep(0.1)
    raise AssertionError("the limiter did not recover after Redis came back")


@pytest.mark.parametrize("policy", ["allow", "deny"])
@pytest.mark.parametrize("failure", ["killed", "stopped"])
async def test_policy_while_redis_is_down_then_recovery(
    fresh_redis: Any, policy: Any, failure: str
) -> None:
    timeouts = {"socket_timeout": 0.5, "acquire_timeout": 0.25}
    store = Store("redis", {"url": fresh_redis.url, "prefix": unique(), **timeouts})
    await store.start()
    try:
        lim = RateLimiter("2/hour", name=unique(), store=store, on_backend_error=policy)
        assert (await lim.hit("k")).allowed
        if failure == "killed":
            fresh_redis.kill()
        else:
            fresh_redis.pause()
        down, took = [], []
        for _ in range(3):
            t0 = time.monotonic()
            down.append(await asyncio.wait_for(lim.hit("k"), ANSWER_WITHIN))
            took.append(time.monotonic() - t0)
        # Within the call's deadline (0.75 s: the two timeouts), with room for a loaded machine.
        assert max(took) < sum(timeouts.values()) + 0.5, took
        assert all(r.error is not None for r in down)
        assert all(r.allowed is (policy == "allow") for r in down)
        stats = lim.stats()
        assert stats["fail_open" if policy == "allow" else "fail_closed"] == 3
        assert stats["backend_errors"] == 3 and stats["allowed"] == 1
        if failure == "killed":
            fresh_redis.start()  # same port; its data is gone
            assert (await wait_back(lim, "k")).remaining == 1
        else:
            fresh_redis.resume()
            assert (await wait_back(lim, "k")).remaining == 0  # the count survived
            assert not (await lim.hit("k")).allowed
    finally:
        await store.aclose()


def test_a_server_answers_503_while_redis_is_down_and_recovers(
    fresh_redis: Any, app_servers: AppServers
) -> None:
    env = {
        "ZEAL_STORE_BACKEND": "redis",
        "ZEAL_REDIS_URL": fresh_redis.url,
        "ZEAL_KEY_PREFIX": unique(),
        "RL_ON_ERROR": "deny",
        "RL_LIMIT": "5/hour",
    }
    server = app_servers.start("tests.ratelimit.apps.limited_app:app", server="uvicorn", env=env)
    with httpx.Client(base_url=server.url, timeout=ANSWER_WITHIN) as client:
        assert client.get("/dep").status_code == 200
        fresh_redis.kill()
        down = client.get("/dep")
        assert down.status_code == 503 and down.headers["retry-after"] == "1"
        assert "unavailable" in down.json()["detail"]
        fresh_redis.start()
        deadline = time.monotonic() + ANSWER_WITHIN
        while (code := client.get("/dep").status_code) == 503:
            assert time.monotonic() < deadline, "still 503 after Redis came back"
            time.sleep(0.1)
        assert code == 200
