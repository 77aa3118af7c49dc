"""Class-level calls (``Store.get``, ``Cache.get``) act on the default; instance calls on the
instance, whatever the default is, and after the default changes or goes away."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from zeal_asgi import Cache, Store
from zeal_asgi.errors import ConfigError
from zeal_asgi.store.facade import hybridmethod


@pytest.fixture
def no_default() -> Iterator[None]:
    before = Store._default
    Store.set_default(None)
    yield
    Store.set_default(before)


def test_class_calls_follow_the_default_instances_keep_their_own(no_default: None) -> None:
    on_redis = Store("redis", "redis://127.0.0.1:1/0")  # validated, never connected
    on_table = Store("table")
    Store.set_default(on_redis)
    assert Store.default_backend() is Store.BACKEND_REDIS
    assert on_table.default_backend() is Store.BACKEND_TABLE  # not the default's
    later = Store("table")  # made while the class holds the default's methods
    assert later.default_backend() is Store.BACKEND_TABLE
    assert later.stats.__self__ is later  # type: ignore[attr-defined]
    Store.set_default(on_table)
    assert Store.default_backend() is Store.BACKEND_TABLE
    assert Store.stats.__self__ is on_table  # type: ignore[attr-defined]
    assert on_redis.default_backend() is Store.BACKEND_REDIS


def test_without_a_default_the_class_builds_one(
    no_default: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert isinstance(Store.__dict__["stats"], hybridmethod)  # the descriptor is back
    monkeypatch.setenv("ZEAL_STORE_BACKEND", "table")
    kind = Store.default_backend()  # built from the environment on first use
    assert kind is Store.BACKEND_TABLE and Store._default is not None
    assert Store.stats.__self__ is Store._default  # type: ignore[attr-defined]


def test_cache_class_calls_need_init_then_follow_the_default() -> None:
    before = Cache._default
    Cache.set_default(None)
    try:
        with pytest.raises(ConfigError, match=r"Cache\.init"):
            Cache.stats()
        cache = Cache.__new__(Cache)  # no tiers needed: only the dispatch is checked
        Cache.set_default(cache)
        assert Cache.stats.__self__ is cache  # type: ignore[attr-defined]
    finally:
        Cache.set_default(before)
