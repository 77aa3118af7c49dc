"""``/health/store`` and its Prometheus twin: 200 / 503, figures, and sums over real workers."""

from __future__ import annotations

import multiprocessing as mp
import os
import re
import signal
import time
import uuid
from typing import Any

import pytest
from fastapi import FastAPI
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as parse_openmetrics,
)
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.testclient import TestClient

import zeal_asgi.health
from tests._harness.apps import AppServer
from tests._harness.servers import Memcached, RedisServer
from tests.core import crashpoints
from zeal_asgi import Store, Table, Zeal, ZealMiddleware
from zeal_asgi.health import PROMETHEUS_CONTENT_TYPE, metric_name, starlette_routes
from zeal_asgi.metrics import OPENMETRICS_CONTENT_TYPE
from zeal_asgi.shm import _shmtable

CP_UPDATE_MID = 2
"""``ZT_CP_UPDATE_MID`` (ext/zt_core.h): an update with its first column written, others not."""

_SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{[^}]*\})? (-?[0-9.e+]+|NaN|[+-]Inf)$")


def parse_prometheus(text: str) -> dict[str, float]:
    """``{"name{labels}": value}``; asserts every line is valid exposition format."""
    samples: dict[str, float] = {}
    typed: set[str] = set()
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert kind in ("counter", "gauge"), line
            assert name not in typed, f"duplicate TYPE for {name}"
            typed.add(name)
            continue
        if line.startswith("# HELP ") or not line:
            continue
        m = _SAMPLE.match(line)
        assert m, f"not a Prometheus sample line: {line!r}"
        assert m.group(1) in typed, f"{m.group(1)} has no TYPE line"
        samples[m.group(1) + (m.group(2) or "")] = float(m.group(3))
    return samples


def _app(zeal: Zeal) -> FastAPI:
    app = FastAPI(lifespan=zeal.lifespan)
    app.add_middleware(ZealMiddleware, zeal=zeal)
    app.include_router(zeal_asgi.health.router)
    return app


def test_health_200_reports_tables_shm_and_backend(table_zeal: Zeal) -> None:
    store = table_zeal.store
    name = f"h_{uuid.uuid4().hex[:8]}"
    store.make(name, 100, {"v": (Store.TYPE_INT, 8)})
    with TestClient(_app(table_zeal)) as client:
        for _ in range(3):
            client.get("/health/store")  # warm: health checks are counted too
        store.table(name).set("a", {"v": 1})
        store.table(name).set("b", {"v": 2})
        resp = client.get("/health/store")
    assert resp.status_code == 200
    body = resp.json()
    assert body["status"] == "ok" and body["reason"] is None
    assert body["backend"] == "table"
    t = body["tables"][name]
    assert t["rows"] == 2 and t["capacity"] == 100
    assert t["memory_bytes"] == store.table(name).memory_bytes > 100 * 8
    assert t["lock_recoveries_total"] == 0 and body["lock_recoveries_total"] == 0
    assert body["shm"]["size_bytes"] >= body["shm"]["free_bytes"] > 0
    assert body["breaker"] is None
    assert body["host"]["zeal_health_checks_total"] >= 4
    assert body["worker"]["zeal_health_checks_total"] >= 4  # one process: its share is all
    assert body["workers_reporting"] >= 1


def test_prometheus_text_is_valid_and_matches_the_json(table_zeal: Zeal) -> None:
    store = table_zeal.store
    name = f"p_{uuid.uuid4().hex[:8]}"
    store.make(name, 64, {"v": (Store.TYPE_INT, 8)})
    store.table(name).set("k", {"v": 1})
    with TestClient(_app(table_zeal)) as client:
        resp = client.get("/health/store/metrics")
        body = client.get("/health/store").json()
    assert resp.status_code == 200
    assert resp.headers["content-type"] == PROMETHEUS_CONTENT_TYPE
    samples = parse_prometheus(resp.text)
    assert samples['zeal_up{backend="table"}'] == 1
    assert samples[f'zeal_table_rows{{table="{name}"}}'] == 1
    assert samples[f'zeal_table_capacity{{table="{name}"}}'] == 64
    assert (
        samples[f'zeal_table_memory_bytes{{table="{name}"}}']
        == body["tables"][name]["memory_bytes"]
    )
    assert samples["zeal_shm_size_bytes"] == body["shm"]["size_bytes"]
    # integers stay integers (no 2.5e+10 rounding)
    assert re.search(r"^zeal_shm_size_bytes \d+$", resp.text, re.MULTILINE)


