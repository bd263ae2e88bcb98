"""Hostile and careless input against the running server: every bad request gets its exact 4xx
with an OpenAI-shaped JSON error that says what was wrong, nothing is logged at ERROR (and no
traceback at all), and the server answers the next request, on a fresh connection and on the
same keep-alive connection. Real sockets, real time, each test bounded.

Every row here once showed a defect (a 500, a traceback, a hang, a wrong status) or guards
against one.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Mapping
from typing import Any

import httpx2
import pytest
import trio
import trio.testing

from _helpers import bounded
from _server_helpers import RawHTTP, Served, SSEReader, chat, seqs, start_served
from tokenrelay.testing import FakeModelServer, FakeScript

# -- what the server says -------------------------------------------------------------------

NOT_JSON = "the request body is not valid JSON"
NOT_UTF8 = "the request body is not valid UTF-8"
TOO_DEEP = "the request body is nested too deeply"
SURROGATE = (
    "the request body has a lone UTF-16 surrogate escape (such as \\ud800): "
    "JSON strings must be valid Unicode"
)
NOT_OBJECT = "the request body must be a JSON object"
MESSAGES = "'messages' must be a non-empty array of messages"
ROLES = "assistant, developer, system, tool, user"
CONTENT = "'messages[0].content' must be a string or an array of parts"
MAX_TOKENS = "'max_tokens' must be a positive integer"
STOP = "'stop' must be a string or an array of strings"
SEED = "'seed' must be an integer"
SESSION = "session ids are 1-128 characters of A-Z a-z 0-9 . _ : @ -"
NEEDS_KEY = "a valid API key is required: send 'Authorization: Bearer <key>'"
RESUME = "Last-Event-ID / starting_after must be the seq of the last event received"
NOT_FOUND = "The requested URL was not found on the server"
NOT_ALLOWED = "The method is not allowed for the requested URL"

#: The error ``type`` each status comes with.
TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
}

ANY = object()  #: an error ``code`` not checked (werkzeug's own errors have none)


def body_of(**fields: Any) -> bytes:
    """A valid non-streaming request, with ``fields`` added or replaced."""
    return json.dumps({**chat(stream=False), **fields}).encode()


def message_of(**fields: Any) -> bytes:
    """A request whose one message has ``fields`` added or replaced."""
    return json.dumps(
        {"messages": [{"role": "user", "content": "hi", **fields}], "stream": False}
    ).encode()


def without(name: str) -> bytes:
    """A request whose one message lacks ``name``."""
    message = {"role": "user", "content": "hi"}
    del message[name]
    return json.dumps({"messages": [message], "stream": False}).encode()


def raw_field(name: str, json_text: str) -> bytes:
    """A request with ``"name": json_text`` spliced in as written (NaN, 1e400, escapes...)."""
    return b'{"messages": [{"role": "user", "content": "hi"}], "stream": false, "%s": %s}' % (
        name.encode(),
        json_text.encode(),
    )


def content_text(json_text: str) -> bytes:
    """A request whose message content is the JSON string literal ``json_text``, as written."""
    return b'{"messages": [{"role": "user", "content": %s}], "stream": false}' % (
        json_text.encode(),
    )


def nested_part(depth: int) -> bytes:
    """A request whose content part carries arrays nested ``depth`` deep."""
    return (
        b'{"messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "x": '
        + b"[" * depth
        + b"]" * depth
        + b'}]}], "stream": false}'
    )


# -- checks shared by every row -------------------------------------------------------------


@pytest.fixture(autouse=True)
def _warnings_and_up(caplog: pytest.LogCaptureFixture) -> None:
    """Capture WARNING and up from every logger (tokenrelay, tokenrelay.server = hypercorn's
    error log, quart, hypercorn...), for :func:`assert_no_errors_logged`."""
    caplog.set_level(logging.WARNING)


def assert_no_errors_logged(
    caplog: pytest.LogCaptureFixture, row: str = "", since: int = 0
) -> None:
    """Nothing at ERROR or above, and no traceback at any level, was logged (since the
    ``since``-th record)."""
    bad = [r for r in caplog.records[since:] if r.levelno >= logging.ERROR or r.exc_info]
    assert not bad, f"{row}: logged " + "; ".join(
        f"{r.name} {r.levelname} {r.getMessage()}" for r in bad
    )


def assert_error(
    response: httpx2.Response, status: int, message: str, code: object = ANY, row: str = ""
) -> dict[str, Any]:
    """``response`` is the error ``status`` in OpenAI's shape, its message containing
    ``message`` (and its code ``code``). Returns the error object."""
    where = f"{row}: {response.request.method} {response.request.url.raw_path!r} got "
    where += (
        f"{response.status_code} {response.headers.get('content-type')} {response.text[:300]!r}"
    )
    assert response.status_code == status, where
    assert response.headers.get("content-type", "").startswith("application/json"), where
    body = response.json()
    assert isinstance(body, dict), where
    assert list(body) == ["error"], where
    error = body["error"]
    assert sorted(error) == ["code", "message", "type"], where
    assert isinstance(error["message"], str), where
    assert error["type"] == TYPES[status], where
    assert message in error["message"], where
    if code is not ANY:
        assert error["code"] == code, where
    return dict(error)


def client_addr(response: httpx2.Response) -> object:
    """The client side's address of the connection ``response`` came on."""
    return response.extensions["network_stream"].get_extra_info("client_addr")


def new_client(url: str) -> httpx2.AsyncClient:
    # Plain HTTP on 127.0.0.1: verify=False skips loading the CA bundle (30 ms a client).
    return httpx2.AsyncClient(base_url=url, timeout=5, verify=False)


async def assert_still_answers(
    url: str,
    client: httpx2.AsyncClient | None = None,
    *,
    after: httpx2.Response | None = None,
    headers: Mapping[str, str] | None = None,
    row: str = "",
) -> None:
    """A normal small chat completion succeeds on a fresh connection, and ``/healthz`` on
    ``client``'s connection. With ``after``, that must be the very connection ``after`` came
    on: the bad request left it usable (kept alive)."""
    async with new_client(url) as fresh:
        response = await fresh.post(
            "/v1/chat/completions", json=chat("small", stream=False), headers=headers
        )
        assert response.status_code == 200, f"{row}: then {response.text[:300]!r}"
        assert response.json()["choices"][0]["message"]["content"] == "ok", row
    if client is not None:
        health = await client.get("/healthz")
        assert health.status_code == 200, f"{row}: then {health.text[:300]!r}"
        if after is not None:
            assert client_addr(health) == client_addr(after), f"{row}: on a new connection"


