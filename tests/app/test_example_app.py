"""The example app in-process (``TestClient``): every demo route, the pages, the OpenAPI schema."""

from __future__ import annotations

import re
from collections.abc import Iterator
from html.parser import HTMLParser

import pytest
from starlette.testclient import TestClient

from example_app.main import STATIC, app
from zeal_asgi import Store


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(app) as c:
        yield c


class _Buttons(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.endpoints: dict[str, str] = {}

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "button" and a.get("data-endpoint"):
            self.endpoints[str(a["data-testid"])] = str(a["data-endpoint"])


def page_buttons() -> dict[str, str]:
    """``{data-testid: endpoint}`` of every "Try it" button of the live page."""
    parser = _Buttons()
    parser.feed((STATIC / "index.html").read_text())
    return parser.endpoints


def test_store_set_get(client: TestClient) -> None:
    body = client.get("/demo/store/set-get").json()
    assert body["alice"] == {"name": "alice", "score": 100}
    assert body["total_rows"] >= 2 and isinstance(body["worker_pid"], int)


def test_store_incr_is_one_two_seven(client: TestClient) -> None:
    body = client.get("/demo/store/incr").json()
    assert (body["after_incr_1"], body["after_incr_2"], body["after_incr_5"]) == (1, 2, 7)


def test_store_roundtrip(client: TestClient) -> None:
    body = client.get("/demo/store-roundtrip").json()
    assert re.fullmatch(r"rt_[0-9a-f]{8}", body["key"])
    assert body["set"] == {"name": "roundtrip", "score": 42}
    assert body["incr"] == {"name": "roundtrip", "score": 50}
    assert body["existed"] is True and body["after_del"] is False
    assert body["backend"] == str(Store.default().kind)
    second = client.get("/demo/store-roundtrip").json()
    assert second["key"] != body["key"]


def test_counter_increments_by_one(client: TestClient) -> None:
    first = client.get("/demo/counter/increment").json()
    second = client.get("/demo/counter/increment").json()
    assert second["total_requests"] == first["total_requests"] + 1
    assert set(first) == {"total_requests", "pid"}


def test_pubsub_on_the_table_backend_is_a_clean_json_error(client: TestClient) -> None:
    if Store.default().kind != "table":
        pytest.skip("the default store is not the table backend in this process")
    for url in (
        "/demo/pubsub/publish?channel=demo:pubsub&msg=hi",
        "/demo/pubsub/publish-reliable?stream=demo:reliable&msg=hi",
    ):
        resp = client.get(url)
        body = resp.json()
        if body.get("ok") is True:
            continue  # same-host pub/sub is available on this build: covered by the server tests
        assert resp.status_code == 200
        assert body["ok"] is False and body["backend"] == "table"
        assert body["error_type"] == "UnsupportedOperationError"
        assert "redis" in body["error"]


def test_demo_inputs_are_validated(client: TestClient) -> None:
    assert client.get("/demo/pubsub/publish?channel=other:chan").status_code == 422
    assert client.get("/demo/pubsub/publish?msg=" + "x" * 201).status_code == 422
    assert client.get("/demo/pubsub/publish?msg=").status_code == 422


def test_openapi_declares_the_response_models(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    schemas = spec["components"]["schemas"]
    for model in ("CounterResult", "RoundtripResult", "PublishResult", "DemoError", "StoreHealth"):
        assert model in schemas, model
    ok = spec["paths"]["/demo/counter/increment"]["get"]["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/CounterResult"
    }


def test_pages_are_served(client: TestClient) -> None:
    index = client.get("/")
    assert index.status_code == 200 and "Try it" in index.text
    assert 'data-testid="btn-hit-workers"' in index.text
    assert 'data-testid="backend-badge"' in index.text
    chat = client.get("/pubsub")
    assert chat.status_code == 200 and 'data-testid="chat-log"' in chat.text
    assert 'data-testid="chat-reconnect"' in chat.text
    for asset in ("app.js", "chat.js", "style.css"):
        assert client.get(f"/static/{asset}").status_code == 200


def test_swagger_ui_is_served_from_the_apps_own_files(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    urls = re.findall(r"""(?:src|href|url)\s*[:=]\s*['"]([^'"]+)['"]""", page.text)
    assert "/openapi.json" in urls
    assert urls and not [u for u in urls if "//" in u], urls  # nothing from another host
    for url in urls:
        assert client.get(url).status_code == 200, url
    assert (STATIC / "swagger" / "LICENSE").is_file() and (STATIC / "swagger" / "NOTICE").is_file()
    assert client.get("/redoc").status_code == 404  # ReDoc would load from a CDN


def test_backend_badge_route(client: TestClient) -> None:
    body = client.get("/demo/backend").json()
    assert body["backend"] == str(Store.default().kind) and body["worker_pid"] > 0


def test_hit_route_closes_the_connection(client: TestClient) -> None:
    first = client.get("/demo/workers/hit")
    second = client.get("/demo/workers/hit")
    assert first.headers["connection"] == "close"
    assert second.json()["total_requests"] == first.json()["total_requests"] + 1


def test_every_button_points_at_a_route_of_the_app(client: TestClient) -> None:
    paths = set(client.get("/openapi.json").json()["paths"])
    buttons = page_buttons()
    assert len(buttons) >= 10
    for testid, endpoint in buttons.items():
        assert endpoint.split("?")[0] in paths, f"{testid} fires {endpoint}: no such route"