def test_store_metrics_in_openmetrics_when_asked(table_zeal: Zeal) -> None:
    """/health/store/metrics is rendered by zeal_asgi.metrics: OpenMetrics on request."""
    with TestClient(_app(table_zeal)) as client:
        om = client.get("/health/store/metrics", headers={"Accept": "application/openmetrics-text"})
    assert om.headers["content-type"] == OPENMETRICS_CONTENT_TYPE and om.text.endswith("# EOF\n")
    families = list(parse_openmetrics(om.text))  # type: ignore[no-untyped-call]
    names = {s.name for f in families for s in f.samples}
    assert {"zeal_up", "zeal_health_checks_total", "zeal_shm_size_bytes"} <= names


def test_health_routes_work_in_plain_starlette(table_zeal: Zeal) -> None:
    app = Starlette(routes=starlette_routes())
    app.add_middleware(ZealMiddleware, zeal=table_zeal)
    with TestClient(app) as client:
        resp = client.get("/health/store")
        metrics = client.get("/health/store/metrics")
    assert resp.status_code == 200 and resp.json()["backend"] == "table"
    assert parse_prometheus(metrics.text)['zeal_up{backend="table"}'] == 1


def test_health_is_in_the_openapi_schema(table_zeal: Zeal) -> None:
    with TestClient(_app(table_zeal)) as client:
        spec = client.get("/openapi.json").json()
    op = spec["paths"]["/health/store"]["get"]
    assert op["responses"]["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/StoreHealth"
    }
    assert "503" in op["responses"]
    assert "TableHealth" in spec["components"]["schemas"]


def test_host_counters_are_summed_over_real_workers(example_server: AppServer) -> None:
    """Each worker records its own health checks; any worker reports the host's sum."""

    def checks() -> float:
        status, text = example_server.fetch("/health/store/metrics")
        assert status == 200
        return parse_prometheus(text)["zeal_health_checks_total"]

    before = checks()
    pids = set()
    n = 40
    for _ in range(n):
        status, body = example_server.fetch("/health/store")
        assert status == 200
        pids.add(body["pid"])
    after = checks()
    print(f"health checks: {n} requests by workers {sorted(pids)}; host sum +{after - before:g}")
    assert after - before == n + 1  # the n checks plus the second metrics request itself
    assert len(pids) == 2, f"expected both workers to answer, got {pids}"


@pytest.mark.redis
def test_health_503_when_redis_stops_and_200_when_it_is_back(fresh_redis: RedisServer) -> None:
    store = Store("redis", {"url": fresh_redis.url, "prefix": f"h{uuid.uuid4().hex[:6]}"})
    zeal = Zeal(store=store)
    with TestClient(_app(zeal)) as client:
        up = client.get("/health/store")
        assert up.status_code == 200, up.text
        assert up.json()["backend"] == "redis"
        assert up.json()["pool"]["pool_size"] >= 1
        fresh_redis.kill()
        t0 = time.monotonic()
        down = client.get("/health/store")
        took = time.monotonic() - t0
        metrics = parse_prometheus(client.get("/health/store/metrics").text)
        fresh_redis.start()
        back = client.get("/health/store")
    print(
        f"health with redis killed: {down.status_code} in {took * 1000:.0f} ms: "
        f"{down.json()['reason']}"
    )
    assert down.status_code == 503
    body = down.json()
    assert body["status"] == "unavailable" and "unreachable" in body["reason"]
    assert took < zeal_asgi.health.PING_TIMEOUT + 0.5
    assert metrics['zeal_up{backend="redis"}'] == 0
    assert back.status_code == 200


@pytest.mark.redis
def test_health_503_while_the_breaker_is_open(fresh_redis: RedisServer) -> None:
    conn = {
        "url": fresh_redis.url,
        "prefix": f"b{uuid.uuid4().hex[:6]}",
        "on_error": "fallback_table",
        "breaker": {"failure_threshold": 2, "open_seconds": 60, "name": uuid.uuid4().hex[:12]},
    }
    store = Store("redis", conn)
    name = f"t_{uuid.uuid4().hex[:6]}"
    store.make(name, 16, {"v": (Store.TYPE_INT, 8)})
    zeal = Zeal(store=store)
    try:
        with TestClient(_app(zeal)) as client:
            assert client.get("/health/store").json()["breaker"]["state"] == "closed"
            fresh_redis.kill()

            async def fail_reads() -> None:
                for _ in range(3):
                    await store.get(name, "k")  # served by the fallback once open

            client.portal.call(fail_reads)  # type: ignore[union-attr]
            resp = client.get("/health/store")
            metrics = parse_prometheus(client.get("/health/store/metrics").text)
    finally:
        store.backend.close_shared()
    body = resp.json()
    print(f"health with the breaker open: {resp.status_code}: {body['reason']}")
    assert resp.status_code == 503
    assert body["breaker"]["state"] == "open" and "breaker open" in body["reason"]
    assert body["host"]["zeal_breaker_opened_total"] >= 1
    assert metrics['zeal_breaker_state{state="open"}'] == 1
    assert metrics['zeal_breaker_state{state="closed"}'] == 0


