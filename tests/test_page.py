"""The chat page in a real browser: Debian's chromium driven by Playwright (its sync API: the
async one is asyncio's, and these tests are not trio's), against ``tokenrelay serve`` as a
subprocess on 127.0.0.1 with the demo model.

Every page is watched: a console error, an uncaught exception, a Content-Security-Policy
violation or a request to any other origin fails the test that caused it. Waits are on
conditions (Playwright's ``expect`` and locators), never fixed sleeps. (``wait_for_function``
cannot be used: it evaluates a string in the page, which the page's CSP forbids.)
"""

from __future__ import annotations

import contextlib
import re
import socket
import struct
import threading
import uuid
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import unquote

import httpx2
import pytest
from playwright.sync_api import (
    Browser,
    BrowserContext,
    ConsoleMessage,
    Locator,
    Page,
    Playwright,
    Request,
    Response,
    Route,
    expect,
    sync_playwright,
)

from _server_helpers import ServeProcess, replayed_text, serve_process

CHROMIUM = Path("/usr/bin/chromium")


@pytest.fixture(autouse=True)
def _chromium_is_there() -> None:
    """A browser test never passes by not running: without chromium it fails, saying why."""
    if not CHROMIUM.exists():
        pytest.fail("needs Debian's chromium: apt-get install -y chromium (.ci/run does)")


ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: Slow enough to stop, supersede and reload mid-answer; fast enough for short answers.
DEMO = ["--demo-prefill", "0.05", "--demo-token-delay", "0.04"]
WAIT = 15_000  # ms: the bound on every wait for the page
expect.set_options(timeout=WAIT)
DESKTOP = {"width": 1280, "height": 800}
PHONE = {"width": 390, "height": 844}
WORDS = re.compile(r"^(\S+\s+){8}")  # at least 8 words of the answer are shown
MORE_WORDS = re.compile(r"^(\S+\s+){24}")


# ------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    with sync_playwright() as driver:
        yield driver


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(
        executable_path=str(CHROMIUM), headless=True, args=ARGS, timeout=30_000
    )
    yield browser
    browser.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    db = tmp_path_factory.mktemp("page") / "relay.db"
    with serve_process(*DEMO, db=db) as served:
        yield served


class Watched:
    """What a browser context did that it should not have: errors and foreign requests."""

    def __init__(self, origin: str) -> None:
        self.origin = origin
        self.problems: list[str] = []
        self.requests: list[Request] = []

    def attach(self, page: Page) -> Page:
        page.on("console", self._console)
        page.on("pageerror", lambda error: self.problems.append(f"page error: {error}"))
        page.on("request", self._request)
        page.on("response", self._response)
        page.set_default_timeout(WAIT)
        return page

    def _console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and "Failed to load resource" not in message.text:
            self.problems.append(f"console error: {message.text}")

    def _response(self, response: Response) -> None:
        path = response.url.removeprefix(self.origin)
        if response.status >= 400 and not path.startswith("/v1/"):  # the page's own files
            self.problems.append(f"{response.status} for {response.url}")

    def _request(self, request: Request) -> None:
        self.requests.append(request)
        if not request.url.startswith(self.origin + "/"):
            self.problems.append(f"request to another origin: {request.url}")


@pytest.fixture
def context(browser: Browser, server: ServeProcess) -> Iterator[tuple[BrowserContext, Watched]]:
    context = browser.new_context(viewport=DESKTOP)
    watched = Watched(server.url)
    yield context, watched
    context.close()
    assert watched.problems == []


@pytest.fixture
def page(context: tuple[BrowserContext, Watched], server: ServeProcess) -> Page:
    browser_context, watched = context
    page = watched.attach(browser_context.new_page())
    page.goto(server.url + "/")
    return page


# ------------------------------------------------------------------------ helpers


def status(page: Page) -> Locator:
    return page.get_by_test_id("status")


def answers(page: Page) -> Locator:
    return page.get_by_test_id("assistant")


