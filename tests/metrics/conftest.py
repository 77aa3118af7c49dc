"""Fixtures of the metrics tests: a registry of its own per test, unlinked afterwards."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.metrics_core import Metric
from prometheus_client.openmetrics.parser import text_string_to_metric_families as _openmetrics
from prometheus_client.parser import text_string_to_metric_families

from zeal_asgi import metrics
from zeal_asgi.metrics import Registry
from zeal_asgi.shm.segments import destroy

MakeRegistry = Callable[..., Registry]


@pytest.fixture
def make_registry() -> Iterator[MakeRegistry]:
    """Factory of registries with a table of their own (``max_series`` rows)."""
    made: list[Registry] = []

    def factory(max_series: int = 1000) -> Registry:
        made.append(Registry(max_series, name=f"m-{uuid.uuid4().hex[:12]}"))
        return made[-1]

    yield factory
    for r in made:
        destroy(r.table)


@pytest.fixture
def registry(make_registry: MakeRegistry) -> Registry:
    """A registry of 1000 rows for this test."""
    return make_registry()


def scrape(registry: Registry) -> dict[str, float]:
    """``{'name{a="x",b="y"}': value}`` of every sample, parsed by prometheus_client."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics.render(registry.collect())):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in s.labels.items())
            out[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return out


def parse_openmetrics(text: str) -> list[Metric]:
    """The families of an OpenMetrics text, by prometheus_client's parser (which checks it)."""
    return list(_openmetrics(text))  # type: ignore[no-untyped-call]