@pytest.fixture
def fake(fake_server: FakeModelServer) -> FakeModelServer:
    """The fake model, answering "ok" at once (the follow-up requests are quick)."""
    fake_server.default = FakeScript(tokens=["ok"])
    return fake_server


# -- request bodies -------------------------------------------------------------------------

#: Bad bodies by kind: (row, body, what the message says, error code); each a 400.
BAD_BODIES: dict[str, list[tuple[str, bytes, str, str]]] = {
    "not-json": [
        ("not-json", b"{not json", NOT_JSON, "invalid_json"),
        ("empty-body", b"", NOT_JSON, "invalid_json"),
        ("whitespace-only", b" \r\n\t ", NOT_JSON, "invalid_json"),
        ("truncated", b'{"messages": [{"role": "user"', NOT_JSON, "invalid_json"),
        ("trailing-garbage", body_of() + b" x", NOT_JSON, "invalid_json"),
        ("single-quotes", b"{'messages': []}", NOT_JSON, "invalid_json"),
    ],
    "json-but-not-an-object": [
        ("array", b"[]", NOT_OBJECT, "invalid_request"),
        ("array-of-request", b"[" + body_of() + b"]", NOT_OBJECT, "invalid_request"),
        ("string", b'"hi"', NOT_OBJECT, "invalid_request"),
        ("number", b"42", NOT_OBJECT, "invalid_request"),
        ("null", b"null", NOT_OBJECT, "invalid_request"),
        ("true", b"true", NOT_OBJECT, "invalid_request"),
    ],
    "nested-too-deeply": [
        ("deep-arrays", b"[" * 100_000 + b"]" * 100_000, TOO_DEEP, "invalid_json"),
        ("deep-objects", b'{"a":' * 100_000 + b"1" + b"}" * 100_000, TOO_DEEP, "invalid_json"),
        ("deep-unclosed", b"[" * 100_000, TOO_DEEP, "invalid_json"),
        ("deep-in-a-message", nested_part(100_000), TOO_DEEP, "invalid_json"),
    ],
    "encodings": [
        (
            "latin-1-byte",
            content_text('"x"').replace(b'"x"', b'"caf\xe9"'),
            NOT_UTF8,
            "invalid_json",
        ),
        (
            "overlong-utf-8",
            content_text('"x"').replace(b'"x"', b'"\xc0\xaf"'),
            NOT_UTF8,
            "invalid_json",
        ),
        (
            "utf-8-encoded-surrogate",
            content_text('"x"').replace(b'"x"', b'"\xed\xa0\x80"'),
            NOT_UTF8,
            "invalid_json",
        ),
        ("utf-16-with-bom", json.dumps(chat()).encode("utf-16"), NOT_UTF8, "invalid_json"),
        ("utf-16-without-bom", json.dumps(chat()).encode("utf-16-le"), NOT_JSON, "invalid_json"),
        ("utf-32", json.dumps(chat()).encode("utf-32"), NOT_UTF8, "invalid_json"),
        ("utf-8-bom", b"\xef\xbb\xbf" + body_of(), NOT_JSON, "invalid_json"),
        ("lone-high-surrogate", content_text('"\\ud800"'), SURROGATE, "invalid_json"),
        ("lone-low-surrogate", content_text('"a\\udc00b"'), SURROGATE, "invalid_json"),
        ("surrogate-pair-reversed", content_text('"\\ude00\\ud83d"'), SURROGATE, "invalid_json"),
        ("surrogate-in-a-key", raw_field("\\ud800", "1"), SURROGATE, "invalid_json"),
    ],
    "messages": [
        ("messages-missing", json.dumps({"stream": True}).encode(), MESSAGES, "invalid_request"),
        ("messages-empty", body_of(messages=[]), MESSAGES, "invalid_request"),
        ("messages-string", body_of(messages="hi"), MESSAGES, "invalid_request"),
        (
            "messages-object",
            body_of(messages={"role": "user", "content": "hi"}),
            MESSAGES,
            "invalid_request",
        ),
        ("messages-null", body_of(messages=None), MESSAGES, "invalid_request"),
        (
            "message-string",
            body_of(messages=["hi"]),
            "'messages[0]' must be an object with 'role' and 'content'",
            "invalid_request",
        ),
        (
            "message-null",
            body_of(messages=[None]),
            "'messages[0]' must be an object",
            "invalid_request",
        ),
        (
            "second-message-number",
            body_of(messages=[{"role": "user", "content": "hi"}, 1]),
            "'messages[1]' must be an object",
            "invalid_request",
        ),
        (
            "role-missing",
            without("role"),
            f"'messages[0].role' must be one of {ROLES}, not None",
            "invalid_request",
        ),
        (
            "role-unknown",
            message_of(role="wizard"),
            f"'messages[0].role' must be one of {ROLES}, not 'wizard'",
            "invalid_request",
        ),
        ("role-capitalised", message_of(role="User"), "not 'User'", "invalid_request"),
        ("role-number", message_of(role=1), "not 1", "invalid_request"),
        ("content-missing", without("content"), CONTENT, "invalid_request"),
        ("content-null", message_of(content=None), CONTENT, "invalid_request"),
        ("content-number", message_of(content=42), CONTENT, "invalid_request"),
        ("content-bool", message_of(content=True), CONTENT, "invalid_request"),
        ("content-object", message_of(content={"text": "hi"}), CONTENT, "invalid_request"),
        ("content-array-of-strings", message_of(content=["hi"]), CONTENT, "invalid_request"),
    ],
    "other-fields": [
        ("model-number", body_of(model=42), "'model' must be a string", "invalid_request"),
        ("model-array", body_of(model=["fake"]), "'model' must be a string", "invalid_request"),
        (
            "stream-string",
            body_of(stream="true"),
            "'stream' must be true or false",
            "invalid_request",
        ),
        ("stream-number", body_of(stream=1), "'stream' must be true or false", "invalid_request"),
        ("max_tokens-0", body_of(max_tokens=0), MAX_TOKENS, "invalid_request"),
        ("max_tokens-negative", body_of(max_tokens=-1), MAX_TOKENS, "invalid_request"),
        ("max_tokens-bool", body_of(max_tokens=True), MAX_TOKENS, "invalid_request"),
        ("max_tokens-string", body_of(max_tokens="10"), MAX_TOKENS, "invalid_request"),
        ("max_tokens-float", body_of(max_tokens=1.5), MAX_TOKENS, "invalid_request"),
        ("max_tokens-infinite", raw_field("max_tokens", "1e400"), MAX_TOKENS, "invalid_request"),
        (
            "max_completion_tokens-0",
            body_of(max_completion_tokens=0),
            "'max_completion_tokens' must be a positive integer",
            "invalid_request",
        ),
        (
            "temperature-above-2",
            body_of(temperature=2.5),
            "'temperature' must be between 0 and 2",
            "invalid_request",
        ),
        (
            "temperature-negative",
            body_of(temperature=-0.5),
            "'temperature' must be between 0 and 2",
            "invalid_request",
        ),
        (
            "temperature-NaN-string",
            body_of(temperature="NaN"),
            "'temperature' must be a number",
            "invalid_request",
        ),
        (
            "temperature-numeric-string",
            body_of(temperature="0.7"),
            "'temperature' must be a number",
            "invalid_request",
        ),
        (
            "temperature-NaN-literal",
            raw_field("temperature", "NaN"),
            "'temperature' must be a number",
            "invalid_request",
        ),
        (
            "temperature-Infinity-literal",
            raw_field("temperature", "Infinity"),
            "'temperature' must be a number",
            "invalid_request",
        ),
        (
            "temperature-minus-Infinity",
            raw_field("temperature", "-Infinity"),
            "'temperature' must be a number",
            "invalid_request",
        ),
        (
            "temperature-bool",
            body_of(temperature=True),
            "'temperature' must be a number",
            "invalid_request",
        ),
        ("top_p-above-1", body_of(top_p=1.5), "'top_p' must be between 0 and 1", "invalid_request"),
        ("stop-number", body_of(stop=5), STOP, "invalid_request"),
        ("stop-array-with-number", body_of(stop=["a", 1]), STOP, "invalid_request"),
        ("stop-array-with-null", body_of(stop=[None]), STOP, "invalid_request"),
        ("stop-object", body_of(stop={"a": 1}), STOP, "invalid_request"),
        ("seed-bool", body_of(seed=True), SEED, "invalid_request"),
        ("seed-float", body_of(seed=1.5), SEED, "invalid_request"),
        ("seed-string", body_of(seed="42"), SEED, "invalid_request"),
    ],
}


