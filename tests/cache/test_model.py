"""Model-based test: the cache on the table backend against a dict, through restarts."""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from typing import Any

from hypothesis import settings, strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from tests.cache.conftest import SECRET, unique
from zeal_asgi.cache import MISSING, Cache
from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend

KEYS = st.sampled_from(["a", "b", "c", "d", "e", "f"])
VALUES = st.one_of(
    st.none(),
    st.integers(),
    st.text(max_size=20),
    st.binary(max_size=20),
    st.tuples(st.integers(), st.text(max_size=5)),
    st.integers(min_value=9000, max_value=20_000).map(lambda n: "B" * n),  # oversize: spills
)


class CacheMachine(RuleBasedStateMachine):
    """Sets, deletes, flushes and server restarts (fresh shared memory, same files)."""

    def __init__(self) -> None:
        super().__init__()
        self.runner = asyncio.Runner()
        self.dir = tempfile.mkdtemp(prefix="zeal-cache-model-")
        self.namespace = unique("m")
        self.backends: list[TableBackend] = []
        self.caches: list[Cache] = []
        self.model: dict[str, Any] = {}
        self.expired: set[str] = set()  # expired but maybe not swept: delete() may say True
        self.cache = self._start()

    def _start(self) -> Cache:
        backend = TableBackend(namespace=unique("mt"))
        self.backends.append(backend)
        cache = Cache(
            4,  # a tiny memory tier: full-table spills happen all the time
            f"{self.dir}/c",
            0,
            store=Store(backend=backend),
            secret=SECRET,
            namespace=self.namespace,
        )
        self.caches.append(cache)
        return cache

    def run(self, coro: Any) -> Any:
        return self.runner.run(coro)

    @rule(key=KEYS, value=VALUES)
    def set(self, key: str, value: Any) -> None:
        assert self.run(self.cache.set(key, value)) is True
        self.model[key] = value
        self.expired.discard(key)

    @rule(key=KEYS)
    def delete(self, key: str) -> None:
        existed = self.run(self.cache.delete(key))
        if key not in self.expired:
            assert existed == (key in self.model)
        self.model.pop(key, None)
        self.expired.discard(key)

    @rule(key=KEYS)
    def get(self, key: str) -> None:
        assert self.run(self.cache.get(key, MISSING)) == self.model.get(key, MISSING)

    @rule()
    def flush(self) -> None:
        self.run(self.cache.flush())
        self.model.clear()
        self.expired.clear()

    @rule()
    def restart(self) -> None:
        self.cache = self._start()

    @rule(key=KEYS)
    def expire(self, key: str) -> None:
        self.run(self.cache.set(key, "short-lived", ttl=0.001))
        time.sleep(0.002)
        self.model.pop(key, None)
        self.expired.add(key)

    @invariant()
    def has_agrees(self) -> None:
        for key in ("a", "f"):
            assert self.run(self.cache.has(key)) == (key in self.model)

    def teardown(self) -> None:
        for cache in self.caches:
            cache.close()
        for backend in self.backends:
            backend.close_all()
        self.runner.close()
        shutil.rmtree(self.dir)


CacheMachine.TestCase.settings = settings(max_examples=40, stateful_step_count=30, deadline=None)
test_cache_against_a_dict = CacheMachine.TestCase