@pytest.mark.redis
def test_health_503_when_the_streams_consumer_gave_up(fresh_redis: RedisServer) -> None:
    """A worker whose Streams consumer gave up (``max_attempts``) reads nothing any more: its
    ``/health/store`` answers 503 even once the backend answers pings again."""
    env = {"ZEAL_STORE_BACKEND": "redis", "ZEAL_REDIS_URL": fresh_redis.url}
    app = "tests.messaging.apps.streams_health_app:app"
    with AppServer(app, server="uvicorn", env=env, ready="/health/ready") as srv:
        status, up = srv.fetch("/health/store")
        assert status == 200, up
        assert up["streams_state"] == "running" and up["reason"] is None
        fresh_redis.kill()
        deadline = time.monotonic() + 30
        while srv.fetch("/health/store")[1]["streams_state"] != "failed":
            assert time.monotonic() < deadline, srv.log_text()
            time.sleep(0.1)
        fresh_redis.start()
        assert srv.fetch("/health/ready")[0] == 200  # the backend answers again
        status, down = srv.fetch("/health/store")
        metrics = parse_prometheus(srv.fetch("/health/store/metrics")[1])
    print(f"health with the Streams consumer given up: {status}: {down['reason']}")
    assert status == 503
    assert down["status"] == "unavailable" and down["streams_state"] == "failed"
    assert "Streams consumer gave up" in down["reason"]
    assert metrics['zeal_up{backend="redis"}'] == 0


def _die_mid_write(table: Table) -> None:
    # Compiled-in crash point: SIGKILL after the first column of an update, lock held.
    _shmtable._set_crashpoint(CP_UPDATE_MID, 1, int(signal.SIGKILL))
    table.set("hot", {"a": 2, "b": 2})


def test_health_reports_a_real_lock_recovery(table_zeal: Zeal) -> None:
    """A worker SIGKILLed in the middle of a write: the next writer recovers the lock, and the
    recovery (and the torn row it removed) shows in /health/store and in the metrics."""
    crashpoints.require()
    store = table_zeal.store
    name = f"r_{uuid.uuid4().hex[:8]}"
    store.make(name, 16, {"a": (Store.TYPE_INT, 8), "b": (Store.TYPE_INT, 8)})
    table = store.table(name)
    table.set("hot", {"a": 1, "b": 1})
    child = mp.get_context("fork").Process(target=_die_mid_write, args=(table,))
    child.start()
    child.join(10)
    assert child.exitcode == -signal.SIGKILL
    table.set("hot", {"a": 3, "b": 3})  # takes over the dead writer's lock
    assert table.get("hot") == {"a": 3, "b": 3}
    with TestClient(_app(table_zeal)) as client:
        body = client.get("/health/store").json()
        samples = parse_prometheus(client.get("/health/store/metrics").text)
    t = body["tables"][name]
    print(
        f"after a SIGKILL mid-write: lock_recoveries={t['lock_recoveries_total']}, "
        f"rows_lost={t['rows_lost_total']}"
    )
    assert t["lock_recoveries_total"] == 1 and body["lock_recoveries_total"] >= 1
    assert t["rows_lost_total"] == 1
    assert samples[f'zeal_table_lock_recoveries_total{{table="{name}"}}'] == 1


@pytest.mark.redis
def test_health_on_the_tiered_backend_shows_the_l1_tables(redis_url: str) -> None:
    store = Store("tiered", {"url": redis_url, "prefix": f"t{uuid.uuid4().hex[:6]}"})
    name = f"l1_{uuid.uuid4().hex[:6]}"
    store.make(name, 32, {"v": (Store.TYPE_INT, 8)})
    zeal = Zeal(store=store)
    try:
        with TestClient(_app(zeal)) as client:

            async def write_and_read() -> None:
                await store.set(name, "k", {"v": 7})
                assert await store.get(name, "k") == {"v": 7}

            client.portal.call(write_and_read)  # type: ignore[union-attr]
            resp = client.get("/health/store")
    finally:
        store.backend.close_shared()
    body = resp.json()
    assert resp.status_code == 200 and body["backend"] == "tiered"
    assert body["tables"][name]["capacity"] == 32 and body["tables"][name]["rows"] == 1
    assert body["pool"]["pool_size"] >= 1


