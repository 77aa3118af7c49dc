"""The HTTP edge in-process: headers, 429 and 503 answers, exempt paths, WebSocket handshakes,
the FastAPI dependency and client_ip behind (un)trusted proxies."""

from __future__ import annotations

import json
import re
from collections.abc import MutableMapping
from typing import Any

import httpx
import pytest
from fastapi import Depends, FastAPI, WebSocket
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from tests.ratelimit.conftest import away_from_minute_end, unique
from zeal_asgi.errors import ConfigError
from zeal_asgi.ratelimit import ClientIP, RateLimiter, RateLimitMiddleware, client_ip
from zeal_asgi.store import Store
from zeal_asgi.store.backends.table import TableBackend

POLICY = re.compile(r'^"(?P<name>[^"]+)";q=(?P<q>\d+);w=(?P<w>\d+)$')
LIMIT = re.compile(r'^"(?P<name>[^"]+)";r=(?P<r>\d+);t=(?P<t>\d+)$')


@pytest.fixture
def store() -> Any:
    s = Store(backend=TableBackend(namespace=unique("rh")))
    yield s
    s.backend.close_all()  # type: ignore[attr-defined]


async def ok(request: Request) -> PlainTextResponse:
    return PlainTextResponse("ok")


def starlette_app(limiter: RateLimiter, **options: Any) -> Starlette:
    async def ws(websocket: Any) -> None:
        await websocket.accept()
        await websocket.send_text("hi")
        await websocket.close()

    app = Starlette(
        routes=[
            Route("/a", ok),
            Route("/health/store", ok),
            Route("/healthz", ok),
            WebSocketRoute("/ws", ws),
        ]
    )
    app.add_middleware(RateLimitMiddleware, limiter=limiter, **options)
    return app


async def test_every_limited_response_carries_the_draft_headers(store: Store) -> None:
    away_from_minute_end(5)
    limiter = RateLimiter("3/minute", name=unique(), store=store)
    app = starlette_app(limiter, key=client_ip)
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [await client.get("/a") for _ in range(5)]
    assert [a.status_code for a in answers] == [200, 200, 200, 429, 429]
    for a in answers:
        policy = POLICY.match(a.headers["ratelimit-policy"])
        assert policy and policy["name"] == limiter.name
        assert (policy["q"], policy["w"]) == ("3", "60")
        limit = LIMIT.match(a.headers["ratelimit"])
        assert limit and limit["name"] == limiter.name and 0 < int(limit["t"]) <= 60
        assert "x-ratelimit-limit" not in a.headers
    assert [LIMIT.match(a.headers["ratelimit"])["r"] for a in answers] == [  # type: ignore[index]
        "2",
        "1",
        "0",
        "0",
        "0",
    ]
    assert "retry-after" not in answers[0].headers
    refused = answers[3]
    assert re.fullmatch(r"[1-9]\d*", refused.headers["retry-after"])
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    body = refused.json()
    assert body["limit"] == 3 and body["window"] == 60 and body["limiter"] == limiter.name
    assert body["retry_after"] == int(refused.headers["retry-after"])
    assert refused.headers["content-type"] == "application/json"