def message(page: Page, index: int) -> Locator:
    """The ``index``-th assistant message (its article: status, badge, reasoning)."""
    return page.locator("article.msg.assistant").nth(index)


def send(page: Page, text: str) -> None:
    page.get_by_test_id("prompt").fill(text)
    page.get_by_test_id("send").click()


def session_of(page: Page) -> str:
    found = re.fullmatch(r"#session=(.+)", page.evaluate("location.hash"))
    assert found, page.evaluate("location.hash")
    return unquote(found.group(1))


def wait_state(page: Page, state: str) -> None:
    """Wait until the status line is in ``state``. (A locator's wait_for follows the page as
    it changes; ``expect`` polls at growing intervals, up to a second apart.)"""
    page.locator(f'[data-testid="status"][data-state="{state}"]').wait_for()


def wait_done(page: Page) -> None:
    wait_state(page, "done")


def wait_text(page: Page, pattern: re.Pattern[str], index: int = 0) -> None:
    """Wait until the ``index``-th answer's text matches ``pattern``."""
    answers(page).nth(index).filter(has_text=pattern).wait_for()


def stop_from_elsewhere(server: ServeProcess, session: str, *pages: Page) -> None:
    """Stop a session's run through the API (as another client would); every page following
    it ends with it, marked stopped."""
    assert api(server, f"/v1/sessions/{session}/stop", "POST").json()["status"] == "stopped"
    for page in pages:
        wait_state(page, "stopped")
        expect(message(page, -1)).to_have_attribute("data-status", "stopped")


def api(server: ServeProcess, path: str, method: str = "GET", **kwargs: Any) -> httpx2.Response:
    return httpx2.request(method, server.url + path, timeout=10, **kwargs)


def png_is_not_blank(path: Path) -> bool:
    """Whether a PNG screenshot has real content: many distinct rows of pixels."""
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    at, idat, width = 8, b"", 0
    while at < len(data):
        (length,) = struct.unpack(">I", data[at : at + 4])
        kind, body = data[at + 4 : at + 8], data[at + 8 : at + 8 + length]
        if kind == b"IHDR":
            width = struct.unpack(">I", body[:4])[0]
        elif kind == b"IDAT":
            idat += body
        at += 12 + length
    raw = zlib.decompress(idat)
    stride = 1 + width * 4 if len(raw) % (1 + width * 4) == 0 else 1 + width * 3
    rows = {raw[i + 1 : i + stride] for i in range(0, len(raw), stride)}
    return len(rows) > 50 and len(set(raw)) > 20


# ------------------------------------------------------------------------ the page itself


def test_the_page_is_served_with_strict_headers_and_cached_assets(server: ServeProcess) -> None:
    page = api(server, "/")
    assert page.status_code == 200
    assert page.headers["content-type"] == "text/html; charset=utf-8"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["cache-control"] == "no-cache"
    csp = page.headers["content-security-policy"]
    for directive in (
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "connect-src 'self'",
        "require-trusted-types-for 'script'",
        "frame-ancestors 'none'",
    ):
        assert directive in csp
    assert "unsafe" not in csp
    assert "<script>" not in page.text
    assert " style=" not in page.text
    assert api(server, "/", headers={"If-None-Match": page.headers["etag"]}).status_code == 304
    assets = re.findall(r'(?:src|href)="(page/[0-9a-f]{16}/[a-z]+\.[a-z]+)"', page.text)
    assert {a.rsplit("/", 1)[1] for a in assets} == {"app.js", "style.css", "icon.svg"}
    for path in assets:
        asset = api(server, "/" + path)
        assert asset.status_code == 200
        assert asset.headers["cache-control"] == "public, max-age=31536000, immutable"
        assert asset.headers["x-content-type-options"] == "nosniff"
    script = api(server, "/" + assets[-1].rsplit("/", 1)[0] + "/app.js")
    assert script.headers["content-type"] == "text/javascript; charset=utf-8"
    assert "innerHTML" not in script.text
    assert "eval(" not in script.text
    old = api(server, "/page/0000000000000000/app.js")
    assert (old.status_code, old.headers["cache-control"]) == (200, "no-cache")
    assert api(server, "/page/0000000000000000/missing.js").status_code == 404