async def refuse_body(
    url: str,
    client: httpx2.AsyncClient,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    row: str,
    body: bytes,
    message: str,
    code: str,
) -> None:
    """One row: ``body`` gets a 400 saying ``message``, never reaches the model, logs no
    error, and the server answers the next requests (on this connection too)."""
    requests, records = len(fake.requests), len(caplog.records)
    response = await client.post(
        "/v1/chat/completions", content=body, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, message, code, row)
    assert len(fake.requests) == requests, f"{row}: sent upstream"
    await assert_still_answers(url, client, after=response, row=row)
    assert_no_errors_logged(caplog, row, since=records)


@pytest.mark.parametrize("kind", list(BAD_BODIES))
@bounded(10)
async def test_bad_bodies_get_a_400_and_the_server_carries_on(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    served = await start_served(nursery, fake)
    failures = []
    async with new_client(served.url) as client:
        for row in BAD_BODIES[kind]:
            try:
                await refuse_body(served.url, client, fake, caplog, *row)
            except AssertionError as failure:  # every row is tried; all failures are shown
                failures.append(str(failure))
    assert not failures, "\n\n".join(failures)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        pytest.param(
            message_of(role=["user"]),
            f"'messages[0].role' must be one of {ROLES}, not ['user']",
            id="role-array",
        ),
        pytest.param(
            message_of(role={}),
            f"'messages[0].role' must be one of {ROLES}, not {{}}",
            id="role-object",
        ),
        pytest.param(
            body_of(max_completion_tokens=None, max_tokens=-5),
            MAX_TOKENS,
            id="max_tokens-negative-behind-null-max_completion_tokens",
        ),
    ],
)
@bounded(10)
async def test_bodies_that_once_crashed_or_slipped_through(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    body: bytes,
    message: str,
) -> None:
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        await refuse_body(served.url, client, fake, caplog, "", body, message, "invalid_request")


CARELESS_BUT_VALID = [
    ("surrogate-pair-escape", content_text('"\\ud83d\\ude00"')),
    ("escaped-backslash-then-ud800", content_text('"\\\\ud800"')),
    ("NUL-escape", content_text('"a\\u0000b"')),
    ("stream-null", body_of(stream=None)),
    ("temperature-and-top_p-at-the-bounds", body_of(temperature=2, top_p=0)),
    (
        "assistant-content-null",
        body_of(
            messages=[{"role": "assistant", "content": None}, {"role": "user", "content": "x"}]
        ),
    ),
    (
        "content-parts-one-empty",
        body_of(messages=[{"role": "user", "content": [{"type": "text", "text": "hi"}, {}]}]),
    ),
    ("nested-100-deep", nested_part(100)),
    ("5000-messages", body_of(messages=[{"role": "user", "content": "hi"}] * 5000)),
]


