"""HTTP/2 streams and their clients' flow-control windows (server/_h2_flow.py): a stream's
writes are held back while two frames of it wait for its client, a stream whose client takes
nothing is given up (reset, its connection's other streams going on), and a client that takes
it slowly, or at once, gets all of it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import h2.errors
import h2.events
import h2.settings
import pytest
import trio
from h2.config import H2Configuration
from h2.connection import H2Connection
from hypercorn.protocol.events import Body
from hypercorn.protocol.h2 import H2Protocol

import tokenrelay
from _helpers import LoggedEvent, bounded
from _server_helpers import chat, port_of, serve_app, start_served
from tokenrelay.testing import FakeModelServer, FakeScript

#: A 2 MB answer, made as fast as the relay takes it.
BIG = FakeScript(tokens=["x" * 1000] * 2000)


class H2Client:
    """One HTTP/2 connection (cleartext, prior knowledge), written with ``h2``. What the
    server sends is taken in as it comes; the data of the streams in :attr:`reading` is
    acknowledged at once (their windows reopened), of the others not."""

    def __init__(self, stream: trio.SocketStream, connection: H2Connection) -> None:
        self.stream = stream
        self.connection = connection
        self.reading: set[int] = set()
        self.heads: dict[int, dict[bytes, bytes]] = {}
        self.bodies: dict[int, bytearray] = {}
        self.ended: set[int] = set()
        self.resets: dict[int, int] = {}
        self.pinged = False
        self.closed = False

    @classmethod
    @contextlib.asynccontextmanager
    async def open(cls, url: str, *, window: int | None = None) -> AsyncIterator[H2Client]:
        """``window``: the initial flow-control window of every stream (h2's default 65,535
        if ``None``; 0 gives the server none until the client opens it)."""
        stream = await trio.open_tcp_stream("127.0.0.1", port_of(url))
        async with stream:
            connection = H2Connection(H2Configuration(client_side=True))
            if window is not None:
                connection.local_settings = h2.settings.Settings(
                    client=True,
                    initial_values={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: window},
                )
            connection.initiate_connection()
            client = cls(stream, connection)
            await client.flush()
            yield client

    def request(
        self, method: str, path: str, body: object = None, *, read: bool = True, session: str = "s"
    ) -> int:
        """Start a request (sent with the next :meth:`flush`) in ``session``; its stream's id.
        ``read``: acknowledge its data as it comes."""
        stream_id = self.connection.get_next_available_stream_id()
        headers = [(":method", method), (":path", path), (":scheme", "http")]
        headers += [(":authority", "relay"), ("x-session-id", session)]
        if body is None:
            self.connection.send_headers(stream_id, headers, end_stream=True)
        else:
            data = json.dumps(body).encode()
            self.connection.send_headers(stream_id, [*headers, ("content-length", str(len(data)))])
            self.connection.send_data(stream_id, data, end_stream=True)
        if read:
            self.reading.add(stream_id)
        self.bodies[stream_id] = bytearray()
        return stream_id

    def open_window(self, stream_id: int, size: int) -> None:
        self.connection.increment_flow_control_window(size, stream_id)

    async def flush(self) -> None:
        await self.stream.send_all(self.connection.data_to_send())

    async def until(self, done: Callable[[], bool]) -> None:
        """Take in what the server sends until ``done()`` (or the server closes)."""
        while not done() and not self.closed:
            await self.receive()

    async def receive(self) -> None:
        data = await self.stream.receive_some()
        if not data:
            self.closed = True
            return
        for event in self.connection.receive_data(data):
            if isinstance(event, h2.events.ResponseReceived):
                self.heads[event.stream_id] = dict(event.headers)
            elif isinstance(event, h2.events.DataReceived):
                self.bodies[event.stream_id] += event.data
                if event.stream_id in self.reading:
                    self.connection.acknowledge_received_data(
                        event.flow_controlled_length, event.stream_id
                    )
                elif event.flow_controlled_length:  # (the connection's window, not the stream's)
                    self.connection.increment_flow_control_window(event.flow_controlled_length)
            elif isinstance(event, h2.events.StreamEnded):
                self.ended.add(event.stream_id)
            elif isinstance(event, h2.events.StreamReset):
                self.resets[event.stream_id] = event.error_code
            elif isinstance(event, h2.events.PingAckReceived):
                self.pinged = True
        await self.flush()

    async def ping(self) -> None:
        """Ping, and wait for the answer: the connection is up."""
        self.pinged = False
        self.connection.ping(b"tokenrly")
        await self.flush()
        await self.until(lambda: self.pinged)
        assert self.pinged


@pytest.fixture
def handed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The bytes of response body the app has handed hypercorn's HTTP/2 protocol."""
    counted = [0]
    stream_send = H2Protocol.stream_send

    async def counting(protocol: H2Protocol, event: Any) -> None:
        if isinstance(event, Body):
            counted[0] += len(event.data)
        await stream_send(protocol, event)

    monkeypatch.setattr(H2Protocol, "stream_send", counting)
    return counted