def test_type_and_see_the_answer_stream_in(page: Page, server: ServeProcess) -> None:
    send(page, "Hello from the page, write 40 words")
    expect(status(page)).to_have_attribute("data-state", re.compile("waiting|streaming"))
    wait_text(page, WORDS)
    streaming = re.compile(r"^Streaming · \d+ tokens? · [\d.]+ tokens/s$")
    status(page).filter(has_text=streaming).wait_for()
    wait_done(page)
    expect(status(page)).to_contain_text(re.compile(r"Done · \d+ tokens in [\d.]+ s"))
    session = session_of(page)
    text = answers(page).first.text_content()
    assert text == replayed_text(server.url, session)
    assert text.startswith('You said: "Hello from the page, write 40 words".')
    expect(page.get_by_test_id("session-list")).to_contain_text("Hello from the page")
    expect(page.locator("#model")).to_have_value("demo")


@pytest.mark.parametrize("how", ["button", "escape", "at_once"])
def test_stop_freezes_the_text_and_really_stops_the_run(
    page: Page, server: ServeProcess, how: str
) -> None:
    send(page, "Stop me halfway, write 300 words")
    if how == "button":
        wait_text(page, WORDS)
        page.get_by_test_id("stop").click()
    elif how == "escape":
        wait_text(page, WORDS)
        page.keyboard.press("Escape")
    else:  # before the run may even have started on the server
        page.keyboard.press("Escape")
    frozen = answers(page).first.text_content()
    expect(message(page, 0)).to_have_attribute("data-status", "stopped")
    expect(message(page, 0).locator(".badge")).to_have_text("stopped")
    wait_state(page, "stopped")
    # The server's word: POST /stop has returned, so the run has ended.
    expect(status(page)).to_contain_text(re.compile(r"Stopped · \d+ tokens? kept"))
    session = session_of(page)
    run = api(server, f"/v1/sessions/{session}").json()
    assert (run["status"], run["reason"]) == ("stopped", "stopped")
    assert answers(page).first.text_content() == frozen
    assert page.get_by_test_id("stop").is_disabled()
    stored = api(server, f"/v1/sessions/{session}/messages").json()["data"][1]
    assert (stored["status"], stored["reason"]) == ("stopped", "stopped")
    assert stored["content"].startswith(frozen)
    assert len(frozen.split()) < 300


def test_a_stop_that_overtakes_its_run_is_sent_again(page: Page, server: ServeProcess) -> None:
    # The chat request is held in the browser until the Stop has been answered: the server
    # had no run to stop then (404). The page stops the run once it has started.
    held: list[Route] = []
    page.route("**/v1/chat/completions", lambda route: held.append(route))
    send(page, "Too late to start, write 300 words")
    with page.expect_response(lambda response: response.url.endswith("/stop")) as first:
        page.keyboard.press("Escape")
    assert first.value.status == 404
    assert len(held) == 1
    with page.expect_response(lambda response: response.url.endswith("/stop")) as second:
        held[0].continue_()
    assert second.value.json()["stopped"] is True
    expect(status(page)).to_have_text("Stopped · 0 tokens kept")
    run = api(server, f"/v1/sessions/{session_of(page)}").json()
    assert (run["status"], run["reason"]) == ("stopped", "stopped")
    expect(answers(page).first).to_have_text("")


def test_sending_mid_answer_supersedes_it(page: Page, server: ServeProcess) -> None:
    send(page, "A long first answer, write 300 words")
    wait_text(page, WORDS)
    send(page, "No, a short one, write 12 words")
    expect(message(page, 0)).to_have_attribute("data-status", "superseded")
    old = answers(page).first.text_content()
    expect(message(page, 0).locator(".badge")).to_have_text("superseded")
    wait_done(page)
    assert answers(page).first.text_content() == old  # nothing of the old run came after
    session = session_of(page)
    assert answers(page).nth(1).text_content() == replayed_text(server.url, session)
    stored = api(server, f"/v1/sessions/{session}/messages").json()["data"]
    assert [(m["status"], m["reason"]) for m in stored[1::2]] == [
        ("stopped", "superseded"),
        ("done", None),
    ]
    assert stored[1]["content"].startswith(old)


