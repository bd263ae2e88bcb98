"""A stream's tokens written by its run's producer: over HTTP/1.1 on plain TCP, while the
response's task waits for the next events, the producer writes each one as a chunk of the
response's body at once (``Subscription.receive_batch``'s ``deliver``; server/_responses.py,
_responses_api.py and ``DirectWriteTCPServer.write_chunk_now``). The response's own task
writes the opening, what the kernel takes only in part, keep-alives and the end; HTTP/1.0
streams are its own.
Raw sockets and httpx2 against the real server on 127.0.0.1."""

from __future__ import annotations

import json
import os
import re
import socket
from collections.abc import Callable
from types import SimpleNamespace
from typing import Any

import httpx2
import pytest
import trio

import tokenrelay
from _helpers import bounded
from _server_helpers import (
    SSEReader,
    chat,
    chunked_body,
    record_writes,
    seqs,
    serve_app,
    start_served,
    text_of,
)
from tokenrelay.server import _hypercorn
from tokenrelay.server._hypercorn import DirectWriteTCPServer
from tokenrelay.server._responses_render import ResponseRenderer
from tokenrelay.testing import FakeModelServer, FakeScript
from tokenrelay.upstreams._lines import LineSplitter, SSEEvent, SSEParser

#: Far enough apart that the response's task is waiting when each arrives.
PACED = FakeScript(tokens=[f"tok{i} " for i in range(8)], prefill=0.05, interval=0.05)


def producer_tasks(tasks: list[str]) -> list[bool]:
    return [name.startswith("tokenrelay ") for name in tasks]


async def stream_chat(url: str, model: str) -> tuple[list[SSEEvent], bytes]:
    async with (
        httpx2.AsyncClient(base_url=url) as client,
        client.stream("POST", "/v1/chat/completions", json=chat(model=model)) as response,
        SSEReader(response) as reader,
    ):
        assert response.http_version == "HTTP/1.1"
        return await reader.all(), bytes(reader.raw)


