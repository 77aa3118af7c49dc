"""The shared breaker state machine: options, rolling window, one probe per host, leases."""

from __future__ import annotations

import multiprocessing
import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from zeal_asgi.errors import ConfigError
from zeal_asgi.shm.hoststats import host_stats
from zeal_asgi.store.backends.breaker import BreakerOptions, BreakerState, SharedBreaker


@pytest.fixture
def breaker_name() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


def st(b: SharedBreaker) -> BreakerState:
    """The state, read fresh (a call, so the type checker does not narrow it)."""
    return b.state


def _make(name: str, **opts: Any) -> SharedBreaker:
    return SharedBreaker(name, BreakerOptions.parse(opts))


@pytest.fixture
def make_breaker(breaker_name: str) -> Iterator[Any]:
    made: list[SharedBreaker] = []

    def factory(**opts: Any) -> SharedBreaker:
        b = _make(breaker_name, **opts)
        made.append(b)
        return b

    yield factory
    for b in made:
        b.close()


@pytest.mark.parametrize(
    ("opts", "fragment"),
    [
        ({"failure_threshold": 0}, "failure_threshold: .* greater than or equal to 1"),
        ({"failure_threshold": 2.5}, "failure_threshold: .* valid integer"),
        ({"failure_threshold": True}, "failure_threshold: .* valid integer"),
        ({"failure_window_sec": "10"}, "failure_window_sec: .* valid number"),
        ({"failure_window_sec": 0}, "failure_window_sec: .* greater than or equal to 0.01"),
        ({"open_seconds": -1}, "open_seconds: .* greater than or equal to 0"),
        ({"open_seconds": float("nan")}, "open_seconds: .* finite"),
        ({"open_seconds": 10**9}, "open_seconds: .* less than or equal to 86400"),
        ({"probe_lease_sec": 0}, "probe_lease_sec"),
        ({"failure_treshold": 5}, "failure_treshold: Extra inputs are not permitted"),
        ({"name": ""}, "name"),
    ],
)
def test_bad_options_are_config_errors(opts: dict[str, Any], fragment: str) -> None:
    with pytest.raises(ConfigError, match=fragment):
        BreakerOptions.parse(opts)


def test_options_defaults_and_types() -> None:
    defaults = BreakerOptions(failure_threshold=5, failure_window_sec=10.0, open_seconds=30.0)
    assert BreakerOptions.parse(None) == defaults
    o = BreakerOptions.parse({"failure_threshold": 3, "failure_window_sec": 2, "open_seconds": 0})
    assert (o.failure_threshold, o.failure_window_sec, o.open_seconds) == (3, 2, 0)
    with pytest.raises(ConfigError, match="must be a dict"):
        BreakerOptions.parse([("failure_threshold", 1)])  # type: ignore[arg-type]


def test_rolling_window(make_breaker: Any) -> None:
    b = make_breaker(failure_threshold=3, failure_window_sec=0.5, open_seconds=30)
    b.failed(0)
    b.failed(0)
    assert st(b) is BreakerState.CLOSED and b.failures_in_window() == 2
    time.sleep(0.6)  # the first two leave the window: a true rolling window, not an anchor
    assert b.failures_in_window() == 0
    b.failed(0)
    b.failed(0)
    assert st(b) is BreakerState.CLOSED
    b.failed(0)
    assert st(b) is BreakerState.OPEN
    assert b.admit() is None


def test_open_probe_close_cycle(make_breaker: Any) -> None:
    b = make_breaker(failure_threshold=1, open_seconds=0.2)
    opened = host_stats().worker().get("breaker_opened_total", 0)
    assert b.admit() == 0  # closed: plain admission, no shared write
    b.failed(0)
    assert st(b) is BreakerState.OPEN
    assert host_stats().worker()["breaker_opened_total"] == opened + 1
    assert b.admit() is None
    time.sleep(0.25)
    token = b.admit()
    assert token and st(b) is BreakerState.HALF_OPEN
    assert b.admit() is None  # exactly one probe
    b.failed(token)  # the probe failed: open again, with a fresh timer
    assert st(b) is BreakerState.OPEN and b.admit() is None
    time.sleep(0.25)
    token = b.admit()
    assert token
    b.succeeded(token)
    assert st(b) is BreakerState.CLOSED and b.failures_in_window() == 0
    b.succeeded(token)  # a stale token changes nothing
    assert st(b) is BreakerState.CLOSED


def test_abandoned_probe_and_lease(make_breaker: Any) -> None:
    b = make_breaker(failure_threshold=1, open_seconds=0.1, probe_lease_sec=0.3)
    b.failed(0)
    time.sleep(0.15)
    token = b.admit()
    assert token
    b.abandoned(token)  # cancelled: the next call may probe at once
    token2 = b.admit()
    assert token2 and token2 != token
    # the prober "dies": after the lease another caller takes over, the old token is void
    assert b.admit() is None
    time.sleep(0.35)
    token3 = b.admit()
    assert token3
    b.succeeded(token2)
    assert st(b) is BreakerState.HALF_OPEN
    b.succeeded(token3)
    assert st(b) is BreakerState.CLOSED


def test_zero_open_seconds_probes_on_next_call(make_breaker: Any) -> None:
    b = make_breaker(failure_threshold=1, open_seconds=0)
    b.failed(0)
    assert b.admit()


def _contend(name: str, start: Any, results: Any) -> None:
    b = SharedBreaker(name, BreakerOptions.parse({"failure_threshold": 1, "open_seconds": 0.3}))
    start.wait()
    got = 0
    deadline = time.monotonic() + 0.6
    while time.monotonic() < deadline:
        if b.admit():
            got += 1
    results.put(got)


def test_one_probe_across_processes(make_breaker: Any, breaker_name: str) -> None:
    """Four worker processes hammer admit() across the end of the open period: one probe."""
    b = make_breaker(failure_threshold=1, open_seconds=0.3)
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=_contend, args=(breaker_name, start, results)) for _ in range(4)]
    for p in procs:
        p.start()
    try:
        time.sleep(0.5)  # let them import and attach
        b.failed(0)  # opened by this process: the others see it through shared memory
        start.set()
        probes = [results.get(timeout=20) for _ in procs]
    finally:
        for p in procs:
            p.join(10)
        results.close()
        results.join_thread()
    print(f"probes admitted per process: {probes}")
    assert sum(probes) == 1
    assert st(b) is BreakerState.HALF_OPEN