def test_reload_mid_answer_resumes_it_exactly_once(
    page: Page, context: tuple[BrowserContext, Watched], server: ServeProcess
) -> None:
    send(page, "Reload me, write 300 words")
    wait_text(page, WORDS)
    session = session_of(page)
    page.reload()
    assert session_of(page) == session
    expect(page.locator("article.msg.user")).to_have_count(1)
    expect(answers(page)).to_have_count(1)
    wait_state(page, "streaming")
    wait_text(page, MORE_WORDS)  # replayed, then live
    stop_from_elsewhere(server, session, page)
    text = answers(page).first.text_content()
    assert text == replayed_text(server.url, session)
    assert text.count("You said") == 1
    requests = context[1].requests
    resumes = [r for r in requests if r.url.endswith(f"/v1/sessions/{session}/stream")]
    assert len(resumes) == 1
    # The stored answer was shown whole through its last_seq, and the stream resumed after
    # it: nothing shown twice, nothing missed (the text above is the replay's, exactly).
    assert int(resumes[0].headers["last-event-id"]) >= 8


def test_a_second_tab_shows_the_same_text(
    context: tuple[BrowserContext, Watched], server: ServeProcess
) -> None:
    browser_context, watched = context
    first = watched.attach(browser_context.new_page())
    first.goto(server.url + "/")
    send(first, "Two tabs, write 300 words")
    wait_text(first, WORDS)
    second = watched.attach(browser_context.new_page())
    second.goto(first.url)
    wait_state(second, "streaming")
    wait_text(second, MORE_WORDS)
    stop_from_elsewhere(server, session_of(first), first, second)
    text = answers(first).first.text_content()
    assert answers(second).first.text_content() == text
    assert text == replayed_text(server.url, session_of(first))
    expect(second.locator("article.msg.user")).to_have_text("Two tabs, write 300 words")
    expect(second.get_by_test_id("session-list")).to_contain_text("Two tabs")


def test_model_output_is_text_never_html(page: Page) -> None:
    html = '<img src=x onerror="window.pwned=1"> <script>window.pwned=2</script>'
    send(page, html + " **bold** 9 words")
    wait_done(page)
    text = answers(page).first.text_content()
    assert html in text
    assert page.evaluate("window.pwned") is None
    assert page.locator(".msg img, .msg script").count() == 0
    expect(answers(page).first.locator("strong")).to_have_text("bold")


MARKDOWN_CASES = [
    "# Title\n\nSome **bold**, *em*, `code` and ~~gone~~.\n- one\n- two\n  - nested\n1. first",
    "```python\nprint('<b>hi</b>')\n```\nafter the fence",
    "> a quote with [a link](https://example.com/x) and https://example.org/y.",
    "[bad](javascript:alert(1)) [worse](data:text/html,<script>alert(1)</script>)",
    '<script>alert(1)</script><img src=x onerror=alert(1)><a href="javascript:x">y</a>',
    "unclosed **bold and `code and ```fence\nstill text\n---\n***\n",
    "\r\n\n  \n\tindented\n__strong__ snake_case_name 2*3*4",
    "```\n```\n~~~~\n``` not a close\n~~~~\n```js\nlast line\n",
    "",
]