@bounded(10)
async def test_careless_but_valid_bodies_are_served(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The other side of the rows above: what must not be refused."""
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        for row, body in CARELESS_BUT_VALID:
            response = await client.post("/v1/chat/completions", content=body)
            assert response.status_code == 200, f"{row}: {response.text[:300]!r}"
            assert response.json()["choices"][0]["message"]["content"] == "ok", row
    assert_no_errors_logged(caplog)


@bounded(10)
async def test_the_deepest_body_the_parser_accepts_is_served_not_a_500(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Finds the deepest nesting the server's JSON parser takes (it depends on the stack
    depth of the handler): that body must then be served, or refused with the 400 above."""
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        for depth in range(1000, 500, -1):
            response = await client.post("/v1/chat/completions", content=nested_part(depth))
            if response.status_code != 400 or TOO_DEEP not in response.text:
                break
        row = f"nested {depth} deep"
        if response.status_code != 200:
            assert_error(response, 400, TOO_DEEP, "invalid_json", row)
        await assert_still_answers(served.url, client, row=row)
    assert_no_errors_logged(caplog, row)


def chunks_of(payload: bytes) -> Any:
    async def chunks() -> Any:
        for i in range(0, len(payload), 100):
            yield payload[i : i + 100]

    return chunks()


@pytest.mark.parametrize(
    ("size", "chunked"),
    [
        pytest.param(1001, False, id="1-byte-over-with-content-length"),
        pytest.param(100_000, False, id="100-KB-with-content-length"),
        pytest.param(1001, True, id="1-byte-over-chunked"),
        pytest.param(100_000, True, id="100-KB-chunked"),
    ],
)
@bounded(10)
async def test_bodies_over_the_limit_get_a_413(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    size: int,
    chunked: bool,
) -> None:
    served = await start_served(nursery, fake, max_body=1000)
    padding = size - len(body_of(x=""))
    payload = body_of(x="x" * padding)
    assert len(payload) == size
    async with new_client(served.url) as client:
        # The limit itself is fine.
        exact = body_of(x="x" * (1000 - len(body_of(x=""))))
        assert len(exact) == 1000
        at_limit = await client.post("/v1/chat/completions", content=exact)
        assert at_limit.status_code == 200, at_limit.text
        response = await client.post(
            "/v1/chat/completions", content=chunks_of(payload) if chunked else payload
        )
        if chunked:
            assert "content-length" not in response.request.headers
        # Chunked, it is refused by Quart's MAX_CONTENT_LENGTH while reading: the same error.
        assert_error(
            response, 413, "the request body is over the 1000 byte limit", "body_too_large"
        )
        assert len(fake.requests) == 1  # the one at the limit
        # The body may have been left unread: then the server may close the connection.
        await assert_still_answers(served.url, client)
    assert_no_errors_logged(caplog)


# -- headers --------------------------------------------------------------------------------

BAD_HEADERS = [
    pytest.param("X-Session-Id", "has space", SESSION, "invalid_session_id", id="session-space"),
    pytest.param("X-Session-Id", "a\tb", SESSION, "invalid_session_id", id="session-tab"),
    pytest.param("X-Session-Id", "a/b", SESSION, "invalid_session_id", id="session-slash"),
    pytest.param("X-Session-Id", "a,b", SESSION, "invalid_session_id", id="session-comma"),
    pytest.param("X-Session-Id", '"s"', SESSION, "invalid_session_id", id="session-quoted"),
    pytest.param("X-Session-Id", "x" * 129, SESSION, "invalid_session_id", id="session-129"),
    pytest.param("X-Session-Id", "sé".encode(), SESSION, "invalid_session_id", id="session-utf-8"),
    pytest.param(
        "X-Relay-On-Busy",
        "sometimes",
        "X-Relay-On-Busy must be one of supersede, reject, enqueue, not 'sometimes'",
        "invalid_header",
        id="on-busy-unknown",
    ),
    pytest.param(
        "X-Relay-On-Busy",
        "",
        "X-Relay-On-Busy must be one of supersede, reject, enqueue, not ''",
        "invalid_header",
        id="on-busy-empty",
    ),
    pytest.param(
        "X-Relay-On-Disconnect",
        "later",
        "X-Relay-On-Disconnect must be one of continue, cancel, not 'later'",
        "invalid_header",
        id="on-disconnect-unknown",
    ),
    pytest.param(
        "X-Relay-On-Disconnect",
        "1",
        "X-Relay-On-Disconnect must be one of continue, cancel, not '1'",
        "invalid_header",
        id="on-disconnect-number",
    ),
    pytest.param(
        "X-Session-Id",
        "a\nb",
        SESSION,
        "invalid_session_id",
        id="session-newline",
        marks=pytest.mark.skip(reason="httpx2 refuses to send it; see the raw rows"),
    ),
]


@pytest.mark.parametrize(("header", "value", "message", "code"), BAD_HEADERS)
@bounded(10)
async def test_bad_headers_get_a_400(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    header: str,
    value: str | bytes,
    message: str,
    code: str,
) -> None:
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        for stream in (True, False):
            response = await client.post(
                "/v1/chat/completions", json=chat(stream=stream), headers={header: value}
            )
            assert_error(response, 400, message, code, f"stream={stream}")
        assert fake.requests == []
        await assert_still_answers(served.url, client, after=response)
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    ("header", "value"),
    [
        pytest.param("X-Session-Id", "x" * 128, id="session-128"),
        pytest.param("X-Session-Id", "A-z.0_9:@-", id="session-every-punctuation"),
        pytest.param("X-Relay-On-Busy", "REJECT", id="on-busy-upper-case"),
        pytest.param("X-Relay-On-Disconnect", "Cancel", id="on-disconnect-capitalised"),
    ],
)
@bounded(10)
async def test_headers_at_the_bounds_are_accepted(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    header: str,
    value: str,
) -> None:
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={header: value}
        )
    assert response.status_code == 200, response.text
    if header == "X-Session-Id":
        assert response.headers["x-session-id"] == value
    assert_no_errors_logged(caplog)


