"""Browser tests: Debian's headless Chromium, driven by Playwright, against the real 2-worker app.

Every "Try it" button of the live page is clicked and the JSON it shows is checked; two chat
tabs whose WebSockets landed on different workers see each other's messages.  Screenshots go to
``test-output/screenshots/``.  A missing Chromium skips locally and fails in CI (``CI=true``).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests._harness.apps import AppServer
from tests.app.conftest import SCREENSHOTS

pytestmark = pytest.mark.browser

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
CLICK_TIMEOUT_MS = 10_000

if os.environ.get("CI") == "true" and not (os.path.exists(CHROMIUM) or shutil.which("chromium")):
    pytest.fail(f"{CHROMIUM} not found (CI=true: a missing browser is a failure)", pytrace=False)
if not os.path.exists(CHROMIUM):
    pytest.skip(f"{CHROMIUM} not found; apt-get install chromium", allow_module_level=True)

from playwright.sync_api import Browser, Page, sync_playwright  # noqa: E402


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """One headless Chromium for the module (never downloaded: Debian's binary)."""
    with sync_playwright() as pw:
        b = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            yield b
        finally:
            b.close()


@pytest.fixture(scope="module")
def shots() -> Path:
    """``test-output/screenshots``."""
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    return SCREENSHOTS


def click(page: Page, testid: str) -> tuple[int, Any]:
    """Click a "Try it" button; wait for its answer; (HTTP status, JSON shown on the page)."""
    button = page.get_by_test_id(testid)
    endpoint = button.get_attribute("data-endpoint")
    # Reset first, so the wait below can only be satisfied by this click's answer.
    page.evaluate("document.getElementById('status').dataset.state = 'idle'")
    page.evaluate("document.getElementById('output').dataset.endpoint = ''")
    button.click()
    page.wait_for_function(
        """(endpoint) => {
            const s = document.getElementById('status');
            const o = document.getElementById('output');
            return (s.dataset.state === 'done' || s.dataset.state === 'error')
                && o.dataset.endpoint === endpoint;
        }""",
        arg=endpoint,
        timeout=CLICK_TIMEOUT_MS,
    )
    code = int(page.get_by_test_id("status").get_attribute("data-code") or 0)
    return code, json.loads(page.get_by_test_id("output").inner_text())


def test_every_try_it_button_shows_its_json(
    browser: Browser, example_server: AppServer, shots: Path
) -> None:
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    try:
        page.goto(example_server.url + "/")
        buttons = page.locator("button[data-endpoint]")
        testids = [buttons.nth(i).get_attribute("data-testid") for i in range(buttons.count())]
        assert len(testids) >= 10
        seen: dict[str, Any] = {}
        for testid in testids:
            assert testid is not None
            code, body = click(page, testid)
            page.screenshot(path=str(shots / f"live-{testid}.png"), full_page=True)
            seen[testid] = (code, body)
            check_button(testid, code, body)
        print(
            f"clicked {len(seen)} buttons: " + ", ".join(f"{t}={c}" for t, (c, _) in seen.items())
        )

        # The counter, clicked again and again, goes up by exactly one per click whichever
        # worker answers (connections are reused, so one click may land on either).
        totals = []
        for _ in range(5):
            code, body = click(page, "btn-counter")
            assert code == 200
            totals.append(body["total_requests"])
        assert totals == list(range(totals[0], totals[0] + 5))

        # Each publish click rolls a fresh message.
        _, first = click(page, "btn-publish")
        _, second = click(page, "btn-publish")
        if first.get("ok"):
            assert first["msg"] != second["msg"]
    finally:
        context.close()


def check_button(testid: str, code: int, body: Any) -> None:
    """What each button must show."""
    assert isinstance(body, dict), (testid, body)
    if testid == "btn-store-set-get":
        assert code == 200 and body["alice"] == {"name": "alice", "score": 100}
    elif testid == "btn-store-incr":
        assert code == 200
        assert (body["after_incr_1"], body["after_incr_2"], body["after_incr_5"]) == (1, 2, 7)
    elif testid == "btn-store-roundtrip":
        assert code == 200 and body["existed"] is True and body["after_del"] is False
        assert body["incr"]["score"] == 50
    elif testid == "btn-counter":
        assert code == 200 and body["total_requests"] >= 1 and body["pid"] > 0
    elif testid in ("btn-publish", "btn-publish-reliable", "btn-pubsub-log"):
        assert code == 200
        if body["ok"] is False:  # the seed's clean JSON error on a backend without pub/sub
            assert body["error"] and body["error_type"]
        elif testid == "btn-publish":
            assert body["receivers"] >= 1 and body["msg"].count("-") == 1
        elif testid == "btn-publish-reliable":
            assert "-" in body["message_id"]
        else:
            assert body["count"] == len(body["log"])
    elif testid == "btn-health":
        assert code == 200 and body["status"] == "ok" and "tables" in body
    elif testid == "btn-cache":
        assert code == 200 and body["ok"] is True
    elif testid.startswith("btn-room-"):
        assert code == 200 and "ok" in body
    else:
        raise AssertionError(f"no expectation for button {testid}: {body}")


def _chat_tab(browser: Browser, server: AppServer, name: str) -> tuple[Any, Page, int]:
    context = browser.new_context(viewport={"width": 900, "height": 700})
    page = context.new_page()
    page.goto(f"{server.url}/pubsub?room=browser-test&name={name}")
    page.wait_for_function(
        "document.getElementById('chat-status').dataset.state === 'ready'",
        timeout=CLICK_TIMEOUT_MS,
    )
    pid = int(page.get_by_test_id("chat-worker").get_attribute("data-pid") or 0)
    return context, page, pid


def test_chat_message_crosses_workers(
    browser: Browser, example_server: AppServer, shots: Path
) -> None:
    """Open tabs until two sit on different workers; a message from one shows in the other."""
    tabs: list[tuple[Any, Page, int]] = []
    try:
        tabs.append(_chat_tab(browser, example_server, "tab-a"))
        deadline = time.monotonic() + 30
        other = None
        while other is None and time.monotonic() < deadline:
            tab = _chat_tab(browser, example_server, f"tab-{len(tabs)}")
            tabs.append(tab)
            if tab[2] != tabs[0][2]:
                other = tab
        assert other is not None, f"every tab landed on worker {tabs[0][2]}"
        (_, page_a, pid_a), (_, page_b, pid_b) = tabs[0], other
        text = f"hello from worker {pid_a} at {time.time():.3f}"
        page_a.get_by_test_id("chat-input").fill(text)
        page_a.get_by_test_id("chat-send").click()
        for page in (page_b, page_a):
            page.locator(f'li[data-text="{text}"]').wait_for(timeout=CLICK_TIMEOUT_MS)
        received = page_b.locator(f'li[data-text="{text}"]')
        assert received.get_attribute("data-sender") == "tab-a"
        # A server-side push to the room (an HTTP request on any worker) reaches both tabs.
        status, push = example_server.fetch(
            "/demo/rooms/push?room=browser-test&msg=from-the-server"
        )
        assert status == 200 and push["receivers"] == 2, push
        for page in (page_a, page_b):
            page.locator('li[data-text="from-the-server"]').wait_for(timeout=CLICK_TIMEOUT_MS)
        page_a.screenshot(path=str(shots / "chat-tab-a.png"), full_page=True)
        page_b.screenshot(path=str(shots / "chat-tab-b.png"), full_page=True)
        print(f"chat: tab A on worker {pid_a}, tab B on worker {pid_b}; message crossed")
        assert pid_a != pid_b
    finally:
        for context, _, _ in tabs:
            context.close()


def test_hit_every_worker_shows_the_pid_changing(
    browser: Browser, example_server: AppServer, shots: Path
) -> None:
    """The demo's point: one count, several workers. A browser keeps one connection, so the
    control's requests come back with ``Connection: close``; both pids must show."""
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    page = context.new_page()
    try:
        page.goto(example_server.url + "/")
        badge = page.get_by_test_id("backend-badge")
        page.wait_for_function("document.getElementById('backend-badge').dataset.backend")
        assert badge.get_attribute("data-backend") == "table"
        pids: set[str] = set()
        totals: list[int] = []
        for _ in range(5):  # ten requests per click; two workers show within a click or two
            page.evaluate("document.getElementById('hits-summary').dataset.state = 'idle'")
            page.get_by_test_id("btn-hit-workers").click()
            page.wait_for_function(
                "document.getElementById('hits-summary').dataset.state === 'done'",
                timeout=CLICK_TIMEOUT_MS,
            )
            items = page.locator("#hits-list li")
            for i in range(items.count()):
                pids.add(items.nth(i).get_attribute("data-pid") or "")
                totals.append(int(items.nth(i).get_attribute("data-total") or 0))
            if len(pids) >= 2:
                break
        page.screenshot(path=str(shots / "hit-every-worker.png"), full_page=True)
        assert len(pids) == 2, f"one worker answered every request: {pids}"
        assert totals == list(range(totals[0], totals[0] + len(totals)))
        print(f"hit every worker: pids {sorted(pids)}, count {totals[0]}..{totals[-1]}")
    finally:
        context.close()


def test_api_docs_render_with_the_network_closed(
    browser: Browser, example_server: AppServer, shots: Path
) -> None:
    """``/docs`` is Swagger UI from the app's own files: every request to another host is
    refused, and the page still renders every operation."""
    context = browser.new_context(viewport={"width": 1100, "height": 1000})
    outside: list[str] = []

    def only_the_app(route: Any) -> None:
        if route.request.url.startswith(example_server.url):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    context.route("**/*", only_the_app)
    page = context.new_page()
    try:
        page.goto(example_server.url + "/docs")
        page.locator(".swagger-ui .opblock").first.wait_for(timeout=CLICK_TIMEOUT_MS)
        operations = page.locator(".swagger-ui .opblock").count()
        page.screenshot(path=str(shots / "docs-offline.png"), full_page=False)
        assert operations >= 15, operations
        assert page.get_by_text("/demo/counter/increment").count() >= 1
        assert outside == []
    finally:
        context.close()


def test_chat_new_connection_lands_on_another_worker(
    browser: Browser, example_server: AppServer, shots: Path
) -> None:
    context, page, first = _chat_tab(browser, example_server, "mover")
    try:
        seen = {first}
        for _ in range(20):
            page.get_by_test_id("chat-reconnect").click()
            page.wait_for_function(
                "document.getElementById('chat-status').dataset.state === 'ready'",
                timeout=CLICK_TIMEOUT_MS,
            )
            seen.add(int(page.get_by_test_id("chat-worker").get_attribute("data-pid") or 0))
            if len(seen) == 2:
                break
        page.screenshot(path=str(shots / "chat-new-connection.png"), full_page=True)
        assert len(seen) == 2, f"every new connection landed on worker {first}"
        joined = page.get_by_test_id("chat-joined")
        assert joined.count() >= 2  # one line per connection, each naming its worker
    finally:
        context.close()