def test_the_markdown_renderer_keeps_text_exact_and_builds_no_html(page: Page) -> None:
    results = page.evaluate(
        """async (cases) => {
            const src = document.querySelector('script[type=module]').src;
            const { renderMarkdown } = await import(new URL('markdown.js', src));
            return cases.map((text) => {
                const target = document.createElement('div');
                renderMarkdown(text, target);
                const tags = [...target.querySelectorAll('*')].map((e) => e.localName);
                const links = [...target.querySelectorAll('a')].map((a) => a.href);
                const attributes = [...target.querySelectorAll('*')].flatMap((e) =>
                    [...e.attributes].map((a) => a.name));
                return { text: target.textContent, tags, links, attributes };
            });
        }""",
        MARKDOWN_CASES,
    )
    allowed = {"div", "span", "strong", "em", "del", "code", "pre", "a"}
    for case, result in zip(MARKDOWN_CASES, results, strict=True):
        assert result["text"] == case
        assert set(result["tags"]) <= allowed, result["tags"]
        assert all(link.startswith(("https://", "http://")) for link in result["links"])
        assert set(result["attributes"]) <= {"class", "data-depth", "data-lang", "href", "rel"} | {
            "target"
        }
    assert results[0]["tags"].count("strong") == 1
    # And for any text at all: many random strings of markdown's own characters.
    mismatches = page.evaluate(
        """async () => {
            const src = document.querySelector('script[type=module]').src;
            const { renderMarkdown } = await import(new URL('markdown.js', src));
            const alphabet = ['*', '_', '`', '~', '#', '-', '+', '>', '[', ']', '(', ')',
                '1.', ' ', '  ', '\\n', '\\r', '\\t', 'a', 'b c', 'http://x.y/z', '<b>', '&amp;'];
            let seed = 42;
            const next = () => (seed = (seed * 1103515245 + 12345) % 2147483648) / 2147483648;
            const bad = [];
            for (let i = 0; i < 400; i++) {
                let text = '';
                const length = Math.floor(next() * 40);
                for (let j = 0; j < length; j++) {
                    text += alphabet[Math.floor(next() * alphabet.length)];
                }
                const target = document.createElement('div');
                renderMarkdown(text, target);
                if (target.textContent !== text || target.querySelector('b, script, img')) {
                    bad.push(text);
                }
            }
            return bad;
        }"""
    )
    assert mismatches == []
    assert results[2]["links"] == ["https://example.com/x", "https://example.org/y"]
    assert results[3]["links"] == []


def test_reasoning_is_collapsed_above_the_answer_and_tool_calls_are_cards(
    page: Page, server: ServeProcess
) -> None:
    send(page, "Please think first, write 12 words")
    wait_done(page)
    reasoning = message(page, 0).locator("details.reasoning")
    expect(reasoning).to_be_visible()
    expect(reasoning).not_to_have_attribute("open", "")
    expect(reasoning.locator("summary")).to_have_text(re.compile(r"Reasoning · \d+ words"))
    assert not answers(page).first.text_content().startswith("The user asks")
    # A tool call, made through the API, shows on the page as a card.
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {"type": "object", "properties": {"city": {"type": "string"}}},
        },
    }
    body = {
        "messages": [{"role": "user", "content": 'Call get_weather for "Paris"'}],
        "tools": [tool],
        "stream": False,
    }
    done = api(server, "/v1/chat/completions", "POST", json=body, headers={"X-Session-Id": "tool"})
    assert done.status_code == 200
    page.goto(server.url + "/#session=tool")
    card = page.locator(".tool-card")
    expect(card.locator(".tool-name")).to_have_text("get_weather")
    expect(card.locator(".tool-args")).to_contain_text('"city": "Paris"')