@bounded(10)
async def test_an_empty_session_header_is_no_header(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """``X-Session-Id:`` with nothing after it makes a fresh session, like no header."""
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        response = await client.post(
            "/v1/chat/completions", json=chat(stream=False), headers={"X-Session-Id": ""}
        )
    assert response.status_code == 200, response.text
    assert len(response.headers["x-session-id"]) == 22
    assert_no_errors_logged(caplog)


PROTECTED = [
    ("POST", "/v1/chat/completions"),
    ("GET", "/v1/sessions/s"),
    ("GET", "/v1/sessions/s/stream"),
    ("POST", "/v1/sessions/s/stop"),
    ("GET", "/metrics"),
]


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param(None, id="none"),
        pytest.param("Bearer", id="bearer-alone"),
        pytest.param("Bearer wrong", id="wrong-key"),
        pytest.param("Bearer k2", id="key-with-a-suffix"),
        pytest.param("Bearer k k", id="key-twice"),
        pytest.param("Basic az0=", id="basic"),
        pytest.param("Token k", id="other-scheme"),
        pytest.param("k", id="key-without-scheme"),
        pytest.param("Bearer ké".encode(), id="utf-8-key"),
    ],
)
@bounded(10)
async def test_bad_credentials_get_a_401_and_healthz_stays_open(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    authorization: str | bytes | None,
) -> None:
    served = await start_served(nursery, fake, api_keys=("k",))
    headers = {} if authorization is None else {"Authorization": authorization}
    async with new_client(served.url) as client:
        for method, path in PROTECTED:
            response = await client.request(
                method, path, headers=headers, json=chat() if method == "POST" else None
            )
            assert_error(response, 401, NEEDS_KEY, "invalid_api_key", f"{method} {path}")
            assert response.headers["www-authenticate"] == "Bearer", path
        health = await client.get("/healthz", headers=headers)
        assert (health.status_code, health.json()) == (200, {"status": "ok"})
        assert fake.requests == []
        await assert_still_answers(
            served.url, client, after=response, headers={"Authorization": "Bearer k"}
        )
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer k", id="bearer"),
        pytest.param("bearer k", id="scheme-lower-case"),
        pytest.param("BEARER k", id="scheme-upper-case"),
        pytest.param("Bearer  k", id="two-spaces"),
    ],
)
@bounded(10)
async def test_good_credentials_in_any_case_are_accepted(
    nursery: trio.Nursery, fake: FakeModelServer, authorization: str
) -> None:
    served = await start_served(nursery, fake, api_keys=("k",))
    async with new_client(served.url) as client:
        response = await client.post(
            "/v1/chat/completions",
            json=chat(stream=False),
            headers={"Authorization": authorization},
        )
    assert response.status_code == 200, response.text


# -- session ids in paths -------------------------------------------------------------------

SESSION_ROUTES = [
    ("GET", "/v1/sessions/{}/stream"),
    ("POST", "/v1/sessions/{}/stop"),
    ("GET", "/v1/sessions/{}"),
]


@pytest.mark.parametrize(
    ("segment", "status", "message", "code"),
    [
        pytest.param("a%20b", 400, SESSION, "invalid_session_id", id="space"),
        pytest.param("a%0Ab", 400, SESSION, "invalid_session_id", id="newline"),
        pytest.param("%00", 400, SESSION, "invalid_session_id", id="NUL"),
        pytest.param("%C3%A9", 400, SESSION, "invalid_session_id", id="utf-8"),
        pytest.param("%FF", 400, SESSION, "invalid_session_id", id="invalid-utf-8"),
        pytest.param("a%3Bb", 400, SESSION, "invalid_session_id", id="semicolon"),
        pytest.param("x" * 129, 400, SESSION, "invalid_session_id", id="129-characters"),
        pytest.param("a%2Fb", 404, NOT_FOUND, None, id="encoded-slash"),
        pytest.param(
            "nope",
            404,
            "no run is held for session 'nope' (never started, or evicted)",
            "unknown_session",
            id="unknown",
        ),
        pytest.param(
            "%2E%2E", 404, "no run is held for session '..'", "unknown_session", id="dot-dot"
        ),
        pytest.param(
            "",
            404,
            "",
            ANY,
            id="empty",
        ),
    ],
)
@bounded(10)
async def test_bad_session_ids_in_paths(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    segment: str,
    status: int,
    message: str,
    code: object,
) -> None:
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        for method, route in SESSION_ROUTES:
            response = await client.request(method, route.format(segment))
            assert_error(response, status, message, code, f"{method} {route}")
        await assert_still_answers(served.url, client, after=response)
    assert_no_errors_logged(caplog)


# -- resume cursors -------------------------------------------------------------------------

ALL_SEQS = list(range(6))  # five tokens and the finish

#: Cursors by kind: (row, Last-Event-ID or None, ?starting_after or None, 400 or the seqs
#: replayed) against a finished run of seqs 0-5.
CURSORS: dict[str, list[tuple[str, str | bytes | None, str | None, int | list[int]]]] = {
    "invalid": [
        ("header-abc", "abc", None, 400),
        ("header-minus-5", "-5", None, 400),
        ("header-minus-2", "-2", None, 400),
        ("header-1e3", "1e3", None, 400),
        ("header-1.5", "1.5", None, 400),
        ("header-hex", "0x3", None, 400),
        ("header-5000-digits", "9" * 5000, None, 400),
        ("header-latin-1-suffix", b"3\xe9", None, 400),
        ("query-abc", None, "abc", 400),
        ("query-minus-5", None, "-5", 400),
        ("query-1e3", None, "1e3", 400),
        ("bad-header-wins-over-good-query", "abc", "2", 400),
    ],
    "valid": [
        ("none", None, None, ALL_SEQS),
        ("header-minus-1", "-1", None, ALL_SEQS),
        ("header-3", "3", None, [4, 5]),
        ("query-3", None, "3", [4, 5]),
        ("query-empty", None, "", ALL_SEQS),
        ("empty-header-is-absent-so-the-query-applies", "", "3", [4, 5]),
        ("good-header-wins-over-bad-query", "2", "abc", [3, 4, 5]),
    ],
    # Nothing to replay, then the run's ending and [DONE].
    "at-or-beyond-the-end": [
        ("header-last-seq", "5", None, []),
        ("header-beyond-the-end", "100", None, []),
        ("header-huge", "99999999999999999999", None, []),
        ("query-huge", None, "99999999999999999999", []),
    ],
}


