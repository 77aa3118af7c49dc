"""The compiled path of a one-limit fixed window: built, importing only the errors of the package,
and deciding every admitted hit exactly as the Python path does (the same results, headers and
counts for the same sequence of hits at the same times); whatever it does not decide it leaves
to the Python path, charging nothing."""

from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import given, settings, strategies as st

from tests.ratelimit.conftest import unique
from zeal_asgi.ratelimit import (
    RateLimit,
    RateLimiter,
    RateLimitResult,
    _fast,
    limiter as limiter_module,
)
from zeal_asgi.ratelimit.http import client_ip, raw_headers
from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend

Headers = list[tuple[bytes, bytes]]
START = 1_800_000_000.0  # a multiple of every window below


def test_the_rate_limit_path_is_compiled() -> None:
    # its stub is checked with the other compiled modules' (tests/core/test_ext.py)
    assert _fast.__file__ is not None and _fast.__file__.endswith(".so")


def test_the_compiled_path_imports_only_the_errors_of_the_package() -> None:
    """The layering test reads ``.py`` files; the ``.pyx`` is held to the same rule here."""
    source = (Path(_fast.__file__).parent / "_fast.pyx").read_text()
    targets = re.findall(r"^(?:from|import|cimport)\s+([\w.]+)", source, re.MULTILINE)
    assert [t for t in targets if t.startswith("zeal_asgi")] == ["zeal_asgi.errors"]


@contextmanager
def table_store() -> Iterator[Store]:
    """A Store on a table backend of its own, its shared memory unlinked afterwards."""
    backend = TableBackend(namespace=unique("rt"))
    try:
        yield Store(backend=backend)
    finally:
        backend.close_shared()


