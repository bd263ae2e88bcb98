"""hypercorn's trio worker with ``DirectWriteTCPServer`` (server/_hypercorn.py), as
``tokenrelay serve`` runs it: streamed writes go to the socket at once, what the kernel does
not take goes through hypercorn's own ``send_all``, and a client that vanishes is a closed
connection. Raw sockets and a raw ASGI app on 127.0.0.1."""

from __future__ import annotations

import hashlib
import logging
import socket
import struct
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import h2.config
import h2.connection
import h2.events
import h2.settings
import hypercorn.trio
import hypercorn.trio.run
import pytest
import trio
from hypercorn.config import Config
from hypercorn.events import Event, RawData

from _helpers import bounded
from _server_helpers import chunked_body, record_writes
from tokenrelay.server._hypercorn import (
    DirectWriteTCPServer,
    chunk_writer,
    gathered_writes,
    note_connection,
    use_direct_writes,
)

Receive = Callable[[], Awaitable[dict[str, Any]]]
Send = Callable[[dict[str, Any]], Awaitable[None]]
App = Callable[[dict[str, Any], Receive, Send], Awaitable[None]]


def chunk(i: int, size: int) -> bytes:
    return (f"{i:08d}" * (size // 8 + 1)).encode()[:size]


class StreamingApp:
    """Streams ``chunks`` body messages of ``size`` bytes; records how its response ended."""

    def __init__(self, chunks: int, size: int) -> None:
        self.chunks = chunks
        self.size = size
        self.sent = 0
        self.finished = trio.Event()
        self.disconnected = False

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(self._until_disconnect, receive, nursery.cancel_scope)
                await send({"type": "http.response.start", "status": 200, "headers": []})
                for i in range(self.chunks):
                    body = chunk(i, self.size)
                    await send({"type": "http.response.body", "body": body, "more_body": True})
                    self.sent += 1
                    # hypercorn's send to a closed connection returns without a checkpoint.
                    await trio.lowlevel.checkpoint()
                # Shielded: hypercorn tells of the disconnect, then closes, in this last send.
                with trio.CancelScope(shield=True):
                    await send({"type": "http.response.body", "body": b"", "more_body": False})
                nursery.cancel_scope.cancel()
        finally:
            self.finished.set()

    async def _until_disconnect(self, receive: Receive, done: trio.CancelScope) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass
        self.disconnected = True
        done.cancel()


async def serve(nursery: trio.Nursery, app: App, *, keep_alive_timeout: float = 5.0) -> int:
    assert use_direct_writes()
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tokenrelay.server")
    config.graceful_timeout = 0.5
    config.keep_alive_timeout = keep_alive_timeout
    binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
    return int(str(binds[0]).rsplit(":", 1)[1])


class SendAllCalls(list[int]):
    """Bytes of each ``SocketStream.send_all`` call, but for the test's own (a request
    written by a client through a stream made with :func:`client_stream`)."""

    def __init__(self) -> None:
        super().__init__()
        self.called = trio.Event()
        #: Whether a call carried a response head.
        self.head = False


def count_send_all(monkeypatch: pytest.MonkeyPatch) -> SendAllCalls:
    """The server's writes that wait for the client to take the rest: its own
    (``DirectWriteTCPServer._send_all``) and any through trio's ``send_all``."""
    calls = SendAllCalls()

    def note(data: Any) -> None:
        calls.append(len(data))
        calls.head |= bytes(data[:9]) == b"HTTP/1.1 "
        calls.called.set()

    waits = DirectWriteTCPServer._send_all
    send_all = trio.SocketStream.send_all

    async def waited(server: DirectWriteTCPServer, stream: Any, data: Any) -> None:
        note(data)
        await waits(server, stream, data)

    async def sent(self: trio.SocketStream, data: Any) -> None:
        if not getattr(self.socket, "is_client", False):
            note(data)
        await send_all(self, data)

    monkeypatch.setattr(DirectWriteTCPServer, "_send_all", waited)
    monkeypatch.setattr(trio.SocketStream, "send_all", sent)
    return calls


async def client_stream(port: int, receive_buffer: int | None = None) -> trio.SocketStream:
    sock = trio.socket.socket()
    sock.is_client = True  # type: ignore[attr-defined]
    if receive_buffer is not None:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, receive_buffer)
    await sock.connect(("127.0.0.1", port))
    return trio.SocketStream(sock)


async def read_response(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (the requests say ``Connection: close``)."""
    received = bytearray()
    while data := await stream.receive_some(1 << 16):
        received += data
    return bytes(received)


async def fetch(port: int) -> bytes:
    """The de-chunked body of a whole response to ``REQUEST``."""
    async with await client_stream(port) as stream:
        await stream.send_all(REQUEST)
        return chunked_body(await read_response(stream))


REQUEST = b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"


def test_the_worker_is_hypercorns_own_class_with_direct_writes() -> None:
    assert use_direct_writes()
    assert hypercorn.trio.run.TCPServer is DirectWriteTCPServer  # type: ignore[attr-defined]
    assert use_direct_writes()  # idempotent


@bounded(10)
async def test_streamed_writes_go_to_the_socket_without_send_all(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    app = StreamingApp(chunks=200, size=100)
    port = await serve(nursery, app)
    calls = count_send_all(monkeypatch)
    assert await fetch(port) == b"".join(chunk(i, 100) for i in range(200))
    assert calls == []  # the head, 200 chunks and the end: each taken by the kernel at once


@bounded(20)
async def test_what_the_kernel_does_not_take_goes_through_send_all_in_order(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # 16 MiB to a client that reads nothing at first: the socket's buffers fill, a write is
    # taken in part (or not at all) and hypercorn's shielded send_all waits for the rest.
    app = StreamingApp(chunks=64, size=256 << 10)
    port = await serve(nursery, app)
    calls = count_send_all(monkeypatch)
    stream = await client_stream(port, receive_buffer=4096)
    async with stream:
        await stream.send_all(REQUEST)
        await calls.called.wait()  # the server is waiting in send_all: the client is behind
        assert app.sent < app.chunks
        response = await read_response(stream)
    body = chunked_body(response)
    expected = b"".join(chunk(i, 256 << 10) for i in range(64))
    assert len(body) == len(expected)
    assert hashlib.sha256(body).digest() == hashlib.sha256(expected).digest()
    # The head went to the socket directly, and so did the start of the body: send_all
    # carried only the rest.
    assert not calls.head
    assert sum(calls) < len(response)
    await app.finished.wait()  # closed within its last send: it ends right after


class Ticker:
    """Counts its task's steps: another task's stand-in, to see how often it gets to run."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await trio.lowlevel.checkpoint()


class TightLoopApp:
    """Writes ``chunks`` pieces of ``size`` bytes back to back, with nothing else to wait for;
    notes after each write how many times the test's ticker had run."""

    def __init__(self, chunks: int, size: int) -> None:
        self.chunks = chunks
        self.size = size
        self.ticker = Ticker()
        self.seen: list[int] = []

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(self.chunks):
            body = chunk(i, self.size)
            await send({"type": "http.response.body", "body": body, "more_body": True})
            self.seen.append(self.ticker.ticks)
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.mark.parametrize("size", [40, 16 << 10])
@bounded(10)
async def test_a_writer_with_nothing_else_to_wait_for_still_lets_other_tasks_run(
    nursery: trio.Nursery, size: int
) -> None:
    # A write the kernel takes whole passes no schedule point after one passed elsewhere, but
    # writes one after another do: the ticker runs at least once per two writes, small or
    # large (every batch of the scheduler runs both tasks).
    app = TightLoopApp(chunks=2000 if size < 1000 else 64, size=size)
    port = await serve(nursery, app)
    nursery.start_soon(app.ticker.run)
    assert await fetch(port) == b"".join(chunk(i, size) for i in range(app.chunks))
    ran = app.seen[-1] - app.seen[0]
    assert ran >= (app.chunks - 1) // 2 - 1, app.seen


@bounded(10)
async def test_each_read_passes_a_schedule_point_when_the_protocol_passes_none() -> None:
    # A read that finds data passes no schedule point; the loop passes one after handing it
    # to the protocol, unless the read waited or the protocol passed one. Here a protocol
    # that never yields, and a client that keeps data waiting: a ticker runs at least once
    # per two reads.
    client, server_sock = trio.socket.socketpair()
    reads: list[int] = []
    ticker = Ticker()

    class Protocol:
        async def handle(self, event: Event) -> None:
            if type(event) is RawData:
                reads.append(ticker.ticks)

    server = DirectWriteTCPServer.__new__(DirectWriteTCPServer)
    server.config = Config()
    server.stream = trio.SocketStream(server_sock)  # type: ignore[assignment]
    server.protocol = Protocol()  # type: ignore[assignment]
    async with server.stream, trio.open_nursery() as outer:
        outer.start_soon(ticker.run)
        async with trio.open_nursery() as reading:
            reading.start_soon(server._read_data)  # until the client's end
            async with trio.SocketStream(client) as stream:
                await stream.send_all(b"x" * (4 << 20))
        outer.cancel_scope.cancel()
    assert len(reads) > 20
    assert reads[-1] - reads[0] >= (len(reads) - 1) // 2 - 1, reads


@bounded(10)
async def test_a_client_that_resets_mid_stream_is_a_closed_connection(
    nursery: trio.Nursery, caplog: pytest.LogCaptureFixture
) -> None:
    app = StreamingApp(chunks=1_000_000, size=1000)
    port = await serve(nursery, app)
    stream = await client_stream(port)
    await stream.send_all(REQUEST)
    await stream.receive_some(1 << 16)  # streaming
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()  # a reset, not an orderly end
    await app.finished.wait()  # told of the disconnect, it stopped
    assert app.disconnected
    assert app.sent < app.chunks
    # The server goes on serving.
    small = StreamingApp(chunks=3, size=10)
    port = await serve(nursery, small)
    assert await fetch(port) == b"".join(chunk(i, 10) for i in range(3))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


class GatheringApp:
    """Answers with a head, ``pieces`` and the end; ``gather`` says which sends are made in
    one ``gathered_writes`` block: "head+first", "last+end", or "all"."""

    def __init__(self, pieces: list[bytes], gather: str) -> None:
        self.pieces = pieces
        self.gather = gather

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        start = {"type": "http.response.start", "status": 200, "headers": []}
        body = [
            {"type": "http.response.body", "body": piece, "more_body": True}
            for piece in self.pieces
        ]
        end = {"type": "http.response.body", "body": b"", "more_body": False}
        messages = [start, *body, end]
        if self.gather == "all":
            async with gathered_writes():
                for message in messages:
                    await send(message)
            return
        cut = 2 if self.gather == "head+first" else len(messages) - 2
        together = messages[:cut] if self.gather == "head+first" else messages[cut:]
        if self.gather == "head+first":
            async with gathered_writes():
                for message in together:
                    await send(message)
            for message in messages[cut:]:
                await send(message)
        else:
            for message in messages[:cut]:
                await send(message)
            async with gathered_writes():
                for message in together:
                    await send(message)


async def lifespan(receive: Receive, send: Send) -> None:
    """An ASGI app's lifespan: every message acknowledged, until the shutdown."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


@pytest.mark.parametrize(
    ("gather", "expected"),
    [
        # The head and the first piece; the second piece; the end.
        ("head+first", [("HTTP/1.1 200", b"one"), (b"two",), (b"0\r\n\r\n",)]),
        # The head; the first piece; the last piece and the end.
        ("last+end", [("HTTP/1.1 200",), (b"one",), (b"two", b"0\r\n\r\n")]),
        # Everything.
        ("all", [("HTTP/1.1 200", b"one", b"two", b"0\r\n\r\n")]),
    ],
)
@bounded(10)
async def test_gathered_writes_are_one_write(
    nursery: trio.Nursery,
    monkeypatch: pytest.MonkeyPatch,
    gather: str,
    expected: list[tuple[Any, ...]],
) -> None:
    port = await serve(nursery, GatheringApp([b"one", b"two"], gather))
    writes = record_writes(monkeypatch)
    assert await fetch(port) == b"onetwo"
    assert len(writes) == len(expected), writes
    for write, parts in zip(writes, expected, strict=True):
        for part in parts:
            assert (part.encode() if isinstance(part, str) else part) in write, (part, write)


class InterleavingApp:
    """Gathers its head, then lets another task write a piece of the body (ASGI allows any
    task of the app to send) before its block ends: that write must carry the head first."""

    def __init__(self, start_inside: bool) -> None:
        self.start_inside = start_inside

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        go, wrote = trio.Event(), trio.Event()

        async def other() -> None:
            await go.wait()
            await send({"type": "http.response.body", "body": b"other", "more_body": True})
            wrote.set()

        async with trio.open_nursery() as nursery:
            if not self.start_inside:
                nursery.start_soon(other)
            async with gathered_writes():
                await send({"type": "http.response.start", "status": 200, "headers": []})
                if self.start_inside:  # it inherits the block's context, not its gathering
                    nursery.start_soon(other)
                go.set()
                await wrote.wait()
                await send({"type": "http.response.body", "body": b"mine", "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@pytest.mark.parametrize("start_inside", [False, True])
@bounded(10)
async def test_a_write_from_another_task_writes_what_was_gathered_first(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, start_inside: bool
) -> None:
    port = await serve(nursery, InterleavingApp(start_inside))
    writes = record_writes(monkeypatch)
    assert await fetch(port) == b"othermine"
    # The other task's write carried the gathered head before its own piece; the block's
    # end wrote its own piece.
    assert writes[0].startswith(b"HTTP/1.1 200")
    assert writes[0].endswith(b"5\r\nother\r\n")
    assert writes[1] == b"4\r\nmine\r\n"


class PipelinedApp:
    """``/a``: a one-byte response whose head and body are gathered; ``/b``: three pieces
    ``interval`` apart, then ``end``."""

    def __init__(self, interval: float) -> None:
        self.interval = interval

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        if scope["path"] == "/a":
            async with gathered_writes():
                head = [(b"content-length", b"1")]
                await send({"type": "http.response.start", "status": 200, "headers": head})
                await send({"type": "http.response.body", "body": b"a"})
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(3):
            await trio.sleep(self.interval)
            await send({"type": "http.response.body", "body": b"%d\n" % i, "more_body": True})
        await send({"type": "http.response.body", "body": b"end\n"})


@bounded(30)
async def test_a_pipelined_request_is_not_cut_by_the_keep_alive_timeout(
    nursery: trio.Nursery,
) -> None:
    # The first response ends with its bytes gathered, so hypercorn's "idle again" comes
    # with a write; the second request, already there, must not be overtaken by it: its
    # response, longer than the keep-alive timeout, is not cut. (A race: several tries.)
    port = await serve(nursery, PipelinedApp(0.12), keep_alive_timeout=0.2)
    for _ in range(8):
        async with await client_stream(port) as stream:
            await stream.send_all(
                b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\n\r\n"
            )
            received = b""
            while not received.endswith(b"end\n\r\n0\r\n\r\n"):
                data = await stream.receive_some()
                assert data, f"cut after {received!r}"
                received += data


class PartialChunkApp:
    """Writes a 256 KiB chunk with ``write_chunk_now`` to a client that reads nothing yet:
    the kernel takes part of it, the rest is pending. A flush cancelled before it writes
    must keep it pending; then it is flushed, and the body ends."""

    def __init__(self) -> None:
        self.kept = False
        self.written = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        note_connection(scope, send)  # as the relay's ASGI wrapper does
        server = chunk_writer(scope)
        assert server is not None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"head", "more_body": True})
        assert server.write_chunk_now(chunk(0, 256 << 10))
        assert server.pending, "the kernel took 256 KiB at once: no partial write to test"
        with trio.CancelScope() as scope_:
            scope_.cancel()
            await server.flush()
        self.kept = server.pending
        self.written.set()
        await server.flush()
        await send({"type": "http.response.body", "body": b"", "more_body": False})


@bounded(10)
async def test_a_flush_cancelled_before_it_writes_keeps_what_is_pending(
    nursery: trio.Nursery,
) -> None:
    app = PartialChunkApp()
    port = await serve(nursery, app)
    async with await client_stream(port, receive_buffer=4096) as stream:
        await stream.send_all(REQUEST)
        await app.written.wait()
        response = await read_response(stream)
    assert app.kept
    assert chunked_body(response) == b"head" + chunk(0, 256 << 10)


class KeptChunkApp:
    """Writes the head and a first piece, waits until its client has reset the connection,
    then offers a chunk with ``write_chunk_now``: refused as it is, taken and kept with
    ``keep``, for the flush to find the connection gone."""

    def __init__(self) -> None:
        self.outcomes: dict[str, object] = {}
        self.done = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        note_connection(scope, send)
        server = chunk_writer(scope)
        assert server is not None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"head", "more_body": True})
        while (await receive())["type"] != "http.disconnect":
            pass
        try:
            self.outcomes["plain"] = (server.write_chunk_now(b"lost"), server.pending)
            self.outcomes["kept"] = (server.write_chunk_now(b"kept", keep=True), server.pending)
            await server.flush()  # finds the connection gone, and says so to hypercorn
            self.outcomes["flushed"] = server.pending
        finally:
            self.done.set()


@bounded(10)
async def test_a_chunk_kept_for_a_connection_gone_is_taken_and_the_flush_finds_it_gone(
    nursery: trio.Nursery,
) -> None:
    # A writer whose rendering moves on with each event cannot have a chunk refused and
    # make it again: with ``keep`` the chunk is taken even when the kernel takes nothing
    # (here, the connection is gone), and the stream's own flush is the one to find out.
    app = KeptChunkApp()
    port = await serve(nursery, app)
    async with await client_stream(port) as stream:
        await stream.send_all(REQUEST)
        received = b""
        while not received.endswith(b"head\r\n"):
            received += await stream.receive_some()
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await app.done.wait()  # (closed with a linger of 0: a reset)
    assert app.outcomes == {"plain": (False, False), "kept": (True, True), "flushed": False}


async def test_chunks_are_written_at_once_only_for_a_body_of_http_1_1_from_hypercorn(
    nursery: trio.Nursery,
) -> None:
    seen: dict[tuple[str, str, bool], bool] = {}

    async def app(scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        wrapped = scope["path"] == "/wrapped"

        async def through(message: dict[str, Any]) -> None:
            await send(message)

        note_connection(scope, through if wrapped else send)
        key = (scope["http_version"], scope["method"], wrapped)
        seen[key] = chunk_writer(scope) is not None
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    port = await serve(nursery, app)
    for request in (
        b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"HEAD / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
        b"GET / HTTP/1.0\r\n\r\n",
        b"GET /wrapped HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n",
    ):
        async with await client_stream(port) as stream:
            await stream.send_all(request)
            await read_response(stream)
    assert seen == {
        ("1.1", "GET", False): True,
        ("1.1", "HEAD", False): False,  # a response to HEAD has no body
        ("1.0", "GET", False): False,  # no chunks in HTTP/1.0
        ("1.1", "GET", True): False,  # a wrapper between hypercorn and the app sees it all
    }


class DeafApp:
    """Writes ``chunks`` pieces of 1,000 bytes and its end, never listening for the client's
    disconnect (an ASGI app need not)."""

    def __init__(self, chunks: int) -> None:
        self.chunks = chunks
        self.finished = trio.Event()

    async def __call__(self, scope: dict[str, Any], receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await lifespan(receive, send)
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for i in range(self.chunks):
            await send({"type": "http.response.body", "body": chunk(i, 1000), "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})
        self.finished.set()


@bounded(10)
async def test_an_http2_stream_s_writes_held_back_are_let_go_when_the_connection_closes(
    nursery: trio.Nursery,
) -> None:
    # Its client gives the stream no window and then closes the connection: the writes
    # held back (server/_h2_flow.py) end, though the app never asks whether its client left.
    app = DeafApp(chunks=1000)
    port = await serve(nursery, app)
    stream = await client_stream(port)
    client = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
    client.local_settings = h2.settings.Settings(
        client=True, initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0}
    )
    client.initiate_connection()
    headers = [(":method", "GET"), (":path", "/"), (":scheme", "http"), (":authority", "x")]
    client.send_headers(1, headers, end_stream=True)
    await stream.send_all(client.data_to_send())
    answered = False
    while not answered:  # the response's head comes (its body cannot)
        events = client.receive_data(await stream.receive_some())
        answered = any(isinstance(e, h2.events.ResponseReceived) for e in events)
    await stream.aclose()
    await app.finished.wait()