async def check_cursor(
    client: httpx2.AsyncClient,
    caplog: pytest.LogCaptureFixture,
    row: str,
    last_event_id: str | bytes | None,
    query: str | None,
    expected: int | list[int],
) -> None:
    """One row: resuming session "s" from this cursor is a 400, or replays ``expected``."""
    records = len(caplog.records)
    headers = {} if last_event_id is None else {"Last-Event-ID": last_event_id}
    url = "/v1/sessions/s/stream" + ("" if query is None else f"?starting_after={query}")
    async with client.stream("GET", url, headers=headers) as response:
        if expected == 400:
            await response.aread()
            assert_error(response, 400, RESUME, "invalid_resume_point", row)
        else:
            assert response.status_code == 200, row
            assert response.headers["content-type"].startswith("text/event-stream"), row
            events = await SSEReader(response).all()
            assert [e.event for e in events] == ["message"] * len(events), row
            assert seqs(events) == expected, row
            assert events[-1].data == "[DONE]", row
            ending = json.loads(events[-2].data)  # the run's ending, even with no events
            assert ending["choices"][0]["finish_reason"] == "stop", row
    assert (await client.get("/healthz")).status_code == 200, row
    assert_no_errors_logged(caplog, row, since=records)


async def finished_run(served: Served, client: httpx2.AsyncClient) -> None:
    """A finished run in session "s" with seqs 0-5 (five tokens, then the finish)."""
    served.fake.add_model("five", FakeScript())
    made = await client.post(
        "/v1/chat/completions",
        json=chat(stream=False, model="five"),
        headers={"X-Session-Id": "s"},
    )
    assert made.status_code == 200