@pytest.mark.memcached
def test_health_on_the_memcached_backend(memcached_server: Memcached) -> None:
    store = Store("memcached", {"servers": memcached_server.url, "prefix": "h"})
    with TestClient(_app(Zeal(store=store))) as client:
        resp = client.get("/health/store")
    body = resp.json()
    assert resp.status_code == 200 and body["backend"] == "memcached", body
    assert body["pool"]["pool_size"] >= 1


COUNTER = re.compile(r"^zeal_[a-z0-9]+_[a-z0-9_]+_total$")
GAUGE = re.compile(r"^zeal_[a-z0-9_]+$")


def check_metric_names(text: str, body: dict[str, Any]) -> set[str]:
    """Every sample of ``text`` parses with prometheus_client and follows the naming rule; every
    counter of the JSON ``body`` is a metric of the same name.  Returns the counter names."""
    counters: set[str] = set()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if family.type == "counter":
                assert COUNTER.match(sample.name), f"counter {sample.name!r} breaks the rule"
                counters.add(sample.name)
            else:
                assert family.type == "gauge", family
                assert GAUGE.match(sample.name) and not sample.name.endswith("_total"), sample
    for section in (body["host"], body["worker"]):
        assert set(section) <= counters, set(section) - counters
    names = {s.name for f in text_string_to_metric_families(text) for s in f.samples}
    assert {f"zeal_table_{field}" for t in body["tables"].values() for field in t} <= names
    return counters


def test_every_metric_name_follows_the_rule(example_server_redis: AppServer) -> None:
    """Counters of every area (redis, cache, pub/sub, health) on a busy redis-backed server."""
    for path in ("/demo/counter/increment", "/demo/store-roundtrip", "/demo/cache"):
        assert example_server_redis.fetch(path)[0] == 200
    assert example_server_redis.fetch("/demo/pubsub/publish?channel=demo:pubsub&msg=x")[0] == 200
    status, body = example_server_redis.fetch("/health/store")
    assert status == 200
    status, text = example_server_redis.fetch("/health/store/metrics")
    assert status == 200
    counters = check_metric_names(text, body)
    print(f"{len(counters)} counters: {sorted(counters)}")
    areas = {name.split("_")[1] for name in counters}
    assert {"redis", "health", "pubsub", "cache"} <= areas, areas


def test_metric_name_maps_every_style_to_one() -> None:
    assert metric_name("cache.hits") == "zeal_cache_hits_total"
    assert metric_name("pubsub_received") == "zeal_pubsub_received_total"
    assert metric_name("breaker_opened_total") == "zeal_breaker_opened_total"
    assert metric_name("zeal_health_checks_total") == "zeal_health_checks_total"


@pytest.mark.redis
def test_live_never_asks_the_backend_and_ready_does(fresh_redis: RedisServer) -> None:
    store = Store("redis", {"url": fresh_redis.url, "prefix": f"l{uuid.uuid4().hex[:6]}"})
    zeal = Zeal(store=store)
    app = Starlette(routes=starlette_routes())
    app.add_middleware(ZealMiddleware, zeal=zeal)
    with TestClient(_app(zeal)) as client, TestClient(app) as plain:
        for c in (client, plain):
            assert c.get("/health/ready").json() == {
                "status": "ok",
                "pid": os.getpid(),
                "backend": "redis",
            }
        fresh_redis.kill()
        for c in (client, plain):
            live = c.get("/health/live")
            assert live.status_code == 200 and live.json() == {"status": "ok", "pid": os.getpid()}
            ready = c.get("/health/ready")
            assert ready.status_code == 503, ready.text
            assert ready.json()["status"] == "unavailable"
            assert "unreachable" in ready.json()["reason"]
        fresh_redis.start()
        assert client.get("/health/ready").status_code == 200


def test_live_and_ready_are_in_the_openapi_schema(table_zeal: Zeal) -> None:
    with TestClient(_app(table_zeal)) as client:
        spec = client.get("/openapi.json").json()
    ready = spec["paths"]["/health/ready"]["get"]["responses"]
    assert set(ready) >= {"200", "503"}
    live = spec["paths"]["/health/live"]["get"]["responses"]
    assert live["200"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ProbeHealth"
    }