def text_of(body: bytes) -> str:
    """The text of an SSE stream of chat completion chunks."""
    text = []
    for line in body.decode().splitlines():
        if line.startswith("data: {"):
            for choice in json.loads(line[6:])["choices"]:
                text.append(choice["delta"].get("content") or "")
    return "".join(text)


@bounded(30)
async def test_a_stream_whose_window_stays_shut_is_held_back_then_reset(
    nursery: trio.Nursery,
    fake_server: FakeModelServer,
    stalled_log: LoggedEvent,
    handed: list[int],
) -> None:
    # hypercorn lets an HTTP/2 stream's writes pile up without limit while its client keeps
    # the stream's window shut (docs/upstream-bugs.md). They are held back instead: the
    # stream's write waits, the stall check sees it, drops the stream's hold on its run and
    # resets the stream. The run was not held back, and the connection stays up.
    fake_server.default = BIG
    served = await start_served(nursery, fake_server, stall_timeout=0.3, grace=0.5)
    async with H2Client.open(served.url, window=0) as client:
        stream_id = client.request("POST", "/v1/chat/completions", chat(), read=False)
        await client.flush()
        await client.until(lambda: stream_id in client.resets)
        assert client.resets[stream_id] == h2.errors.ErrorCodes.CANCEL
        assert len(stalled_log.records) == 1
        run = served.run("s")
        assert run.subscriber_count == 0
        await run.wait_finished()
        assert run.status is tokenrelay.RunStatus.DONE
        assert handed[0] < 256_000  # (of 2 MB and more)
        await client.ping()


@bounded(30)
async def test_a_stalled_stream_is_reset_and_its_connection_s_other_streams_go_on(
    nursery: trio.Nursery, fake_server: FakeModelServer, stalled_log: LoggedEvent
) -> None:
    # Browsers share one connection per origin between tabs: one tab that stops reading
    # must not cut the others' streams.
    fake_server.add_model("big", BIG)
    fake_server.default = FakeScript(tokens=[f"t{i} " for i in range(100)], interval=0.01)
    served = await start_served(nursery, fake_server, stall_timeout=0.3, grace=0.5)
    async with H2Client.open(served.url, window=0) as client:
        stalled = client.request("POST", "/v1/chat/completions", chat(model="big"), read=False)
        read = client.request("POST", "/v1/chat/completions", chat(), session="other")
        client.open_window(read, 65535)
        await client.flush()
        await client.until(lambda: read in client.ended)
        assert stalled in client.resets
        assert read not in client.resets
        assert text_of(client.bodies[read]) == "".join(f"t{i} " for i in range(100))
        assert client.bodies[read].endswith(b"data: [DONE]\n\n")
        assert not client.closed


@bounded(30)
async def test_a_stream_held_back_ends_when_its_client_resets_it(
    nursery: trio.Nursery, fake_server: FakeModelServer, handed: list[int]
) -> None:
    fake_server.default = BIG
    served = await start_served(nursery, fake_server, stall_timeout=60)
    ended = served.request_ended()
    async with H2Client.open(served.url, window=0) as client:
        stream_id = client.request("POST", "/v1/chat/completions", chat(), read=False)
        await client.flush()
        await fake_server.wait_for_requests(1)
        run = served.run("s")
        await run.wait_finished()  # all 2 MB made: the stream's writer waits, held back
        assert handed[0] < 256_000
        assert not ended.is_set()
        client.connection.reset_stream(stream_id)
        await client.flush()
        await ended.wait()  # the writer let go: the request is over
        assert run.subscriber_count == 0