@pytest.mark.parametrize("kind", list(CURSORS))
@bounded(10)
async def test_resume_cursors(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    served = await start_served(nursery, fake)
    failures = []
    async with new_client(served.url) as client:
        await finished_run(served, client)
        for row in CURSORS[kind]:
            try:
                await check_cursor(client, caplog, *row)
            except AssertionError as failure:  # every row is tried; all failures are shown
                failures.append(str(failure))
    assert not failures, "\n\n".join(failures)
    await assert_still_answers(served.url)


@pytest.mark.parametrize(
    ("last_event_id", "query"),
    [
        pytest.param(
            "3_0",
            None,
            id="header-underscore",
        ),
        pytest.param(
            None,
            "%D9%A3",
            id="query-arabic-indic-digit",
        ),
    ],
)
@bounded(10)
async def test_resume_cursors_are_ascii_digits_only(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    last_event_id: str | None,
    query: str | None,
) -> None:
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        await finished_run(served, client)
        await check_cursor(client, caplog, "", last_event_id, query, 400)


@bounded(10)
async def test_resume_from_trimmed_events_is_a_replay_gap_event(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    # Five tokens, the finish and the usage (seqs 0-6), of which 4-6 are held.
    served = await start_served(nursery, fake, max_events=3)
    async with new_client(served.url) as client:
        await finished_run(served, client)
        for row, headers, query, replayed in [
            ("from-the-start", {}, "", None),
            ("header-0", {"Last-Event-ID": "0"}, "", None),
            ("query-1", {}, "?starting_after=1", None),
            ("header-2", {"Last-Event-ID": "2"}, "", None),
            ("header-3-the-first-held", {"Last-Event-ID": "3"}, "", [4, 5]),  # 6: usage
            ("header-last-seq", {"Last-Event-ID": "6"}, "", []),
        ]:
            async with client.stream(
                "GET", "/v1/sessions/s/stream" + query, headers=headers
            ) as response:
                assert response.status_code == 200, row
                events = await SSEReader(response).all()
            assert events[-1].data == "[DONE]", row
            if replayed is not None:
                assert seqs(events) == replayed, row
                continue
            assert [e.event for e in events] == ["error", "message"], row
            body = json.loads(events[0].data)
            assert sorted(body["error"]) == ["code", "message", "type"], row
            assert body["error"]["type"] == "replay_gap", row
            assert "only seq 4 onwards are still held" in body["error"]["message"], row
        await assert_still_answers(served.url, client)
    assert_no_errors_logged(caplog)


# -- methods and routes ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path", "status", "message"),
    [
        pytest.param("GET", "/v1/chat/completions", 405, NOT_ALLOWED, id="GET-completions"),
        pytest.param("PUT", "/v1/chat/completions", 405, NOT_ALLOWED, id="PUT-completions"),
        pytest.param("PUT", "/v1/sessions/s", 405, NOT_ALLOWED, id="PUT-session"),
        pytest.param("GET", "/v1/sessions/s/stop", 405, NOT_ALLOWED, id="GET-stop"),
        pytest.param("POST", "/v1/sessions/s/stream", 405, NOT_ALLOWED, id="POST-stream"),
        pytest.param("POST", "/healthz", 405, NOT_ALLOWED, id="POST-healthz"),
        pytest.param("GET", "/nowhere", 404, NOT_FOUND, id="unknown-route"),
        pytest.param("POST", "/v1/models", 405, NOT_ALLOWED, id="models-post"),
        pytest.param("POST", "/v1/chat/completions/", 404, NOT_FOUND, id="trailing-slash"),
        pytest.param("POST", "/v1/completions", 404, NOT_FOUND, id="legacy-completions"),
        pytest.param("GET", "/v1/sessions/", 404, NOT_FOUND, id="sessions-without-id"),
    ],
)
@bounded(10)
async def test_wrong_methods_and_routes(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    method: str,
    path: str,
    status: int,
    message: str,
) -> None:
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        response = await client.request(
            method, path, json=chat(stream=False) if method in ("POST", "PUT") else None
        )
        assert_error(response, status, message)
        assert fake.requests == []
        await assert_still_answers(served.url, client, after=response)
    assert_no_errors_logged(caplog)


@bounded(10)
async def test_a_405_names_the_allowed_methods(
    nursery: trio.Nursery, fake: FakeModelServer
) -> None:
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        response = await client.get("/v1/chat/completions")
    assert response.status_code == 405
    assert "POST" in response.headers.get("allow", "")


@pytest.mark.parametrize(
    "content_type",
    [
        pytest.param("text/plain", id="text-plain"),
        pytest.param("application/x-www-form-urlencoded", id="form"),
        pytest.param("multipart/form-data", id="multipart-without-boundary"),
        pytest.param("application/json; charset=latin-1", id="json-latin-1-charset"),
        pytest.param(None, id="none"),
    ],
)
@bounded(10)
async def test_a_json_body_under_another_content_type(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    content_type: str | None,
) -> None:
    """Either accepted or a clear 4xx; what the server does is accept it: it reads the body as
    JSON whatever the Content-Type says (as curl's default form type makes common)."""
    served = await start_served(nursery, fake)
    async with new_client(served.url) as client:
        request = client.build_request("POST", "/v1/chat/completions", content=body_of())
        assert "Content-Type" not in request.headers  # httpx2 sets none for bytes content
        if content_type is not None:
            request.headers["Content-Type"] = content_type
        response = await client.send(request)
        assert response.status_code == 200, response.text
        assert response.json()["choices"][0]["message"]["content"] == "ok"
    assert_no_errors_logged(caplog)


# -- raw sockets ----------------------------------------------------------------------------


HOST = b"Host: relay\r\n"
HEALTHZ = b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n"
BODY = body_of()


def post(headers: bytes = b"", body: bytes = BODY, length: int | None = None) -> bytes:
    """A chat completion request as bytes, with extra raw header lines ``headers``."""
    size = len(body) if length is None else length
    return (
        b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Type: application/json\r\n"
        b"Content-Length: %d\r\n" % size + headers + b"\r\n" + body
    )


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        pytest.param(b"GARBAGE\r\n\r\n", 400, id="malformed-request-line"),
        pytest.param(b"GET /healthz\r\n\r\n", 400, id="http-0.9-request-line"),
        pytest.param(b"GET /healthz HTTP/1.1\r\n\r\n", 400, id="http-1.1-without-host"),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n" + HOST + b"NoColonHere\r\n\r\n",
            400,
            id="header-line-without-colon",
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-A: a\x00b\r\n\r\n", 400, id="NUL-in-header"
        ),
        pytest.param(
            b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 100_000 + b"\r\n\r\n",
            431,
            id="100-KB-header",
        ),
        pytest.param(
            post(b"Content-Length: 3\r\n", b"{}"), 400, id="two-different-content-lengths"
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Length: abc\r\n\r\n",
            400,
            id="content-length-not-a-number",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Content-Length: -1\r\n\r\n",
            400,
            id="content-length-negative",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST + b"Transfer-Encoding: gzip\r\n\r\n",
            501,
            id="transfer-encoding-gzip",
        ),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + HOST
            + b"Transfer-Encoding: chunked\r\n\r\nzz\r\nabc\r\n0\r\n\r\n",
            400,
            id="bad-chunk-size",
        ),
    ],
)
@bounded(10)
async def test_broken_http_is_refused_and_the_connection_closed(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    request_bytes: bytes,
    status: int,
) -> None:
    """Requests h11 cannot parse never reach the app: hypercorn answers them itself (with an
    empty body, not JSON: the app has no say) and closes the connection."""
    served = await start_served(nursery, fake)
    conn = await RawHTTP.connect(served.url)
    try:
        # The server may answer and close before reading it all: the answer is still read.
        with contextlib.suppress(trio.BrokenResourceError):
            await conn.send(request_bytes)
        answered, headers, body = await conn.response()
        assert (answered, headers.get("connection"), body) == (status, "close", b"")
        assert await conn.eof()
    finally:
        await conn.aclose()
    await assert_still_answers(served.url)
    assert len(fake.requests) == 1  # the follow-up only
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    ("headers", "status", "message"),
    [
        pytest.param(b"X-Session-Id: caf\xe9\r\n", 400, SESSION, id="latin-1-session-id"),
        pytest.param(b"X-Session-Id: a\r\n b\r\n", 400, SESSION, id="session-id-folded"),
        pytest.param(b"X-Session-Id: a b\r\n", 400, SESSION, id="session-id-space"),
        pytest.param(b"Authorization: Bearer \xe9\r\n", 401, NEEDS_KEY, id="latin-1-key"),
        pytest.param(b"Authorization: Bearer k\xe9\r\n", 401, NEEDS_KEY, id="key-latin-1-suffix"),
        pytest.param(b"Authorization: Bearer\r\n", 401, NEEDS_KEY, id="bearer-alone"),
        pytest.param(b"Authorization: Bearer \r\n", 401, NEEDS_KEY, id="bearer-space"),
        pytest.param(
            b"X-Relay-On-Busy: r\xe9ject\r\n",
            400,
            "X-Relay-On-Busy must be one of",
            id="latin-1-on-busy",
        ),
    ],
)
@bounded(10)
async def test_odd_header_bytes_get_a_json_error_on_a_kept_alive_connection(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    headers: bytes,
    status: int,
    message: str,
) -> None:
    served = await start_served(nursery, fake, api_keys=("k",))
    if not headers.startswith(b"Authorization"):
        headers = b"Authorization: Bearer k\r\n" + headers
    conn = await RawHTTP.connect(served.url)
    try:
        await conn.send(post(headers))
        answered, response_headers, body = await conn.response()
        assert answered == status, body
        assert response_headers["content-type"] == "application/json"
        error = json.loads(body)["error"]
        assert (error["type"], message in error["message"]) == (TYPES[status], True), error
        if status == 401:
            assert response_headers["www-authenticate"] == "Bearer"
        await conn.send(HEALTHZ)  # the body was read: the connection is still good
        assert (await conn.response())[0] == 200
    finally:
        await conn.aclose()
    assert fake.requests == []
    await assert_still_answers(served.url, headers={"Authorization": "Bearer k"})
    assert_no_errors_logged(caplog)