def test_sessions_list_new_chat_and_delete(page: Page, server: ServeProcess) -> None:
    send(page, "First chat of the list, write 5 words")
    wait_done(page)
    first = session_of(page)
    page.get_by_test_id("new-chat").click()
    assert page.evaluate("location.hash") == ""
    expect(answers(page)).to_have_count(0)
    expect(page.locator("#empty")).to_be_visible()
    send(page, "Second chat of the list, write 5 words")
    wait_done(page)
    second = session_of(page)
    assert second != first
    items = page.get_by_test_id("session-list").locator("li.session")
    expect(items.first).to_contain_text("Second chat of the list")  # newest first
    expect(items.nth(1)).to_contain_text("First chat of the list")
    expect(items.first).to_have_class(re.compile("active"))
    items.nth(1).locator("button.open").click()
    expect(page.locator("article.msg.user")).to_have_text(["First chat of the list, write 5 words"])
    assert session_of(page) == first
    # Delete asks first: cancelling keeps it.
    items.nth(1).locator("button.delete").click()
    expect(page.locator("#dialog")).to_be_visible()
    page.locator("#dialog-cancel").click()
    expect(items.nth(1)).to_contain_text("First chat of the list")
    items.nth(1).locator("button.delete").click()
    page.locator("#dialog-ok").click()
    expect(page.get_by_test_id("session-list")).not_to_contain_text("First chat of the list")
    expect(page.locator("article.msg")).to_have_count(0)  # it was the open chat
    assert api(server, f"/v1/sessions/{first}/messages").status_code == 404
    assert api(server, f"/v1/sessions/{second}/messages").status_code == 200


def test_screenshots_at_desktop_and_phone_width(page: Page, tmp_path: Path) -> None:
    send(page, "Write 12 words about **relays**")
    wait_done(page)
    for name, size in (("desktop", DESKTOP), ("phone", PHONE)):
        page.set_viewport_size(size)
        shot = tmp_path / f"{name}.png"
        page.screenshot(path=str(shot))
        assert png_is_not_blank(shot), name
        assert page.evaluate("document.documentElement.scrollWidth <= innerWidth"), name
        assert page.evaluate("document.body.scrollWidth <= innerWidth"), name
    # At phone width the sidebar is tucked away behind the menu button.
    expect(page.get_by_test_id("session-list")).not_to_be_visible()
    page.locator("#menu").click()
    expect(page.get_by_test_id("session-list")).to_be_visible()
    expect(page.get_by_test_id("new-chat")).to_be_in_viewport()
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    page.keyboard.press("Escape")
    expect(page.get_by_test_id("session-list")).not_to_be_visible()
    # Long unbroken words, links and code lines scroll inside their block, not the page.
    long = "x" * 300
    markdown = f"{long}\n\n```\n{long}\n```\n\nhttps://example.com/{long}\n\n`{long}`"
    page.evaluate(
        """async (text) => {
            const src = document.querySelector('script[type=module]').src;
            const { renderMarkdown } = await import(new URL('markdown.js', src));
            renderMarkdown(text, document.querySelector('[data-testid=assistant]'));
        }""",
        markdown,
    )
    assert page.evaluate("document.documentElement.scrollWidth <= innerWidth")
    assert page.evaluate("document.querySelector('.transcript').scrollWidth <= innerWidth")


# ------------------------------------------------------------------------ own servers


def test_history_survives_a_server_restart(browser: Browser, tmp_path: Path) -> None:
    db = tmp_path / "relay.db"
    with serve_process(*DEMO, db=db) as first:
        context = browser.new_context(viewport=DESKTOP)
        watched = Watched(first.url)
        page = watched.attach(context.new_page())
        page.goto(first.url + "/")
        send(page, "Remember me, write 10 words")
        wait_done(page)
        session = session_of(page)
        text = answers(page).first.text_content()
        context.close()
        assert watched.problems == []
    with serve_process(*DEMO, db=db) as second:
        context = browser.new_context(viewport=DESKTOP)
        watched = Watched(second.url)
        page = watched.attach(context.new_page())
        page.goto(f"{second.url}/#session={session}")
        expect(page.locator("article.msg.user")).to_have_text(["Remember me, write 10 words"])
        expect(answers(page)).to_have_text([text])
        expect(page.get_by_test_id("session-list")).to_contain_text("Remember me")
        wait_state(page, "idle")
        context.close()
        assert watched.problems == []