@bounded(30)
async def test_a_whole_answer_whose_window_stays_shut_is_given_up(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    # Not a stream: the answer's write waits for a window the client never opens, and is
    # given up, its stream reset, once the client has taken nothing of it for the fuse.
    fake_server.default = FakeScript(tokens=["x" * 1000] * 200)
    served = await start_served(nursery, fake_server, write_fuse=0.3)
    async with H2Client.open(served.url, window=0) as client:
        stream_id = client.request("POST", "/v1/chat/completions", chat(stream=False), read=False)
        await client.flush()
        asked = trio.current_time()
        await client.until(lambda: stream_id in client.resets)
        assert trio.current_time() - asked >= 0.3
        assert client.heads[stream_id][b":status"] == b"200"
        await client.ping()


@bounded(30)
async def test_an_answer_replayed_whole_comes_whole_to_a_client_that_reads_it(
    nursery: trio.Nursery, fake_server: FakeModelServer
) -> None:
    # A finished 2 MB answer replayed: its first write holds it all, and is let go bit by bit
    # as the client takes it.
    fake_server.default = BIG
    served = await start_served(nursery, fake_server, stall_timeout=5, max_bytes=None)
    async with H2Client.open(served.url) as client:
        answered = client.request("POST", "/v1/chat/completions", chat(stream=False))
        await client.flush()
        await client.until(lambda: answered in client.ended)
        replay = client.request("GET", "/v1/sessions/s/stream")
        await client.flush()
        await client.until(lambda: replay in client.ended)
        assert text_of(client.bodies[replay]) == "x" * 2_000_000
        assert client.bodies[replay].endswith(b"data: [DONE]\n\n")


@bounded(30)
async def test_a_slow_but_steady_reader_is_not_taken_for_a_stalled_one(
    nursery: trio.Nursery, fake_server: FakeModelServer, stalled_log: LoggedEvent
) -> None:
    # A finished 200 KB answer replayed to a client that opens its window 16 KiB at a time,
    # every 50 ms: longer in all than the stall timeout, in one held-back write. It never
    # stops taking: it is not stalled, and gets the whole stream.
    fake_server.default = FakeScript(tokens=["x" * 1000] * 200)
    served = await start_served(nursery, fake_server, stall_timeout=0.3)
    async with H2Client.open(served.url, window=0) as client:
        answered = client.request("POST", "/v1/chat/completions", chat(stream=False))
        client.open_window(answered, 1 << 20)
        await client.flush()
        await client.until(lambda: answered in client.ended)
        replay = client.request("GET", "/v1/sessions/s/stream", read=False)
        await client.flush()
        started = trio.current_time()
        while replay not in client.ended:
            client.open_window(replay, 16384)
            await client.flush()
            with trio.move_on_after(0.05):  # (a slow client)
                await client.until(lambda: False)
            assert not client.closed
            assert replay not in client.resets
        assert trio.current_time() - started > 0.3  # (longer than the stall timeout)
        assert text_of(client.bodies[replay]) == "x" * 200_000
        assert not stalled_log.records


@bounded(30)
async def test_a_connection_whose_streams_were_all_given_up_closes_at_once_at_shutdown(
    fake_server: FakeModelServer,
) -> None:
    # A stream given up is closed as hypercorn closes one: its connection, with no other
    # stream, is idle, and a shutdown closes it at once rather than at its graceful timeout.
    fake_server.default = BIG
    app = tokenrelay.create_app(
        tokenrelay.ServerConfig(
            upstream=f"openai={fake_server.openai_url}", db=":memory:", stall_timeout=0.3
        )
    )
    shutdown = trio.Event()
    async with trio.open_nursery() as serving:
        url = await serve_app(
            serving, app, graceful_timeout=10, keep_alive_timeout=60, shutdown_trigger=shutdown.wait
        )
        async with H2Client.open(url, window=0) as client:
            ids = [
                client.request("POST", "/v1/chat/completions", chat(), read=False, session=f"s{i}")
                for i in range(20)
            ]
            await client.flush()
            await client.until(lambda: all(stream_id in client.resets for stream_id in ids))
            stopping = trio.current_time()
            shutdown.set()
            await client.until(lambda: False)  # until the server closes the connection
    assert trio.current_time() - stopping < 5  # (not the graceful timeout's 10 s)