async def serve_paced(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> tuple[str, list[bytes], list[str]]:
    """The relay in front of the ``paced`` model; its URL, and its writes from now on with
    the name of the task that made each."""
    fake_server.add_model("paced", PACED)
    served = await start_served(nursery, fake_server)
    tasks: list[str] = []
    return served.url, record_writes(monkeypatch, served.url, tasks=tasks), tasks


@bounded(20)
async def test_each_token_is_written_by_the_runs_producer(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, writes, tasks = await serve_paced(nursery, fake_server, monkeypatch)
    events, _ = await stream_chat(url, "paced")
    assert text_of(events) == "".join(PACED.tokens)
    assert seqs(events) == list(range(9))  # eight tokens and the finish
    tokens = list(zip(producer_tasks(tasks), writes, strict=True))
    by_producer = [data for mine, data in tokens if mine]
    # Every token (and the finish) but the first, which may ride on the opening: one write
    # each, one chunk of the body, written by the producer.
    assert len(by_producer) >= 8
    for data in by_producer:
        size, _, rest = data.partition(b"\r\n")
        assert int(size, 16) == len(rest) - 2
        assert rest.startswith(b"id: ")
        assert rest.endswith(b"\n\n\r\n")
    # The response's own task wrote the opening (the head with it) and the end.
    assert tokens[0][0] is False
    assert tokens[0][1].startswith(b"HTTP/1.1 200")
    assert tokens[-1][0] is False
    assert tokens[-1][1].endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


@bounded(20)
async def test_an_http_1_0_stream_is_written_by_its_own_task(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # HTTP/1.0 has no chunks: the body ends with the connection, and every write is the
    # response's task's, through hypercorn.
    url, _, tasks = await serve_paced(nursery, fake_server, monkeypatch)
    host, port, request = raw_chat(url, "paced", http="1.0")
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(request)
        received = await read_to_end(stream)
    head, _, raw = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert b"transfer-encoding" not in head.lower()
    events = parse_sse(raw)
    assert text_of(events) == "".join(PACED.tokens)
    assert events[-1].data == "[DONE]"
    assert tasks
    assert not any(producer_tasks(tasks))


@bounded(30)
async def test_a_chunk_the_kernel_takes_in_part_is_finished_by_the_streams_task(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Tokens of 256 KiB to a client that reads nothing at first: the socket takes only
    # part of the first the producer writes (its buffers are smaller); the stream's task
    # writes the rest, waiting for the client, and the stream goes on whole and in order.
    big = [f"{i}" * (256 << 10) for i in range(8)]
    received, tasks = await read_slowly_until_flushed(
        nursery, fake_server, monkeypatch, big, lambda url: raw_chat(url, "big")
    )
    events = parse_sse(chunked_body(received))
    assert text_of(events) == "".join(big)
    assert seqs(events) == list(range(9))
    assert events[-1].data == "[DONE]"
    assert any(producer_tasks(tasks))


@bounded(20)
async def test_tokens_written_by_the_producer_keep_the_stream_from_its_keep_alives(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    # The stream's task waits across all the tokens; they restart its quiet spell: no
    # keep-alive comment while tokens come more often than keepalive.
    script = FakeScript(tokens=[f"t{i} " for i in range(16)], prefill=0.05, interval=0.05)
    fake_server.add_model("paced", script)
    served = await start_served(nursery, fake_server, keepalive=0.2)
    events, raw = await stream_chat(served.url, "paced")
    assert text_of(events) == "".join(script.tokens)
    assert b"keep-alive" not in raw


@bounded(20)
async def test_a_stream_answering_head_has_no_body(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    # hypercorn writes no body for HEAD (werkzeug answers HEAD on every GET route), and
    # neither does the producer.
    fake_server.add_model("paced", PACED)
    served = await start_served(nursery, fake_server)
    async with httpx2.AsyncClient(base_url=served.url) as client:
        payload = chat(model="paced")
        headers = {"X-Session-Id": "s"}
        async with client.stream(
            "POST", "/v1/chat/completions", json=payload, headers=headers
        ) as response:
            assert response.status_code == 200
            host, port = host_and_port(served.url)
            async with await trio.open_tcp_stream(host, port) as stream:
                await stream.send_all(
                    f"HEAD /v1/sessions/s/stream HTTP/1.1\r\nHost: {host}\r\n"
                    "Connection: close\r\n\r\n".encode()
                )
                received = await read_to_end(stream)
            await response.aread()
    head, _, rest = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200")
    assert rest == b""


@bounded(20)
async def test_a_middleware_around_the_app_sees_every_byte(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_server.add_model("paced", PACED)
    app = tokenrelay.create_app(
        tokenrelay.ServerConfig(upstream=f"openai={fake_server.openai_url}", db=":memory:")
    )
    seen = bytearray()
    inner = app.asgi_app

    async def recording(scope: Any, receive: Any, send: Any) -> None:
        async def send_recorded(message: Any) -> None:
            if message["type"] == "http.response.body":
                seen.extend(message.get("body", b""))
            await send(message)

        await inner(scope, receive, send_recorded)

    app.asgi_app = recording  # type: ignore[method-assign]
    url = await serve_app(nursery, app)
    tasks: list[str] = []
    record_writes(monkeypatch, url, tasks=tasks)
    events, raw = await stream_chat(url, "paced")
    assert text_of(events) == "".join(PACED.tokens)
    assert bytes(seen) == raw
    assert not any(producer_tasks(tasks))


@bounded(20)
async def test_each_responses_api_event_is_written_by_the_runs_producer(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The Responses API's stream too: its renderer moves on with each event it renders, so
    # each is rendered once, by the producer here, and numbered once.
    url, writes, tasks = await serve_paced(nursery, fake_server, monkeypatch)
    async with (
        httpx2.AsyncClient(base_url=url) as client,
        client.stream(
            "POST", "/v1/responses", json={"model": "paced", "input": "hi", "stream": True}
        ) as response,
        SSEReader(response) as reader,
    ):
        events = await reader.all()
    bodies = [json.loads(event.data) for event in events]
    assert [body["sequence_number"] for body in bodies] == list(range(len(bodies)))
    deltas = [body["delta"] for body in bodies if body["type"] == "response.output_text.delta"]
    assert "".join(deltas) == "".join(PACED.tokens)
    assert bodies[-1]["type"] == "response.completed"
    by_producer = [data for mine, data in zip(producer_tasks(tasks), writes, strict=True) if mine]
    assert len(by_producer) >= len(PACED.tokens)  # (the opening is only the response's head)
    for data in by_producer:
        size, _, rest = data.partition(b"\r\n")
        assert int(size, 16) == len(rest) - 2
        assert rest.startswith(b"event: response.")


@bounded(30)
async def test_a_responses_api_chunk_the_kernel_takes_in_part_is_finished_by_its_task(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As for a chat stream, to a client that reads nothing at first: what the producer
    # rendered and the kernel did not take is written by the stream's task, never rendered
    # again (the events' numbers would repeat, and the text with them).
    big = [f"{i}" * (256 << 10) for i in range(6)]
    received, tasks = await read_slowly_until_flushed(
        nursery, fake_server, monkeypatch, big, lambda url: raw_responses(url, "big")
    )
    bodies = [json.loads(event.data) for event in parse_sse(chunked_body(received))]
    assert [body["sequence_number"] for body in bodies] == list(range(len(bodies)))
    deltas = [body["delta"] for body in bodies if body["type"] == "response.output_text.delta"]
    assert deltas == big
    assert bodies[-1]["type"] == "response.completed"
    assert bodies[-1]["response"]["output"][0]["content"][0]["text"] == "".join(big)
    assert any(producer_tasks(tasks))


def in_producer() -> bool:
    return trio.lowlevel.current_task().name.startswith("tokenrelay ")


async def stream_responses(url: str, model: str) -> list[dict[str, Any]]:
    async with (
        httpx2.AsyncClient(base_url=url) as client,
        client.stream(
            "POST", "/v1/responses", json={"model": model, "input": "hi", "stream": True}
        ) as response,
        SSEReader(response) as reader,
    ):
        return [json.loads(event.data) for event in await reader.all()]


def check_responses_events(bodies: list[dict[str, Any]], tokens: list[str]) -> None:
    """Each event once, in order, and the text whole."""
    assert [body["sequence_number"] for body in bodies] == list(range(len(bodies)))
    deltas = [body["delta"] for body in bodies if body["type"] == "response.output_text.delta"]
    assert deltas == tokens
    assert bodies[-1]["type"] == "response.completed"
    assert bodies[-1]["response"]["output"][0]["content"][0]["text"] == "".join(tokens)


def refuse_producer_writes(
    monkeypatch: pytest.MonkeyPatch, refuse: Callable[[bytes], bool]
) -> None:
    """The producer's direct writes that ``refuse`` picks find the socket's buffer full
    (``BlockingIOError``: the kernel takes none of the chunk). Over :func:`record_writes`,
    if it was called first."""
    real = _hypercorn.os.write

    def write(fd: int, data: Any) -> int:
        if in_producer() and refuse(bytes(data)):
            raise BlockingIOError
        return real(fd, data)

    fake_os = SimpleNamespace(write=write, read=os.read, name=os.name)
    monkeypatch.setattr(_hypercorn, "os", fake_os)


@bounded(20)
async def test_a_responses_api_chunk_the_kernel_takes_none_of_is_written_once(
    nursery: trio.Nursery, fake_server: FakeModelServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The case ``keep`` is for: the producer rendered the events, and the kernel took none of
    # them. They are kept and written by the stream's task, never rendered again. And the
    # last ones, refused as the run ends (keep-alives racing), go out before the ending.
    fake_server.add_model("paced", PACED)
    served = await start_served(nursery, fake_server, keepalive=0.02)
    refused: list[bytes] = []

    def refuse(data: bytes) -> bool:
        if len(refused) < 3 or b"tok7" in data:
            refused.append(data)
            return True
        return False

    tasks: list[str] = []
    record_writes(monkeypatch, served.url, tasks=tasks)
    refuse_producer_writes(monkeypatch, refuse)
    bodies = await stream_responses(served.url, "paced")
    assert len(refused) >= 4
    assert any(b"tok7" in data for data in refused)
    check_responses_events(bodies, PACED.tokens)
    assert any(producer_tasks(tasks))


@bounded(20)
async def test_a_responses_api_deliver_failing_after_rendering_renders_nothing_again(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Should the producer's rendering or write fail once the renderer has moved on, the
    # events are not rendered again by the stream's task (their numbers would repeat, or
    # skip): the stream ends with the error, as when its own rendering fails.
    fake_server.add_model("paced", PACED)
    served = await start_served(nursery, fake_server)
    feed = ResponseRenderer.feed
    raised: list[str] = []

    def failing_feed(self: ResponseRenderer, data: str) -> list[dict[str, Any]]:
        out = feed(self, data)
        if in_producer() and not raised:
            raised.append(data)
            raise RuntimeError("boom")
        return out

    monkeypatch.setattr(ResponseRenderer, "feed", failing_feed)
    host, port, request = raw_responses(served.url, "paced")
    async with await trio.open_tcp_stream(host, port) as stream:
        await stream.send_all(request)
        received = await read_to_end(stream)
    assert raised
    # (A stream cut short by the error: its body's chunks end with the connection.)
    bodies = [json.loads(data) for data in re.findall(rb"^data: (\{.*\})$", received, re.M)]
    assert bodies
    assert [body["sequence_number"] for body in bodies] == list(range(len(bodies)))
    deltas = [body["delta"] for body in bodies if body["type"] == "response.output_text.delta"]
    assert deltas == PACED.tokens[: len(deltas)]
    assert len(deltas) < len(PACED.tokens)  # cut short by the error


async def read_slowly_until_flushed(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    monkeypatch: pytest.MonkeyPatch,
    big: list[str],
    request_for: Callable[[str], tuple[str, int, bytes]],
) -> tuple[bytes, list[str]]:
    """The relay in front of a ``big`` model answering ``big``, sent ``request_for(url)`` by a
    client with a 4 KiB receive buffer that reads nothing until the stream's task flushes
    what the producer's write left: the whole response, and the writing tasks' names."""
    fake_server.add_model("big", FakeScript(tokens=big, prefill=0.05, interval=0.05))
    served = await start_served(nursery, fake_server)
    flushed = trio.Event()
    flush = DirectWriteTCPServer.flush

    async def recording_flush(self: DirectWriteTCPServer) -> None:
        if self.pending:
            flushed.set()
        await flush(self)

    monkeypatch.setattr(DirectWriteTCPServer, "flush", recording_flush)
    tasks: list[str] = []
    record_writes(monkeypatch, served.url, tasks=tasks)
    host, port, request = request_for(served.url)
    sock = trio.socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    await sock.connect((host, port))
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(request)
        with trio.fail_after(10):  # (a kernel that took every chunk whole would not do)
            await flushed.wait()
        return await read_to_end(stream), tasks


def host_and_port(url: str) -> tuple[str, int]:
    host, port = url.removeprefix("http://").split(":")
    return host, int(port)


def raw_chat(url: str, model: str, *, http: str = "1.1") -> tuple[str, int, bytes]:
    """Where to send it, and a streaming chat request for ``model`` as raw bytes (HTTP/1.1
    ones say ``Connection: close``: the response ends with the connection)."""
    host, port = host_and_port(url)
    body = json.dumps(chat(model=model)).encode()
    close = "Connection: close\r\n" if http == "1.1" else ""
    head = (
        f"POST /v1/chat/completions HTTP/{http}\r\nHost: {host}\r\n{close}"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode() + body


def raw_responses(url: str, model: str) -> tuple[str, int, bytes]:
    """As :func:`raw_chat`, a streaming Responses API request."""
    host, port = host_and_port(url)
    body = json.dumps({"model": model, "input": "hi", "stream": True}).encode()
    head = (
        f"POST /v1/responses HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    )
    return host, port, head.encode() + body


async def read_to_end(stream: trio.SocketStream) -> bytes:
    received = bytearray()
    while data := await stream.receive_some(1 << 16):
        received += data
    return bytes(received)


def parse_sse(raw: bytes) -> list[SSEEvent]:
    splitter, parser = LineSplitter(1 << 22), SSEParser()
    events = []
    for line in [*splitter.feed(raw), *splitter.close()]:
        event: Any = parser.feed_line(line)
        if event is not None:
            events.append(event)
    return events