def test_an_api_key_is_asked_for_once_and_again_on_401(browser: Browser, tmp_path: Path) -> None:
    key = {"TOKENRELAY_API_KEY": "sesame"}
    with serve_process(*DEMO, db=tmp_path / "relay.db", env=key) as served:
        assert api(served, "/").status_code == 200  # the page itself needs no key
        assert api(served, "/v1/sessions").status_code == 401
        context = browser.new_context(viewport=DESKTOP)
        watched = Watched(served.url)
        page = watched.attach(context.new_page())
        page.goto(served.url + "/")
        dialog = page.locator("#dialog")
        expect(dialog).to_be_visible()
        page.locator("#dialog-input").fill("wrong")
        page.locator("#dialog-ok").click()
        expect(page.locator("#dialog-text")).to_contain_text("refused")
        page.locator("#dialog-input").fill("sesame")
        page.locator("#dialog-ok").click()
        expect(dialog).not_to_be_visible()
        send(page, "With a key, write 8 words")
        wait_done(page)
        headers = {"Authorization": "Bearer sesame"}
        assert answers(page).first.text_content() == replayed_text(
            served.url, session_of(page), headers
        )
        assert page.evaluate("localStorage.getItem('tokenrelay.apiKey')") == "sesame"
        page.reload()
        expect(answers(page)).to_have_count(1)
        expect(dialog).not_to_be_visible()  # kept: not asked again
        context.close()
        # 401s are expected here: the browser logs each as a failed resource load.
        assert watched.problems == []


def test_errors_show_the_servers_message(browser: Browser) -> None:
    slow = ["--demo-prefill", "0.8", "--demo-token-delay", "0.05", "--token-timeout", "0.02"]
    with serve_process(*slow) as served:
        context = browser.new_context(viewport=DESKTOP)
        watched = Watched(served.url)
        page = watched.attach(context.new_page())
        page.goto(served.url + "/")
        send(page, "Time me out")
        expect(status(page)).to_have_text(re.compile(r"Waiting for the first token… \d+\.\d s"))
        # The demo's second word comes too late: the error comes in the stream.
        wait_state(page, "error")
        expect(status(page)).to_have_text(
            "Error: no next token after 0.02 s (token_timeout); 1 token(s) had arrived"
        )
        expect(message(page, 0)).to_have_attribute("data-status", "error")
        expect(message(page, 0).locator(".badge")).to_have_text("error")
        expect(answers(page).first).to_have_text("You")
        # Refused before any stream: the error response's message.
        page.get_by_test_id("prompt").fill("x" * (1 << 20))
        page.get_by_test_id("send").click()
        expect(status(page)).to_have_text("Error: the request body is over the 1048576 byte limit")
        expect(message(page, 1)).to_have_attribute("data-status", "error")
        context.close()
        assert watched.problems == []  # the 413 is logged as a failed load only


class CuttableProxy:
    """A TCP proxy in front of the server whose connections can all be cut at once: a
    dropped connection, as the browser sees one."""

    def __init__(self, port: int) -> None:
        self.target = ("127.0.0.1", port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.lock = threading.Lock()
        self.sockets: list[socket.socket] = []  # open now: what cut() cuts
        self.owned: list[socket.socket] = []  # ever opened: what close() closes
        self.threads: list[threading.Thread] = []
        self._spawn(self._accept)

    def _spawn(self, target: Any, *args: Any) -> None:
        thread = threading.Thread(target=target, args=args, daemon=True)
        self.threads.append(thread)
        thread.start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.target)
            with self.lock:
                self.sockets += [client, upstream]
                self.owned += [client, upstream]
            self._spawn(self._pump, client, upstream)
            self._spawn(self._pump, upstream, client)

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        for sock in (source, sink):
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def cut(self) -> None:
        with self.lock:
            cut, self.sockets = self.sockets, []
        for sock in cut:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accept() (Linux)
        self.listener.close()
        self.cut()
        for thread in self.threads:
            thread.join(5)
        with self.lock:
            for sock in self.owned:
                sock.close()
        for thread in self.threads:
            assert not thread.is_alive()