class Clock:
    """The Python path's clock (``limiter._time``), set by hand."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.now = START
        monkeypatch.setattr(limiter_module, "_time", lambda: self.now)


def compiled_hit(lim: RateLimiter, key: str, now: float) -> tuple[RateLimitResult, Headers, bool]:
    """What the FastAPI dependency does at ``now``: the compiled call, else the Python path."""
    fixed = lim.compiled
    assert fixed is not None
    headers: Headers = []
    result = fixed.hit_at(key, headers, now)
    if result is not None:
        return result, headers, True
    assert headers == []  # nothing appended when the Python path decides
    result = lim.hit_now(key, 1)
    assert result is not None
    return result, raw_headers(lim, result), False


def python_hit(lim: RateLimiter, key: str) -> tuple[RateLimitResult, Headers]:
    result = lim.hit_now(key, 1)
    assert result is not None
    return result, raw_headers(lim, result)


def same(headers: Headers, name: str, other: str) -> Headers:
    return [(n, v.replace(name.encode(), other.encode())) for n, v in headers]


def test_a_window_rolls_over_at_its_boundary(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock(monkeypatch)
    with table_store() as store:
        lim = RateLimiter("2 per 10 seconds", name=unique(), store=store)
        end = START + 10.0
        clock.now = end - 1e-6
        first, headers, compiled = compiled_hit(lim, "k", clock.now)
        assert compiled and first.allowed and first.remaining == 1
        assert headers[1] == (b"ratelimit", f'"{lim.name}";r=1;t=1'.encode())
        assert compiled_hit(lim, "k", clock.now)[0].remaining == 0
        refused, headers, compiled = compiled_hit(lim, "k", clock.now)
        assert not compiled and not refused.allowed  # the Python path refuses it, with 429's
        assert (b"retry-after", b"1") in headers
        clock.now = end  # the next window: full again
        again, headers, compiled = compiled_hit(lim, "k", end)
        assert compiled and again.allowed and again.remaining == 1 and again.reset_after == 10.0
        assert headers == [
            (b"ratelimit-policy", f'"{lim.name}";q=2;w=10'.encode()),
            (b"ratelimit", f'"{lim.name}";r=1;t=10'.encode()),
        ]


def test_what_it_does_not_decide_is_left_to_the_python_path() -> None:
    with table_store() as store:
        lim = RateLimiter("1/minute", name=unique(), store=store, key_size=8)
        fixed = lim.compiled
        assert fixed is not None
        for key in ("", "x" * 9, "clé", 7):
            headers: Headers = []
            assert fixed.hit(key, headers) is None and headers == []  # type: ignore[arg-type]
        assert fixed.hit("k", []) is not None
        headers = []
        assert fixed.hit("k", headers) is None and headers == []  # refused: nothing charged
        assert lim.hit_now("j", 1) is not None and lim.stats()["allowed"] == 2
    # several limits, another algorithm, X-RateLimit-* headers: the Python path decides all
    with table_store() as store:
        for lim in (
            RateLimiter("1/second;5/minute", name=unique(), store=store),
            RateLimiter("5/minute", name=unique(), store=store, algorithm="sliding_window"),
            RateLimiter("5/minute", name=unique(), store=store, x_ratelimit_headers=True),
        ):
            assert lim.compiled is None


def test_a_store_switched_to_another_backend_is_left_to_the_python_path() -> None:
    with table_store() as store, table_store() as other:
        lim = RateLimiter("5/minute", name=unique(), store=store)
        assert lim.compiled is not None and lim.compiled.hit("k", []) is not None
        Store.set_default(other)
        try:
            follower = RateLimiter("5/minute", name=unique())
            assert follower.compiled is not None
            assert follower.compiled.hit("k", []) is not None
            Store.set_default(store)  # the default moved: the limiter rebinds in Python
            assert follower.compiled.hit("k", []) is None
            assert follower.hit_now("k", 1) is not None  # ... and arms the compiled path again
            assert follower.compiled.hit("k", []) is not None
        finally:
            Store.set_default(None)


steps = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c"]),
        # time forward: none, a little, to a window's end or just before it
        st.sampled_from([0.0, 0.0, 0.0, 0.01, 0.7, 2.5, "boundary", "just-before"]),
    ),
    min_size=1,
    max_size=40,
)


@settings(max_examples=60, deadline=None)
@given(amount=st.integers(1, 4), per=st.sampled_from([1.0, 2.5, 60.0]), steps=steps)
def test_compiled_decisions_equal_the_python_paths(
    amount: int, per: float, steps: list[tuple[str, float | str]]
) -> None:
    with pytest.MonkeyPatch.context() as monkeypatch, table_store() as store:
        clock = Clock(monkeypatch)
        compiled = RateLimiter(RateLimit(amount, per), name=unique(), store=store)
        python = RateLimiter(RateLimit(amount, per), name=unique(), store=store)
        for key, step in steps:
            if step == "boundary":
                clock.now = (int(clock.now / per) + 1) * per
            elif step == "just-before":
                clock.now = max(clock.now, (int(clock.now / per) + 1) * per - 1e-6)
            else:
                assert isinstance(step, float)
                clock.now += step
            got, got_headers, fast = compiled_hit(compiled, key, clock.now)
            want, want_headers = python_hit(python, key)
            assert got[:5] == want[:5] and got.policy == want.policy and got.error is None
            assert got_headers == same(want_headers, python.name, compiled.name)
            assert fast == got.allowed  # every admitted hit decided in the compiled call
        assert compiled.stats() == python.stats()


def test_the_peer_key_is_the_client_ips() -> None:
    with table_store() as store:
        for scope, key in (
            ({"client": ("192.0.2.7", 4711)}, "192.0.2.7"),
            ({"client": None}, "unknown"),
            ({}, "unknown"),
        ):
            assert _fast.peer(scope) == client_ip.of_scope(scope) == key
            lim = RateLimiter("3/minute", name=unique(), store=store)
            assert lim.compiled is not None
            headers: Headers = []
            by_peer = lim.compiled.hit_peer(scope, headers)
            by_key = lim.compiled.hit(key, headers)
            assert by_peer is not None and by_key is not None  # one row: the key's
            assert (by_peer.remaining, by_key.remaining) == (2, 1) and len(headers) == 4
