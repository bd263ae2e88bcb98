"""Client connections, over raw sockets: the server closes what it should, when it should.

quart-trio on hypercorn's trio worker never closed a connection on its own (neither after
``Connection: close`` nor at the keep-alive timeout), and wedged the connection after an error
answered before the request body was read. See docs/upstream-bugs.md and _asgi.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import socket
import struct
from functools import partial
from pathlib import Path
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import httpx2
import hypercorn.logging
import openai
import pytest
import trio
import trio.testing
from quart_trio import QuartTrio

import tokenrelay
import tokenrelay.server._asgi
import tokenrelay.server._hypercorn
import tokenrelay.server._responses
from _helpers import bounded, own_steps
from _server_helpers import RawHTTP, chat, port_of, record_writes, serve_app, start_served
from tokenrelay.testing import FakeModelServer, FakeScript

HEALTHZ = b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n"
HEALTHZ_THEN_CLOSE = b"GET /healthz HTTP/1.1\r\nHost: relay\r\nConnection: close\r\n\r\n"


def open_sockets() -> int:
    """Sockets this process holds open (the server's and the test's)."""
    fds = Path("/proc/self/fd")
    count = 0
    for fd in fds.iterdir():
        with contextlib.suppress(OSError):  # closed between listing and reading
            count += os.readlink(fd).startswith("socket:")
    return count


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="counts sockets in /proc")
@bounded(60)
async def test_a_thousand_connection_close_requests_leave_no_socket_open(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server)
    await trio.testing.wait_all_tasks_blocked()
    before = open_sockets()

    async def client(requests: int) -> None:
        for _ in range(requests):
            conn = await RawHTTP.connect(served.url)
            await conn.send(HEALTHZ_THEN_CLOSE)
            status, _, _ = await conn.response()
            assert status == 200
            assert await conn.closed_by_server()
            await conn.aclose()

    async with trio.open_nursery() as clients:
        for _ in range(10):
            clients.start_soon(client, 100)
    await trio.testing.wait_all_tasks_blocked()  # the server's side has finished closing
    assert open_sockets() == before


@bounded(20)
async def test_an_idle_keep_alive_connection_is_closed_after_the_timeout(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, keep_alive_timeout=0.5)
    conn = await RawHTTP.connect(served.url)
    await conn.send(HEALTHZ)
    assert (await conn.response())[0] == 200
    await conn.send(HEALTHZ)  # the connection is reused: it is kept alive...
    assert (await conn.response())[0] == 200
    idle_from = trio.current_time()
    assert await conn.closed_by_server()  # ... until it has been idle for the timeout
    idle = trio.current_time() - idle_from
    assert 0.45 <= idle < 2.0
    await conn.aclose()


@bounded(10)
async def test_a_connection_close_response_ends_with_a_clean_end_of_stream(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    # The server ends its side (a FIN), then closes its socket: the client reads the end of
    # the stream, not a reset.
    served = await start_served(nursery, fake_server)
    for _ in range(20):
        conn = await RawHTTP.connect(served.url)
        await conn.send(HEALTHZ_THEN_CLOSE)
        assert (await conn.response())[0] == 200
        assert conn.buffer == b""
        assert await conn.stream.receive_some() == b""
        await conn.aclose()


@bounded(20)
async def test_a_connection_that_sends_nothing_is_closed_after_the_keep_alive_timeout(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, keep_alive_timeout=0.5)
    conn = await RawHTTP.connect(served.url)
    idle_from = trio.current_time()
    assert await conn.closed_by_server()
    assert 0.45 <= trio.current_time() - idle_from < 2.0
    await conn.aclose()


@bounded(20)
async def test_a_response_longer_than_the_keep_alive_timeout_is_not_cut(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    # The keep-alive timeout counts only while the connection is idle: not while a request
    # is answered, and again from the response's end.
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(8)], interval=0.1)
    served = await start_served(nursery, fake_server, keep_alive_timeout=0.3)
    body = json.dumps(chat("long")).encode()
    conn = await RawHTTP.connect(served.url)
    await conn.send(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        + f"Content-Length: {len(body)}\r\n\r\n".encode()
        + body
    )
    started = trio.current_time()
    while b"data: [DONE]" not in conn.buffer:
        await conn._fill()
    ended = trio.current_time()
    assert ended - started >= 0.7  # (longer than the timeout, twice over)
    head, _, chunked = conn.buffer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    body = b""
    while chunked:
        size, _, rest = chunked.partition(b"\r\n")
        body += rest[: int(size, 16)]
        chunked = rest[int(size, 16) + 2 :]
    text = "".join(
        json.loads(line[6:])["choices"][0]["delta"].get("content") or ""
        for line in body.decode().splitlines()
        if line.startswith("data: {")
    )
    assert text == "".join(f"t{i} " for i in range(8))
    assert await conn.closed_by_server()
    assert 0.25 <= trio.current_time() - ended < 2.0
    await conn.aclose()


def all_tasks() -> int:
    """The tasks of this trio run."""
    count = 0
    tasks = [trio.lowlevel.current_root_task()]
    while tasks:
        task = tasks.pop()
        count += 1
        tasks += [child for nursery in task.child_nurseries for child in nursery.child_tasks]
    return count


@pytest.mark.parametrize("reset", [False, True])
@bounded(20)
async def test_an_idle_connection_the_client_closes_leaves_no_task_behind(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    caplog: pytest.LogCaptureFixture,
    reset: bool,
) -> None:
    # Its tasks end at once, not at the end of the keep-alive timeout; closed or reset
    # (a read that fails is the end of the connection, not an error).
    served = await start_served(nursery, fake_server, keep_alive_timeout=30)

    async def one_request() -> None:
        conn = await RawHTTP.connect(served.url)
        await conn.send(HEALTHZ)
        assert (await conn.response())[0] == 200
        if reset:
            linger = struct.pack("ii", 1, 0)
            conn.stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await conn.aclose()
        await trio.testing.wait_all_tasks_blocked()

    await one_request()
    before = all_tasks()
    await one_request()
    assert all_tasks() == before
    assert not any(idle.servers for idle in tokenrelay.server._hypercorn._IDLE.values())
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@bounded(20)
async def test_shutdown_closes_idle_connections_at_once(fake_server: FakeModelServer) -> None:
    # hypercorn closes a worker's idle connections when it shuts down, and waits (up to its
    # graceful timeout) for the others; here neither timeout would pass within the test.
    app = tokenrelay.create_app(
        tokenrelay.ServerConfig(upstream=f"openai={fake_server.openai_url}", db=":memory:")
    )
    shutdown = trio.Event()
    started = trio.current_time()
    async with trio.open_nursery() as serving:
        url = await serve_app(
            serving,
            app,
            keep_alive_timeout=60,
            graceful_timeout=60,
            shutdown_trigger=shutdown.wait,
        )
        silent = await RawHTTP.connect(url)  # never sends a request
        kept = await RawHTTP.connect(url)  # idle after one
        await kept.send(HEALTHZ)
        assert (await kept.response())[0] == 200
        shutdown.set()
        assert await silent.closed_by_server()
        assert await kept.closed_by_server()
    assert trio.current_time() - started < 5
    await silent.aclose()
    await kept.aclose()


class Waits:
    """The writes that wait for their client (from :func:`note_waits` on), as each begins:
    whether shutdown had begun then, and how many bytes it waits to write. ``began`` is set
    by the next one (replace it to wait for the one after)."""

    def __init__(self) -> None:
        self.seen: list[tuple[bool, int]] = []
        self.began = trio.Event()


def note_waits(monkeypatch: pytest.MonkeyPatch, shutdown: trio.Event) -> Waits:
    waits = Waits()
    wait_for_client = tokenrelay.server._hypercorn.DirectWriteTCPServer._wait_for_client

    async def noted(server: Any, stream: Any, rest: memoryview) -> None:
        waits.seen.append((shutdown.is_set(), len(rest)))
        waits.began.set()
        await wait_for_client(server, stream, rest)

    monkeypatch.setattr(
        tokenrelay.server._hypercorn.DirectWriteTCPServer, "_wait_for_client", noted
    )
    return waits


def a_relay(fake_server: FakeModelServer) -> QuartTrio:
    """A relay in front of the fake model whose answer (25 MB, all held) is more than sockets
    buffer, without a stall timeout."""
    fake_server.default = FakeScript(tokens=["x" * 65536] * 400)
    return tokenrelay.create_app(
        tokenrelay.ServerConfig(
            upstream=f"openai={fake_server.openai_url}",
            db=":memory:",
            stall_timeout=None,
            max_bytes=None,
        )
    )


@bounded(20)
async def test_shutdown_gives_up_a_write_no_client_reads_once_its_graceful_timeout_passes(
    fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A write waits (shielded, as hypercorn's do) for a client that reads nothing: hypercorn
    # cancels the connections once its graceful timeout has passed, and the shielded wait
    # would outlive that; the server would never stop. It is given up then, and the
    # connection closed. Here the wait was under way when shutdown began: a session's
    # answer replayed, whose first write (its first batch of events) no buffer can hold.
    app = a_relay(fake_server)
    shutdown = trio.Event()
    waits = note_waits(monkeypatch, shutdown)
    with trio.fail_after(10):
        async with trio.open_nursery() as serving:
            url = await serve_app(
                serving, app, graceful_timeout=0.5, shutdown_trigger=shutdown.wait
            )
            async with httpx2.AsyncClient(base_url=url) as client:
                answer = await client.post(
                    "/v1/chat/completions",
                    json=chat(stream=False),
                    headers={"X-Session-Id": "s"},
                )
                assert answer.status_code == 200
            waits.seen.clear()
            waits.began = trio.Event()
            reader = await RawHTTP.connect(url, receive_buffer=4096)
            await reader.send(b"GET /v1/sessions/s/stream HTTP/1.1\r\nHost: relay\r\n\r\n")
            await waits.began.wait()  # ... and it never reads
            shutdown.set()
            stopping = trio.current_time()
        stopped = trio.current_time()  # the server is done: every connection task has ended
    [(after_shutdown, size)] = waits.seen
    assert (after_shutdown, size > 8 << 20) == (False, True)
    assert stopped - stopping >= 0.5  # (it had its graceful timeout)
    assert await reader.closed_by_server()
    await reader.aclose()


@bounded(20)
async def test_shutdown_gives_up_a_write_begun_after_it_began_at_its_graceful_timeout(
    fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As above, for a wait that begins once shutdown has begun: the model answers after.
    app = a_relay(fake_server)
    fake_server.default = dataclasses.replace(fake_server.default, prefill=0.3)
    shutdown = trio.Event()
    waits = note_waits(monkeypatch, shutdown)
    with trio.fail_after(10):
        async with trio.open_nursery() as serving:
            url = await serve_app(
                serving, app, graceful_timeout=1.0, shutdown_trigger=shutdown.wait
            )
            reader = await RawHTTP.connect(url, receive_buffer=4096)
            body = json.dumps(chat()).encode()
            await reader.send(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nContent-Type: "
                b"application/json\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)
            )
            await fake_server.wait_for_requests(1)  # (its answer is 0.3 s away)
            shutdown.set()
            stopping = trio.current_time()
        stopped = trio.current_time()
    assert waits.seen
    assert all(after_shutdown for after_shutdown, _ in waits.seen)
    assert stopped - stopping >= 1.0
    assert await reader.closed_by_server()
    await reader.aclose()


#: Answers a request gets before its body is read: too large by its Content-Length, or with
#: a key the server does not know.
EARLY_ANSWERS = pytest.mark.parametrize(
    ("what", "authorization", "status"),
    [("over the size limit", "Bearer k", 413), ("without a valid key", "Bearer nope", 401)],
)


def big_post(length: int, *, authorization: str = "Bearer k") -> bytes:
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\nAuthorization: {authorization}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


@EARLY_ANSWERS
@bounded(20)
async def test_an_error_before_the_body_was_read_closes_or_keeps_the_connection_usable(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    what: str,
    authorization: str,
    status: int,
) -> None:
    served = await start_served(nursery, fake_server, max_body=1000, api_keys=("k",))
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 2000 + b'"}]}'

    # The body was never sent: the server cannot read past it, so it answers and closes.
    conn = await RawHTTP.connect(served.url)
    await conn.send(big_post(len(body), authorization=authorization))
    answered, _, error = await conn.response()
    assert (answered, error.startswith(b'{"error"')) == (status, True), what
    assert await conn.closed_by_server()
    await conn.aclose()

    # The body was sent whole: the connection stays usable for the next request.
    conn = await RawHTTP.connect(served.url)
    await conn.send(big_post(len(body), authorization=authorization) + body)
    assert (await conn.response())[0] == status
    await conn.send(HEALTHZ)
    assert (await conn.response())[0] == 200
    await conn.aclose()


@EARLY_ANSWERS
@bounded(20)
async def test_an_early_answer_waits_for_the_rest_of_a_short_body_and_keeps_the_connection(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    what: str,
    authorization: str,
    status: int,
) -> None:
    """The answer goes out while the body is still coming in: the connection is not closed
    under the client's next request (hypercorn closes it, without saying so, when the
    response ends before the body has all been read)."""
    served = await start_served(nursery, fake_server, max_body=1000, api_keys=("k",))
    body = b'{"messages": [{"role": "user", "content": "' + b"x" * 200_000 + b'"}]}'
    for _ in range(5):
        conn = await RawHTTP.connect(served.url)
        async with trio.open_nursery() as sending:
            sending.start_soon(conn.send, big_post(len(body), authorization=authorization) + body)
            answered, headers, _ = await conn.response()
        assert (answered, headers.get("connection")) == (status, None), what
        await conn.send(HEALTHZ)
        assert (await conn.response())[0] == 200
        await conn.aclose()


@bounded(20)
async def test_an_early_answer_before_a_long_body_says_it_closes(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, max_body=1000)
    conn = await RawHTTP.connect(served.url)
    await conn.send(big_post(10_000_000) + b"x" * 50_000)
    answered, headers, _ = await conn.response()
    assert (answered, headers.get("connection")) == (413, "close")
    assert await conn.closed_by_server()
    await conn.aclose()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/responses"])
@bounded(10)
async def test_a_body_that_stops_coming_is_answered_408_at_the_body_timeout_and_closed(
    nursery: trio.Nursery, fake_server: FakeModelServer, path: str
) -> None:
    served = await start_served(nursery, fake_server, body_timeout=0.5)
    conn = await RawHTTP.connect(served.url)
    sent_at = trio.current_time()
    await conn.send(big_post(500).replace(b"/v1/chat/completions", path.encode()) + b'{"mess')
    status, _, body = await conn.response()
    waited = trio.current_time() - sent_at
    assert status == 408
    assert json.loads(body)["error"] == {
        "message": "the request body did not arrive in time",
        "type": "invalid_request_error",
        "code": None,
    }
    assert 0.5 <= waited < 2.5
    assert await conn.closed_by_server()
    await conn.aclose()
    assert fake_server.requests == []  # nothing was started


@bounded(10)
async def test_a_client_that_hangs_up_mid_body_ends_the_wait_for_it(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(tokenrelay.server._asgi, "DRAIN_SECONDS", 20.0)  # ended by the hang-up
    served = await start_served(nursery, fake_server, max_body=1000)
    ended = served.request_ended()
    conn = await RawHTTP.connect(served.url)
    await conn.send(big_post(2000))  # a short body, never sent
    assert (await conn.response())[0] == 413
    await conn.stream.send_eof()  # the client is done
    await ended.wait()
    await conn.aclose()


async def h2_exchange(
    url: str, headers: list[tuple[str, str]], body: bytes | None
) -> tuple[dict[bytes, bytes], bytes]:
    """One request over HTTP/2 (cleartext, prior knowledge): its response's headers and body.
    ``body=None`` sends none, whatever the headers say."""
    stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.initiate_connection()
    stream_id = client.get_next_available_stream_id()
    base = [(":scheme", "http"), (":authority", "relay")]
    client.send_headers(stream_id, [*headers[:2], *base, *headers[2:]])
    if body is not None:
        client.send_data(stream_id, body, end_stream=True)
    await stream.send_all(client.data_to_send())
    response: dict[bytes, bytes] = {}
    data = bytearray()
    while True:
        events = client.receive_data(await stream.receive_some())
        for event in events:
            if isinstance(event, h2.events.ResponseReceived):
                response = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                data += event.data
                client.acknowledge_received_data(event.flow_controlled_length, stream_id)
        await stream.send_all(client.data_to_send())
        if any(isinstance(event, h2.events.StreamEnded) for event in events):
            break
    await stream.aclose()
    return response, bytes(data)


@bounded(10)
async def test_an_early_answer_over_http2_does_not_wait_for_the_body(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """HTTP/2 (cleartext, prior knowledge) ends a stream, never its connection: no wait."""
    monkeypatch.setattr(tokenrelay.server._asgi, "DRAIN_SECONDS", 20.0)  # a wait would show
    served = await start_served(nursery, fake_server, max_body=1000)
    headers = [(":method", "POST"), (":path", "/v1/chat/completions")]
    headers += [("content-length", "2000")]  # never sent
    response, _ = await h2_exchange(served.url, headers, None)
    assert response[b":status"] == b"413"


@bounded(10)
async def test_a_stream_the_upstream_refuses_is_an_http_error_over_http2_too(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    """The response is made before the upstream answers, and replaced by the error before
    anything of it is sent: on HTTP/2 as on HTTP/1 (test_server.py)."""
    fake_server.default = FakeScript(fault="status", status=429, message="busy", retry_after="3")
    served = await start_served(nursery, fake_server)
    body = json.dumps({"model": "fake", "stream": True, "messages": chat("hi")["messages"]})
    headers = [(":method", "POST"), (":path", "/v1/chat/completions")]
    headers += [("content-type", "application/json"), ("content-length", str(len(body)))]
    response, data = await h2_exchange(served.url, headers, body.encode())
    assert response[b":status"] == b"429"
    assert response[b"content-type"] == b"application/json"
    assert response[b"retry-after"] == b"3"
    assert json.loads(data)["error"]["type"] == "upstream_rate_limited"


@bounded(20)
async def test_an_http2_client_that_never_opens_its_window_holds_no_shutdown(
    fake_server: FakeModelServer,
) -> None:
    # An HTTP/2 client that gives the server no flow-control window (and never opens one):
    # a response's end waits for it. The server's shutdown cancels that wait at its graceful
    # timeout, as it does any request's (a shielded wait would have held it for ever).
    app = tokenrelay.create_app(
        tokenrelay.ServerConfig(upstream=f"openai={fake_server.openai_url}", db=":memory:")
    )
    shutdown = trio.Event()
    with trio.fail_after(10):
        async with trio.open_nursery() as serving:
            url = await serve_app(
                serving, app, graceful_timeout=0.5, shutdown_trigger=shutdown.wait
            )
            stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
            client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
            client.local_settings = h2.settings.Settings(
                client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
            )
            client.initiate_connection()
            base = [(":scheme", "http"), (":authority", "relay")]
            client.send_headers(1, [(":method", "GET"), (":path", "/healthz"), *base], True)
            await stream.send_all(client.data_to_send())
            answered = False
            while not answered:  # the response's head comes (its body cannot)
                events = client.receive_data(await stream.receive_some())
                answered = any(isinstance(e, h2.events.ResponseReceived) for e in events)
                await stream.send_all(client.data_to_send())
            shutdown.set()
            stopping = trio.current_time()
        stopped = trio.current_time()
    assert 0.5 <= stopped - stopping < 5
    await stream.aclose()


# The SDK leaves its async generators for trio to finalize (see test_openai_sdk.py).
@pytest.mark.filterwarnings(r"ignore:Async generator 'httpx2\.:ResourceWarning")
@pytest.mark.filterwarnings(r"ignore:Async generator 'httpcore2\.:ResourceWarning")
@bounded(30)
async def test_the_openai_sdk_carries_on_after_a_413(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    served = await start_served(nursery, fake_server, max_body=10_000)
    async with openai.AsyncOpenAI(
        base_url=f"{served.url}/v1", api_key="unused", max_retries=0, timeout=10
    ) as client:
        with pytest.raises(openai.APIStatusError) as refused:
            await client.chat.completions.create(
                model="fake", messages=chat("x" * 200_000)["messages"]
            )
        assert refused.value.status_code == 413
        completion = await client.chat.completions.create(
            model="fake", messages=chat("hi")["messages"]
        )
    assert completion.choices[0].message.content


@bounded(10)
async def test_cancelling_the_server_closes_its_upstream_connections_at_once() -> None:
    """``hypercorn.trio.serve`` cancelled by its parent never runs the lifespan shutdown; the
    upstream's connections are closed all the same, not left open for the garbage collector
    (which, mid-run, warned of an unclosed socket in whichever test it happened to run)."""
    upstream_closed = trio.Event()
    models = b'{"object":"list","data":[{"id":"raw","object":"model","owned_by":"test"}]}'

    async def upstream(stream: trio.SocketStream) -> None:
        received = b""
        while b"\r\n\r\n" not in received:
            received += await stream.receive_some()
        assert received.startswith(b"GET /v1/models ")
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(models), models)
        )
        # A keep-alive connection, idle in the relay's pool: it ends when the relay closes it.
        assert await stream.receive_some() == b""
        upstream_closed.set()

    async with trio.open_nursery() as nursery:
        listeners = await nursery.start(partial(trio.serve_tcp, upstream, 0, host="127.0.0.1"))
        port = listeners[0].socket.getsockname()[1]
        async with trio.open_nursery() as server:
            served = await start_served(
                server, FakeModelServer(), upstream=f"openai=http://127.0.0.1:{port}/v1"
            )
            conn = await RawHTTP.connect(served.url)
            await conn.send(b"GET /v1/models HTTP/1.1\r\nHost: relay\r\n\r\n")
            status, _, body = await conn.response()
            assert (status, json.loads(body)["data"][0]["id"]) == (200, "raw")
            await conn.aclose()
            server.cancel_scope.cancel()
        await upstream_closed.wait()
        nursery.cancel_scope.cancel()


STREAMS = pytest.mark.parametrize(
    ("path", "body", "last"),
    [
        (
            "/v1/chat/completions",
            {"model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]},
            b"data: [DONE]\n\n",
        ),
        ("/v1/responses", {"model": "fake", "stream": True, "input": "hi"}, b"response.completed"),
    ],
)


@STREAMS
@bounded(20)
async def test_a_stream_s_head_goes_out_with_its_opening_and_its_last_event_with_its_end(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    monkeypatch: pytest.MonkeyPatch,
    path: str,
    body: dict[str, Any],
    last: bytes,
) -> None:
    served = await start_served(nursery, fake_server)
    writes = record_writes(monkeypatch, served.url)
    data = json.dumps(body).encode()
    conn = await RawHTTP.connect(served.url)
    await conn.send(
        f"POST {path} HTTP/1.1\r\nHost: relay\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(data)}\r\nConnection: close\r\n\r\n".encode()
        + data
    )
    assert await conn.closed_by_server()
    await conn.aclose()
    # One write: the head and the stream's opening comment; one: the last event and the end
    # of the chunked body. Each was two.
    assert writes[0].startswith(b"HTTP/1.1 200")
    assert b": tokenrelay " in writes[0]
    assert last in writes[-1]
    assert writes[-1].endswith(b"\r\n0\r\n\r\n")
    assert all(not write.startswith(b"0\r\n") for write in writes)


@bounded(10)
async def test_a_json_response_is_one_write(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    served = await start_served(nursery, fake_server)
    writes = record_writes(monkeypatch, served.url)
    conn = await RawHTTP.connect(served.url)
    await conn.send(HEALTHZ_THEN_CLOSE)
    status, _, body = await conn.response()
    assert (status, json.loads(body)["status"]) == (200, "ok")
    assert await conn.closed_by_server()
    await conn.aclose()
    assert len(writes) == 1


@bounded(20)
async def test_a_host_app_s_own_streams_keep_their_heads_and_refusals_keep_its_headers(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The relay's routes hold a response's head until its first piece of body; the other
    routes of an app that mounts the relay do not. A refused stream is replaced whole, but
    for the headers the app's after_request hooks added (CORS, say)."""
    app = tokenrelay.create_app(
        tokenrelay.ServerConfig(upstream=f"openai={fake_server.openai_url}", db=":memory:")
    )
    first_piece = trio.Event()

    @app.get("/host-stream")
    async def host_stream() -> Any:
        async def body() -> Any:
            await first_piece.wait()
            yield b"late"

        return body(), 200, {"Content-Type": "text/plain"}

    @app.after_request
    async def cors(response: Any) -> Any:
        response.headers["Access-Control-Allow-Origin"] = "*"
        return response

    replaced = []
    answer = tokenrelay.server._responses.run_error_answer

    def spy(*args: Any) -> Any:
        replaced.append(args)
        return answer(*args)

    monkeypatch.setattr(tokenrelay.server._responses, "run_error_answer", spy)
    url = await serve_app(nursery, app)
    conn = await RawHTTP.connect(url)
    await conn.send(b"GET /host-stream HTTP/1.1\r\nHost: relay\r\n\r\n")
    while b"\r\n\r\n" not in conn.buffer:  # the head comes before the first piece
        conn.buffer += await conn.stream.receive_some()
    assert conn.buffer.startswith(b"HTTP/1.1 200")
    first_piece.set()
    await conn.aclose()

    fake_server.default = FakeScript(fault="status", status=429, message="busy", retry_after="3")
    async with httpx2.AsyncClient(base_url=url) as client:
        response = await client.post("/v1/chat/completions", json=chat(stream=True))
    assert response.status_code == 429
    assert response.headers["retry-after"] == "3"
    assert response.headers["access-control-allow-origin"] == "*"
    assert response.headers["content-type"] == "application/json"
    assert "cache-control" not in response.headers  # the stream's, not the error's
    assert len(replaced) == 1  # made as a stream, then replaced before anything was written


