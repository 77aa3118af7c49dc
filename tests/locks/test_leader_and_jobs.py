"""Leader election (``zeal.is_leader``, ``@zeal.leader_only``) and the behaviour of
``zeal.every`` in one process: failures counted, run at start, stats in ``/health/store``,
typed errors at declaration."""

from __future__ import annotations

import asyncio
import os
import signal
import time
import uuid
from typing import Any

import pytest
from starlette.applications import Starlette
from starlette.testclient import TestClient

import zeal_asgi.health
from tests._harness.apps import AppServer
from tests.locks.conftest import LOCKS_APP
from zeal_asgi import Store, Zeal
from zeal_asgi.errors import ConfigError, InvalidKeyError, InvalidTTLError
from zeal_asgi.locks import LEADER_TTL, job_stats


def table_zeal() -> Zeal:
    return Zeal(store=Store("table"))


async def test_one_leader_among_apps_and_leader_only_runs_there() -> None:
    a, b = table_zeal(), table_zeal()  # two apps of one host: one leader between them
    calls: list[str] = []

    @b.leader_only
    async def b_job(tag: str) -> str:
        calls.append(tag)
        return tag

    async with a, b:
        assert await a.is_leader() is True
        assert await b.is_leader() is False
        assert await b_job("x") is None and calls == []
        await a.shutdown()  # gives leadership up: b leads at its next campaign
        for _ in range(50):  # the campaign retries every second
            if await b.is_leader():
                break
            await asyncio.sleep(0.1)
        assert await b_job("y") == "y" and calls == ["y"]


def test_leader_only_refuses_a_sync_function() -> None:
    zeal = table_zeal()
    with pytest.raises(ConfigError):
        zeal.leader_only(lambda: None)  # type: ignore[type-var]
    with pytest.raises(ConfigError):
        zeal.leader_only(scope="planet")(_noop)


async def _noop() -> None:
    return None


def test_exactly_one_worker_leads_and_a_sigkilled_leader_is_replaced() -> None:
    with AppServer(LOCKS_APP, server="launcher", workers=2) as app:
        replies = app.on_each_worker("/leader")
        leaders = [pid for pid, r in replies.items() if r["leader"]]
        assert len(leaders) == 1
        os.kill(leaders[0], signal.SIGKILL)
        deadline = time.monotonic() + 30
        new = None
        while new is None and time.monotonic() < deadline:
            r = app.get("/leader")
            new = r["pid"] if r["leader"] and r["pid"] != leaders[0] else None
        assert new is not None, "nobody took over"
    assert LEADER_TTL > 5  # taken over at once, long before a stopped leader's lease expires


def test_job_failures_runs_and_last_run_are_counted_and_reported() -> None:
    zeal = table_zeal()
    name = f"job-{uuid.uuid4().hex[:8]}"
    calls = 0

    @zeal.every(0.05, name=name, run_at_start=True)
    async def flaky() -> None:
        nonlocal calls
        calls += 1
        if calls == 5:  # the fifth run holds the figures still while the test reads them
            await asyncio.sleep(3600)
        if calls % 2:
            raise RuntimeError("boom")

    app = Starlette(routes=zeal_asgi.health.starlette_routes(), lifespan=zeal.lifespan)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while calls < 5 and time.monotonic() < deadline:
            time.sleep(0.05)
        health = client.get("/health/store").json()
        metrics = client.get("/health/store/metrics").text
        stats = job_stats()[name]
    job = health["jobs"][name]
    assert job["runs_total"] == stats["runs"] == 5  # counted when a run starts
    assert job["failures_total"] == stats["failures"] == 2  # the first and the third
    assert 0 < time.time() - job["last_start_seconds"] < 60
    assert job["last_duration_seconds"] >= 0
    assert f'zeal_job_runs_total{{job="{name}"}} {job["runs_total"]}' in metrics
    assert f'zeal_job_failures_total{{job="{name}"}}' in metrics


async def test_run_at_start_runs_at_once() -> None:
    zeal = table_zeal()
    ran = asyncio.Event()

    @zeal.every(3600, name=f"hourly-{uuid.uuid4().hex[:8]}", run_at_start=True)
    async def hourly() -> None:
        ran.set()

    async with zeal:
        await asyncio.wait_for(ran.wait(), 10)


@pytest.mark.parametrize(
    ("seconds", "kwargs", "error"),
    [
        (0, {}, InvalidTTLError),
        (-1, {}, InvalidTTLError),
        (float("nan"), {}, InvalidTTLError),
        (0.0001, {}, InvalidTTLError),
        (1, {"jitter": 1}, InvalidTTLError),
        (1, {"jitter": -0.1}, InvalidTTLError),
        (1, {"scope": "galaxy"}, ConfigError),
        (1, {"name": ""}, InvalidKeyError),
        (1, {"name": "zeal:x"}, InvalidKeyError),
    ],
)
def test_bad_job_declarations_are_typed_errors(
    seconds: float, kwargs: dict[str, Any], error: type
) -> None:
    with pytest.raises(error):
        table_zeal().every(seconds, **kwargs)(_noop)


def test_a_job_name_is_declared_once_and_jobs_are_async() -> None:
    zeal = table_zeal()
    zeal.every(1, name="once")(_noop)
    with pytest.raises(ConfigError, match="once"):
        zeal.every(1, name="once")(_noop)
    with pytest.raises(ConfigError):
        zeal.every(1)(lambda: None)  # type: ignore[type-var]