@bounded(10)
async def test_a_latin_1_byte_in_another_header_is_harmless(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    served = await start_served(nursery, fake)
    conn = await RawHTTP.connect(served.url)
    try:
        await conn.send(post(b"X-Note: caf\xe9\r\nUser-Agent: \xff\xfe\r\n"))
        status, _, body = await conn.response()
    finally:
        await conn.aclose()
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"] == "ok"
    assert_no_errors_logged(caplog)


@bounded(10)
async def test_pipelined_requests_are_all_answered_in_order(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    served = await start_served(nursery, fake)
    conn = await RawHTTP.connect(served.url)
    try:
        await conn.send(HEALTHZ + post(body=b"{not json") + post() + HEALTHZ)
        answers = [await conn.response() for _ in range(4)]
    finally:
        await conn.aclose()
    assert [status for status, _, _ in answers] == [200, 400, 200, 200]
    assert json.loads(answers[1][2])["error"]["message"] == NOT_JSON
    assert_no_errors_logged(caplog)


@bounded(10)
async def test_connection_close_gets_its_response_then_eof(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    served = await start_served(nursery, fake)
    for request_bytes in (
        b"GET /healthz HTTP/1.1\r\n" + HOST + b"Connection: close\r\n\r\n",
        post(b"Connection: close\r\n"),
        post(b"Connection: close\r\n", body=b"{not json"),
    ):
        conn = await RawHTTP.connect(served.url)
        try:
            await conn.send(request_bytes)
            status, _, _ = await conn.response()
            assert status in (200, 400), request_bytes
            assert await conn.eof(), f"still open after {request_bytes[:40]!r}"
        finally:
            await conn.aclose()
    assert_no_errors_logged(caplog)


@bounded(10)
async def test_content_length_and_chunked_together_is_answered_then_closed(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    served = await start_served(nursery, fake)
    chunked = b"%x\r\n%s\r\n0\r\n\r\n" % (len(BODY), BODY)
    conn = await RawHTTP.connect(served.url)
    try:
        await conn.send(post(b"Transfer-Encoding: chunked\r\n", chunked, length=len(BODY)))
        status, _, body = await conn.response()
        if status == 400:
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
        else:
            assert status == 200, body
        assert await conn.eof()
    finally:
        await conn.aclose()
    assert_no_errors_logged(caplog)


@pytest.mark.parametrize(
    ("first", "status"),
    [
        pytest.param(post(b"Authorization: Bearer nope\r\n", b""), 401, id="401-body-unsent"),
        pytest.param(post(b"", b"", length=5000), 413, id="413-by-content-length-body-unsent"),
        pytest.param(
            post(b"Expect: 100-continue\r\n", b"", length=5000), 413, id="413-expect-100-continue"
        ),
    ],
)
@bounded(15)
async def test_an_early_error_never_leaves_the_connection_hanging(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    first: bytes,
    status: int,
) -> None:
    """Answered before the body was read: the next request on that connection is either
    answered or the connection is closed (EOF), within 5 s; never left hanging."""
    served = await start_served(nursery, fake, max_body=1000, api_keys=("k",))
    if b"Authorization" not in first:
        first = first.replace(HOST, HOST + b"Authorization: Bearer k\r\n")
    conn = await RawHTTP.connect(served.url)
    try:
        await conn.send(first)
        answered, _, body = await conn.final_response()
        assert answered == status, body
        assert json.loads(body)["error"]["type"] == TYPES[status]
        with contextlib.suppress(trio.BrokenResourceError):  # closed: fine
            await conn.send(HEALTHZ)
        with trio.fail_after(5):
            try:
                next_status, _, _ = await conn.response()
            except (EOFError, trio.BrokenResourceError):
                next_status = None  # closed: fine
        assert next_status in (None, 200)
    finally:
        await conn.aclose()
    await assert_still_answers(served.url, headers={"Authorization": "Bearer k"})
    assert_no_errors_logged(caplog)


OVER_THE_LIMIT_CHUNKED = (
    b"POST /v1/chat/completions HTTP/1.1\r\n"
    + HOST
    + b"Transfer-Encoding: chunked\r\n\r\n"
    + b"%x\r\n%s\r\n" % (1500, b"x" * 1500)  # over the limit, and not the last chunk
)


@bounded(10)
async def test_a_request_right_after_a_413_for_an_unfinished_chunked_body(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture
) -> None:
    """The client sends its next request as soon as it has the 413 (its chunked body was cut
    short): the connection is answered or closed, and nothing is logged as an error."""
    served = await start_served(nursery, fake, max_body=1000)
    for attempt in range(20):
        conn = await RawHTTP.connect(served.url)
        try:
            await conn.send(OVER_THE_LIMIT_CHUNKED)
            status, _, body = await conn.response()
            assert status == 413, body
            assert json.loads(body)["error"]["type"] == "invalid_request_error"
            with contextlib.suppress(trio.BrokenResourceError):
                await conn.send(HEALTHZ)
            with trio.fail_after(5):
                try:
                    next_status, _, _ = await conn.response()
                except (EOFError, trio.BrokenResourceError):
                    next_status = None  # closed: fine
            assert next_status in (None, 200), attempt
        finally:
            await conn.aclose()
        await assert_still_answers(served.url)
        assert_no_errors_logged(caplog, f"attempt {attempt}")


@pytest.mark.parametrize(
    "half",
    [
        pytest.param(post(length=len(BODY) + 100, body=BODY[:20]), id="content-length"),
        pytest.param(
            b"POST /v1/chat/completions HTTP/1.1\r\n"
            + HOST
            + b"Transfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n%s" % (len(BODY), BODY[:20]),
            id="chunked",
        ),
        pytest.param(b"POST /v1/chat/completions HTTP/1.1\r\n" + HOST, id="headers-only"),
        pytest.param(b"POST /v1/chat/compl", id="request-line-only"),
    ],
)
@bounded(10)
async def test_a_client_that_hangs_up_half_way_through_its_request(
    nursery: trio.Nursery, fake: FakeModelServer, caplog: pytest.LogCaptureFixture, half: bytes
) -> None:
    served = await start_served(nursery, fake)
    conn = await RawHTTP.connect(served.url)
    await conn.send(half)
    await conn.aclose()
    await assert_still_answers(served.url)
    # The server saw the hang-up (its connections are torn down) before this returns.
    await trio.testing.wait_all_tasks_blocked()
    assert len(fake.requests) == 1  # the follow-up only
    assert_no_errors_logged(caplog)