@bounded(20)
async def test_a_stream_s_head_is_made_before_its_first_piece_and_a_refusal_replaces_it(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On HTTP/1.1 a stream's head is made by hypercorn as soon as the app starts it, while
    the upstream has not answered, and kept unwritten until its first piece. A refusal then
    replaces the head made: in the framing h11 now writes (a chunked body), with hypercorn's
    own headers once, and the connection kept, or closed if the request asked for that."""
    made: list[tokenrelay.server._hypercorn.DirectWriteTCPServer] = []
    made_ahead = trio.Event()

    class Spy(tokenrelay.server._hypercorn.gathered_writes):
        async def __aexit__(self, *exc_info: Any) -> None:
            await super().__aexit__(*exc_info)
            if not self._write:
                made.extend(self._servers)
                made_ahead.set()

    monkeypatch.setattr(tokenrelay.server._asgi, "gathered_writes", Spy)
    logged: list[int] = []  # the status of each response, as hypercorn's access log has it

    async def access(self: object, scope: Any, response: Any, *_: Any) -> None:
        if scope["server"][1] == port_of(served.url):  # (not the fake model's)
            logged.append(response["status"])

    monkeypatch.setattr(hypercorn.logging.Logger, "access", access)
    fake_server.default = FakeScript(fault="no_headers")
    served = await start_served(nursery, fake_server, first_token_timeout=1.0)
    data = json.dumps(chat()).encode()
    head = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: relay\r\n"
        b"Content-Type: application/json\r\nContent-Length: %d\r\n" % len(data)
    )
    conn = await RawHTTP.connect(served.url)
    await conn.send(head + b"\r\n" + data)
    await made_ahead.wait()
    (server,) = made
    assert server._gathered.startswith(b"HTTP/1.1 200 ")
    with pytest.raises(BlockingIOError):  # nothing written yet
        os.read(conn.stream.socket.fileno(), 1)

    status, headers, body = await conn.response()
    assert status == 504
    assert json.loads(body)["error"]["type"] == "upstream_timeout"
    framing = {"content-length", "transfer-encoding", "connection", "date", "server"}
    names = [line.partition(":")[0].strip().lower() for line in conn.head_lines]
    assert sorted(name for name in names if name in framing) == [
        "date",
        "server",
        "transfer-encoding",
    ]
    assert headers["content-type"] == "application/json"
    assert "cache-control" not in headers  # the stream's, not the error's
    assert {"x-session-id", "x-run-id"} <= set(headers)

    fake_server.default = FakeScript()  # the same connection serves the next request
    await conn.send(head + b"\r\n" + data)
    status, _, body = await conn.response()
    assert status == 200
    assert body.endswith(b"data: [DONE]\n\n")

    fake_server.default = FakeScript(fault="no_headers")
    await conn.send(head + b"Connection: close\r\n\r\n" + data)
    status, headers, _ = await conn.response()
    assert (status, headers["connection"]) == (504, "close")
    assert await conn.closed_by_server()
    await conn.aclose()
    assert logged == [504, 200, 504]


async def test_request_messages_already_there_are_taken_without_a_schedule_point() -> None:
    """hypercorn's trio worker hands the app its request channel's ``receive``, a schedule
    point even for a message already there; a request's body comes as two messages (its bytes,
    then its end). ``CloseConnections`` takes what is there at once, and waits as before for
    what is not."""
    send, receive = trio.open_memory_channel[Any](10)
    received: list[tuple[str, int]] = []
    scope = {"type": "http", "http_version": "1.1", "headers": [(b"content-length", b"2")]}

    async def app(scope: Any, receive: Any, send_: Any) -> None:
        with own_steps() as steps:
            for _ in range(2):
                message = await receive()
                received.append((message["type"], steps.count))
        async with trio.open_nursery() as nursery:
            nursery.start_soon(receive_later, receive)
            await trio.testing.wait_all_tasks_blocked()
            send.send_nowait({"type": "http.disconnect"})

    async def receive_later(receive: Any) -> None:
        with own_steps() as steps:
            message = await receive()
        received.append((message["type"], steps.count))

    send.send_nowait({"type": "http.request", "body": b"{}", "more_body": True})
    send.send_nowait({"type": "http.request", "body": b"", "more_body": False})
    wrapped = tokenrelay.server._asgi.CloseConnections(app)
    await wrapped(scope, receive.receive, send.send)  # type: ignore[arg-type]
    assert received[:2] == [("http.request", 0), ("http.request", 0)]
    assert received[2][0] == "http.disconnect"
    assert received[2][1] > 0  # it waited