async def test_x_ratelimit_headers_are_opt_in(store: Store) -> None:
    limiter = RateLimiter("3/hour", name=unique(), store=store, x_ratelimit_headers=True)
    transport = httpx.ASGITransport(app=starlette_app(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        a = await client.get("/a")
    assert a.headers["x-ratelimit-limit"] == "3"
    assert a.headers["x-ratelimit-remaining"] == "2"
    assert 0 < int(a.headers["x-ratelimit-reset"]) <= 3600


async def test_exempt_paths_are_never_limited(store: Store) -> None:
    limiter = RateLimiter("1/hour", name=unique(), store=store)
    app = starlette_app(limiter, exempt=("/health",))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        assert (await client.get("/a")).status_code == 200
        for _ in range(3):
            r = await client.get("/health/store")
            assert r.status_code == 200 and "ratelimit" not in r.headers
        assert (await client.get("/healthz")).status_code == 429  # not below /health
        assert (await client.get("/a")).status_code == 429


def test_bad_middleware_options_are_config_errors(store: Store) -> None:
    limiter = RateLimiter("1/hour", name=unique(), store=store)
    for options in ({"exempt": ("health",)}, {"cost": 2}, {"key": "ip"}):
        with pytest.raises(ConfigError):
            RateLimitMiddleware(starlette_app(limiter), limiter=limiter, **options)
    with pytest.raises(ConfigError):
        RateLimitMiddleware(starlette_app(limiter), limiter="1/hour")  # type: ignore[arg-type]


def test_websocket_handshakes_are_limited(store: Store) -> None:
    limiter = RateLimiter("2/hour", name=unique(), store=store)
    with TestClient(starlette_app(limiter)) as client:
        for _ in range(2):
            with client.websocket_connect("/ws") as ws:
                assert ws.receive_text() == "hi"
        # The test client speaks the websocket.http.response extension: the refusal is a 429.
        with pytest.raises(Exception) as info, client.websocket_connect("/ws"):
            pass
    denial = info.value
    assert getattr(denial, "status_code", None) == 429
    assert int(denial.headers["retry-after"]) >= 1  # type: ignore[attr-defined]
    assert LIMIT.match(denial.headers["ratelimit"])  # type: ignore[attr-defined]


async def test_websocket_refusal_without_the_extension_closes_with_1008(store: Store) -> None:
    limiter = RateLimiter("1/hour", name=unique(), store=store)
    mw = RateLimitMiddleware(starlette_app(limiter), limiter=limiter)
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        return {"type": "websocket.connect"}

    async def send(message: MutableMapping[str, Any]) -> None:
        sent.append(dict(message))

    scope = {"type": "websocket", "path": "/ws", "client": ("203.0.113.9", 1), "headers": []}
    await limiter.hit("203.0.113.9")
    await mw(scope, receive, send)
    assert sent == [{"type": "websocket.close", "code": 1008, "reason": "rate limited"}]


@pytest.mark.parametrize("policy", ["allow", "deny"])
async def test_backend_failure_answers_by_policy(
    store: Store, policy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    limiter = RateLimiter("5/hour", name=unique(), store=store, on_backend_error=policy, max_keys=1)
    await limiter.hit("someone else")  # the only row
    transport = httpx.ASGITransport(app=starlette_app(limiter))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        r = await client.get("/a")
    if policy == "allow":
        assert r.status_code == 200
    else:
        assert r.status_code == 503 and r.headers["retry-after"] == "1"
        assert "unavailable" in r.json()["detail"]


def fastapi_app(limiter: RateLimiter, key: Any = client_ip, cost: int = 1) -> FastAPI:
    app = FastAPI()
    dep = Depends(limiter.depends(key=key, cost=cost))

    @app.get("/search", dependencies=[dep])
    async def search(q: str = "") -> dict[str, str]:
        return {"q": q}

    @app.get("/result")
    async def result(r: Any = dep) -> dict[str, Any]:
        return {"remaining": r.remaining}

    @app.websocket("/ws")
    async def ws(websocket: WebSocket, r: Any = dep) -> None:
        await websocket.accept()
        await websocket.send_text(str(r.remaining))
        await websocket.close()

    return app


def test_fastapi_dependency(store: Store) -> None:
    away_from_minute_end(5)
    limiter = RateLimiter("2/minute", name=unique(), store=store)
    app = fastapi_app(limiter)
    with TestClient(app) as client:
        first = client.get("/search", params={"q": "x"})
        assert first.status_code == 200 and first.json() == {"q": "x"}
        assert LIMIT.match(first.headers["ratelimit"])
        assert first.headers["ratelimit-policy"] == f'"{limiter.name}";q=2;w=60'
        assert client.get("/result").json() == {"remaining": 0}
        refused = client.get("/search")
        assert refused.status_code == 429
        assert int(refused.headers["retry-after"]) >= 1
        assert "rate limit exceeded" in refused.json()["detail"]
        with pytest.raises(WebSocketDisconnect) as info, client.websocket_connect("/ws"):
            pass
        assert info.value.code == 1008
    openapi = app.openapi()["paths"]["/search"]["get"]
    assert [p["name"] for p in openapi.get("parameters", [])] == ["q"]  # no extra params


async def test_fastapi_dependency_behind_a_trusted_proxy_with_x_headers(store: Store) -> None:
    limiter = RateLimiter("3/hour", name=unique(), store=store, x_ratelimit_headers=True)
    app = fastapi_app(limiter, key=ClientIP(trusted_proxies=("10.0.0.0/8",)))
    transport = httpx.ASGITransport(app=app, client=("10.0.0.2", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        answers = [
            await client.get("/search", headers={"X-Forwarded-For": f"192.0.2.{i}"})
            for i in (1, 1, 2)
        ]
    # one key per forwarded client, not the proxy's
    assert [LIMIT.match(a.headers["ratelimit"])["r"] for a in answers] == ["2", "1", "2"]  # type: ignore[index]
    assert [a.headers["x-ratelimit-remaining"] for a in answers] == ["2", "1", "2"]
    assert {a.headers["x-ratelimit-limit"] for a in answers} == {"3"}
    assert all(a.headers["ratelimit-policy"] == f'"{limiter.name}";q=3;w=3600' for a in answers)


def test_fastapi_dependency_with_an_async_key_and_a_cost(store: Store) -> None:
    limiter = RateLimiter("5/hour", name=unique(), store=store)

    async def by_user(conn: Any) -> str:
        return str(conn.headers.get("x-user", "anon"))

    with TestClient(fastapi_app(limiter, key=by_user, cost=2)) as client:
        codes = [client.get("/search", headers={"x-user": "u1"}).status_code for _ in range(3)]
        assert codes == [200, 200, 429]
        assert client.get("/search", headers={"x-user": "u2"}).status_code == 200
    with pytest.raises(ConfigError):
        limiter.depends(key=by_user, cost=6)


def scope_of(peer: str, headers: dict[str, str]) -> dict[str, Any]:
    return {
        "type": "http",
        "client": (peer, 5000),
        "headers": [(k.lower().encode(), v.encode()) for k, v in headers.items()],
    }


def test_client_ip_ignores_headers_from_untrusted_peers() -> None:
    spoofed = {"X-Forwarded-For": "1.2.3.4", "Forwarded": "for=5.6.7.8"}
    assert client_ip.of_scope(scope_of("198.51.100.7", spoofed)) == "198.51.100.7"
    behind = ClientIP(trusted_proxies=("10.0.0.0/8",))
    assert behind.of_scope(scope_of("198.51.100.7", spoofed)) == "198.51.100.7"


def test_client_ip_behind_trusted_proxies() -> None:
    ip = ClientIP(trusted_proxies=("10.0.0.0/8", "2001:db8::1"))
    # The client may prepend anything: the rightmost untrusted hop is the one a proxy saw.
    xff = {"X-Forwarded-For": "6.6.6.6, 203.0.113.5, 10.1.1.1"}
    assert ip.of_scope(scope_of("10.0.0.2", xff)) == "203.0.113.5"
    fwd = {"Forwarded": 'for="[2001:db8::9]:4711", for=10.2.2.2'}
    assert ip.of_scope(scope_of("2001:db8::1", fwd)) == "2001:db8::9"
    fwd4 = {"Forwarded": "for=192.0.2.60:8080;proto=http"}
    assert ip.of_scope(scope_of("10.9.9.9", fwd4)) == "192.0.2.60"
    assert ip.of_scope(scope_of("10.0.0.2", {})) == "10.0.0.2"
    # A hop that is not an address counts as the proxy's: never a key the client wrote, never
    # one too long for the table (it made the request fail with a 500).
    junk = {"X-Forwarded-For": "1.2.3.4, " + "x" * 200 + ", 10.1.1.1"}
    assert ip.of_scope(scope_of("10.0.0.2", junk)) == "10.0.0.2"
    assert ip.of_scope(scope_of("10.0.0.2", {"Forwarded": "for=unknown"})) == "10.0.0.2"
    assert ip.of_scope(scope_of("10.0.0.2", {"X-Forwarded-For": "2001:DB8::7"})) == "2001:db8::7"
    with pytest.raises(ConfigError):
        ClientIP(trusted_proxies=("not an address",))


async def test_a_spoofed_header_from_an_untrusted_peer_changes_nothing(store: Store) -> None:
    limiter = RateLimiter("2/hour", name=unique(), store=store)
    app = starlette_app(limiter, key=ClientIP(trusted_proxies=("10.0.0.0/8",)))
    transport = httpx.ASGITransport(app=app, client=("198.51.100.7", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        codes = [
            (await client.get("/a", headers={"X-Forwarded-For": f"1.2.3.{i}"})).status_code
            for i in range(4)
        ]
    assert codes == [200, 200, 429, 429]  # one key, the peer's, whatever the header says


def test_json_bodies_are_json(store: Store) -> None:
    limiter = RateLimiter("1/hour", name=unique(), store=store)
    with TestClient(starlette_app(limiter)) as client:
        client.get("/a")
        r = client.get("/a")
    assert json.loads(r.content)["policy"] == limiter.name
