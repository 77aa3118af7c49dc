"""Exposition: text 0.0.4 by default and OpenMetrics on request, valid for prometheus_client's
parsers and for ``promtool check metrics``; the router, the plain Starlette routes, the
prometheus_client collector."""

from __future__ import annotations

import subprocess
import uuid

import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.openmetrics.exposition import generate_latest as generate_openmetrics
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

from tests._harness.servers import require_binary
from tests.metrics.conftest import parse_openmetrics, scrape
from zeal_asgi import metrics
from zeal_asgi.metrics import Registry

OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


def declare_one_of_each(registry: Registry) -> None:
    """A metric of every kind, with label values that need escaping, each used once."""
    c = metrics.Counter("jobs_total", 'Jobs, "quoted" \\ and\nnewline.', ("q",), registry=registry)
    c.labels('a "b" \\ c\nd').inc(3)
    metrics.Gauge("temp_celsius", "Temperature.", ("room",), mode="max", registry=registry).labels(
        "kitchen"
    ).set(21.5)
    metrics.Histogram("lat_seconds", "Latency.", ("route",), registry=registry).labels(
        "/x/{id}"
    ).observe(0.3)
    metrics.Summary("size_bytes", "Sizes.", registry=registry).observe(512)
    metrics.Gauge("latest", "Last value.", mode="mostrecent", registry=registry).set(-1e-9)


def test_text_format_parses_and_keeps_every_value(registry: Registry) -> None:
    declare_one_of_each(registry)
    text = metrics.render(registry.collect())
    families = {f.name: f for f in text_string_to_metric_families(text)}
    assert families["jobs"].type == "counter"
    assert families["jobs"].documentation == 'Jobs, "quoted" \\ and\nnewline.'
    assert families["jobs"].samples[0].labels == {"q": 'a "b" \\ c\nd'}
    assert families["jobs"].samples[0].value == 3
    assert families["temp_celsius"].type == "gauge"
    assert families["lat_seconds"].type == "histogram"
    assert families["size_bytes"].type == "summary"
    assert scrape(registry)["latest"] == -1e-9
    assert "# TYPE jobs_total counter" in text and "jobs_total{" in text


def test_openmetrics_parses_and_ends_with_eof(registry: Registry) -> None:
    declare_one_of_each(registry)
    text = metrics.render(registry.collect(), openmetrics=True)
    assert text.endswith("# EOF\n") and "# TYPE jobs counter" in text
    families = {f.name: f for f in parse_openmetrics(text)}
    assert families["jobs"].samples[0].value == 3
    assert {s.name for s in families["lat_seconds"].samples} == {
        "lat_seconds_bucket",
        "lat_seconds_count",
        "lat_seconds_sum",
    }


def test_promtool_accepts_the_text_format(registry: Registry) -> None:
    promtool = require_binary("promtool")
    declare_one_of_each(registry)
    text = metrics.render(registry.collect())
    run = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0 and not run.stdout.strip() and not run.stderr.strip(), run


@pytest.mark.parametrize("framework", ["fastapi", "starlette"])
def test_metrics_endpoint_negotiates_the_format(framework: str) -> None:
    """The default registry through ``metrics.router`` (FastAPI) and ``metrics.routes()``."""
    name = f"seen_{uuid.uuid4().hex[:8]}"
    metrics.Counter(name, "Seen.").inc(2)
    app = Starlette(routes=metrics.routes())
    if framework == "fastapi":
        app = FastAPI()
        app.include_router(metrics.router)
    with TestClient(app) as client:
        text = client.get("/metrics")
        om = client.get("/metrics", headers={"Accept": "application/openmetrics-text"})
        prom = client.get(
            "/metrics",
            headers={  # what Prometheus sends
                "Accept": "application/openmetrics-text;version=1.0.0,application/openmetrics-"
                "text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
            },
        )
    assert text.headers["content-type"] == metrics.CONTENT_TYPE
    assert f"{name}_total 2" in text.text
    assert om.headers["content-type"] == prom.headers["content-type"] == OPENMETRICS
    assert any(f.name == name for f in parse_openmetrics(om.text))


def test_collector_feeds_a_prometheus_client_registry(registry: Registry) -> None:
    declare_one_of_each(registry)
    pc = CollectorRegistry()
    pc.register(metrics.collector(registry))
    ours = scrape(registry)
    text = generate_latest(pc).decode()
    theirs = [s.value for f in text_string_to_metric_families(text) for s in f.samples]
    assert sorted(theirs) == sorted(ours.values())
    om = generate_openmetrics(pc).decode()  # type: ignore[no-untyped-call]
    assert any(f.name == "jobs" for f in parse_openmetrics(om))