def test_a_dropped_connection_reconnects_by_itself(browser: Browser, server: ServeProcess) -> None:
    proxy = CuttableProxy(int(server.url.rsplit(":", 1)[1]))
    origin = f"http://127.0.0.1:{proxy.port}"
    context = browser.new_context(viewport=DESKTOP)
    try:
        watched = Watched(origin)
        page = watched.attach(context.new_page())
        page.goto(origin + "/")
        send(page, "Drop me, write 300 words")
        wait_text(page, WORDS)
        proxy.cut()
        wait_state(page, "reconnecting")
        expect(status(page)).to_contain_text(re.compile(r"reconnecting in \d+ s"))
        wait_state(page, "streaming")
        wait_text(page, MORE_WORDS)
        session = session_of(page)
        stop_from_elsewhere(server, session, page)
        text = answers(page).first.text_content()
        assert text == replayed_text(server.url, session)
        assert text.count("You said") == 1
        resumes = [r for r in watched.requests if r.url.endswith(f"/sessions/{session}/stream")]
        assert len(resumes) == 1
        assert int(resumes[0].headers["last-event-id"]) >= 8
    finally:
        context.close()
        proxy.close()
    assert watched.problems == []


def test_a_message_sent_while_the_history_loads_continues_it(
    context: tuple[BrowserContext, Watched], server: ServeProcess
) -> None:
    """Sent before the chat's stored messages are on screen, a message waits for them: it
    goes out with the history, and the thread shows each message once."""
    session = f"hist-{uuid.uuid4().hex[:8]}"
    api(
        server,
        "/v1/chat/completions",
        "POST",
        json={"messages": [{"role": "user", "content": "my name is Ada"}], "stream": False},
        headers={"X-Session-Id": session},
    )
    browser_context, watched = context
    page = watched.attach(browser_context.new_page())
    held: list[Route] = []
    page.route(f"**/v1/sessions/{session}/messages", lambda route: held.append(route))  # slow
    with page.expect_request(lambda request: request.url.endswith(f"/{session}/messages")):
        page.goto(f"{server.url}/#session={session}")
    while not held:  # Playwright hands the held request over as it processes its events
        page.wait_for_timeout(10)
    with page.expect_request("**/v1/chat/completions") as sent:
        send(page, "what is my name?")
        page.wait_for_timeout(200)  # time enough for a page that would not wait to send
        held[0].continue_()
    body = sent.value.post_data_json
    assert body["messages"][0]["content"] == "my name is Ada"
    assert body["messages"][-1] == {"role": "user", "content": "what is my name?"}
    wait_done(page)
    expect(page.locator("article.msg.user")).to_have_text(["my name is Ada", "what is my name?"])


def test_a_reload_of_an_answer_whose_start_is_no_longer_held_keeps_its_text(
    browser: Browser, tmp_path: Path
) -> None:
    """With --max-events, a long running answer's first events are gone: a fresh page shows
    the stored partial answer, never an empty one or an error, and follows it to its end."""
    with serve_process(
        "--max-events", "10", "--demo-prefill", "0.01", "--demo-token-delay", "0.05",
        db=tmp_path / "relay.db",
    ) as small:  # fmt: skip
        session = f"gap-{uuid.uuid4().hex[:8]}"
        with httpx2.stream(
            "POST",
            small.url + "/v1/chat/completions",
            json={"messages": [{"role": "user", "content": "write 60 words"}], "stream": True},
            headers={"X-Session-Id": session},
            timeout=10,
        ) as response:
            for line in response.iter_lines():
                if line.startswith("id: 20"):
                    break  # its first events are no longer held; it goes on
        context = browser.new_context(viewport=DESKTOP)
        watched = Watched(small.url)
        try:
            page = watched.attach(context.new_page())
            page.goto(f"{small.url}/#session={session}")
            answers(page).first.filter(has_text=re.compile(r"\S")).wait_for()
            expect(status(page)).not_to_have_attribute("data-state", "error")
            wait_done(page)
            final = httpx2.get(f"{small.url}/v1/sessions/{session}/messages", timeout=10)
            assert answers(page).first.text_content() == final.json()["data"][-1]["content"]
        finally:
            context.close()
        assert watched.problems == []
