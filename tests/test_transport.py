"""The upstream client's direct connections (httpx2 over the lean trio backend), against small
raw servers on 127.0.0.1 whose every byte the test controls. Real time, bounded. Proxies:
test_proxy.py."""

from __future__ import annotations

import inspect
import json
import os
import socket
import ssl
import struct
import time
import types
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import httpcore2
import httpx2
import pytest
import trio
import trio.lowlevel
import trio.testing
import trustme
from httpcore2._backends.trio import TrioStream

import tokenrelay
import tokenrelay.upstreams._transport
from _helpers import bounded
from tokenrelay.upstreams._http import HTTPDeltaStream
from tokenrelay.upstreams._transport import (
    LeanTrioBackend,
    ShardedPool,
    _LeanStream,
    _PromptLock,
    lean_body,
    request_sent,
    use_lean_backend,
)

HELLO = b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello"

Handler = Callable[[trio.abc.Stream], Awaitable[None]]


async def _read_request(stream: trio.abc.Stream) -> bytes:
    """One request without a body, up to its blank line."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = await stream.receive_some()
        if not chunk:
            break
        data += chunk
    return data


async def _serve(nursery: trio.Nursery, handler: Handler) -> int:
    listeners = await nursery.start(partial(trio.serve_tcp, handler, 0, host="127.0.0.1"))
    port: int = listeners[0].socket.getsockname()[1]
    return port


@bounded(10)
async def test_reads_plain_tcp_directly_and_reuses_the_connection(nursery: trio.Nursery) -> None:
    connections = 0

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        while await _read_request(stream):
            await stream.send_all(HELLO)

    port = await _serve(nursery, handler)
    async with tokenrelay.http_client() as client:
        first = await client.get(f"http://127.0.0.1:{port}/")
        second = await client.get(f"http://127.0.0.1:{port}/")
    assert (first.text, second.text) == ("hello", "hello")
    assert isinstance(first.extensions["network_stream"], _LeanStream)
    assert connections == 1


@pytest.mark.parametrize("poll", ["select.epoll", "no select.epoll (not Linux)"])
@bounded(10)
async def test_an_idle_connection_the_server_closed_is_not_reused(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, poll: str
) -> None:
    # The pool asks each idle connection whether its socket is readable (the server hung
    # up); the lean stream answers from the backend's epoll set, or where there is no
    # select.epoll, httpcore2's own check does. A wrong answer would send the second request
    # down the dead connection and fail it.
    if poll != "select.epoll":
        # The transport's view of the select module, as on Windows (trio's stays as it is).
        monkeypatch.setattr(tokenrelay.upstreams._transport, "select", types.ModuleType("select"))
    connections = 0
    hang_up = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        await _read_request(stream)
        await stream.send_all(HELLO)
        await hang_up.wait()
        await stream.aclose()  # a keep-alive timeout, without "Connection: close"

    port = await _serve(nursery, handler)
    async with tokenrelay.http_client() as client:
        first = await client.get(f"http://127.0.0.1:{port}/")
        stream = first.extensions["network_stream"]
        assert isinstance(stream, _LeanStream)
        assert (stream._readiness is not None) == (poll == "select.epoll")
        assert stream.get_extra_info("is_readable") is False
        hang_up.set()
        await trio.lowlevel.wait_readable(stream.get_extra_info("socket"))  # the hang-up is here
        assert stream.get_extra_info("is_readable") is True
        second = await client.get(f"http://127.0.0.1:{port}/")
    assert (first.text, second.text) == ("hello", "hello")
    assert connections == 2


@bounded(10)
async def test_one_readiness_check_tells_which_of_many_idle_connections_were_hung_up(
    nursery: trio.Nursery,
) -> None:
    # The pool asks every idle connection in one pass, without yielding: one epoll_wait
    # answers them all, each about its own socket; the next step asks the kernel again.
    hang_up = trio.Event()
    connections: list[int] = []  # the client's port of each connection, in accept order

    async def handler(stream: trio.SocketStream) -> None:
        index = len(connections)
        connections.append(stream.socket.getpeername()[1])
        while await _read_request(stream):
            await stream.send_all(HELLO)
            if index in (1, 3):  # the server hangs up its second and fourth connections
                await hang_up.wait()
                await stream.aclose()
                return

    port = await _serve(nursery, handler)  # type: ignore[arg-type]
    url = f"http://127.0.0.1:{port}/"
    # One pool (not split into shards), so that every request may reuse any live connection.
    async with tokenrelay.http_client(max_connections=ShardedPool.SHARD_CONNECTIONS) as client:
        assert type(client._transport._pool) is httpcore2.AsyncConnectionPool  # type: ignore[attr-defined]
        responses: list[httpx2.Response] = []

        async def get() -> None:
            responses.append(await client.get(url))

        async with trio.open_nursery() as requests:  # five connections at once
            for _ in range(5):
                requests.start_soon(get)
        streams = [response.extensions["network_stream"] for response in responses]
        assert len(set(map(id, streams))) == len(connections) == 5
        readiness = streams[0]._readiness
        assert readiness is not None
        assert all(stream._readiness is readiness for stream in streams)
        counted = CountingEpoll(readiness._epoll)
        readiness._epoll = counted  # type: ignore[assignment]
        assert [stream.get_extra_info("is_readable") for stream in streams] == [False] * 5
        assert counted.polls == 1  # one system call answered the five
        hung_up = [
            stream
            for stream in streams
            if stream.get_extra_info("socket").getsockname()[1] in (connections[1], connections[3])
        ]
        hang_up.set()
        for stream in hung_up:
            await trio.lowlevel.wait_readable(stream.get_extra_info("socket"))
        answers = [stream.get_extra_info("is_readable") for stream in streams]  # in one step
        assert answers == [stream in hung_up for stream in streams]
        assert counted.polls == 2  # asked again after the task yielded, once
        # The pool drops the two dead connections, and the requests reuse live ones.
        for _ in range(3):
            response = await client.get(url)
            assert response.text == "hello"
            assert response.extensions["network_stream"] not in hung_up
        assert len(connections) == 5
    assert readiness._epoll is None  # every connection closed: the epoll set too


class Holding:
    """A server that holds every request until ``release`` is set, and answers at once
    after. It counts the connections made and the requests that arrived; ``all_in`` is set
    once ``expected`` requests are held."""

    def __init__(self, expected: int) -> None:
        self.expected = expected
        self.release = trio.Event()
        self.all_in = trio.Event()
        self.connections = 0
        self.arrived = 0

    async def handler(self, stream: trio.abc.Stream) -> None:
        self.connections += 1
        while await _read_request(stream):
            self.arrived += 1
            if self.arrived == self.expected:
                self.all_in.set()
            await self.release.wait()
            await stream.send_all(HELLO)


def _sharded(client: httpx2.AsyncClient) -> ShardedPool:
    pool = client._transport._pool  # type: ignore[attr-defined]
    assert isinstance(pool, ShardedPool)
    return pool


async def test_a_big_pool_is_split_into_shards_with_its_settings() -> None:
    async with tokenrelay.http_client(max_connections=100) as client:
        shards = _sharded(client).shards
    assert [shard._max_connections for shard in shards] == [15, 15, 14, 14, 14, 14, 14]
    assert [shard._max_keepalive_connections for shard in shards] == [15, 15, 14, 14, 14, 14, 14]
    assert {shard._keepalive_expiry for shard in shards} == {30.0}
    # One backend, so one epoll set answers for every shard's idle connections.
    assert len({id(shard._network_backend) for shard in shards}) == 1
    assert isinstance(shards[0]._network_backend, LeanTrioBackend)
    # No limit (sys.maxsize to httpcore2), or a very high one: at most MAX_SHARDS shards.
    unlimited = httpx2.AsyncHTTPTransport(limits=httpx2.Limits(max_connections=None))
    async with httpx2.AsyncClient(transport=unlimited) as client:
        use_lean_backend(client)
        assert len(_sharded(client).shards) == ShardedPool.MAX_SHARDS
    # Small pools and HTTP/2 pools stay whole.
    async with tokenrelay.http_client(max_connections=16) as client:
        assert type(client._transport._pool) is httpcore2.AsyncConnectionPool  # type: ignore[attr-defined]
    transport = httpx2.AsyncHTTPTransport(http2=True, limits=httpx2.Limits(max_connections=100))
    async with httpx2.AsyncClient(transport=transport) as client:
        use_lean_backend(client)
        assert type(transport._pool) is httpcore2.AsyncConnectionPool
        assert isinstance(transport._pool._network_backend, LeanTrioBackend)


@bounded(10)
async def test_concurrent_requests_spread_over_shards_sequential_ones_reuse_a_connection(
    nursery: trio.Nursery,
) -> None:
    # Each shard is a pool of its own: a pass walks one shard's connections. Concurrent
    # requests go where there is most room; one at a time, they reuse one idle connection.
    server = Holding(40)
    url = f"http://127.0.0.1:{await _serve(nursery, server.handler)}/"
    async with tokenrelay.http_client(max_connections=40) as client:  # 3 shards: 14, 13, 13
        pool = _sharded(client)
        async with trio.open_nursery() as requests:
            for _ in range(40):
                requests.start_soon(client.get, url)
            await server.all_in.wait()
            # Every shard full, and not one request more than its limit.
            assert [len(shard.connections) for shard in pool.shards] == [14, 13, 13]
            server.release.set()
        assert server.connections == 40
        for _ in range(5):
            response = await client.get(url)
            assert response.text == "hello"
        assert server.connections == 40  # reused, no new connection
        assert len(pool.connections) == 40


@bounded(10)
async def test_an_idle_shard_with_a_connection_to_reuse_is_preferred_to_an_empty_one(
    nursery: trio.Nursery,
) -> None:
    # The first request goes to shard 0 and the second, sent while the first is held, to
    # shard 1. The first's answer closes its connection, so shard 0 is left empty. The next
    # request goes to shard 1 and reuses its connection rather than opening one in shard 0.
    connections = 0
    arrived = trio.Event()
    release = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        nonlocal connections
        connections += 1
        while request := await _read_request(stream):
            if request.startswith(b"GET /close "):
                arrived.set()
                await release.wait()
                await stream.send_all(
                    b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 5\r\n\r\nhello"
                )
                return
            await stream.send_all(HELLO)

    url = f"http://127.0.0.1:{await _serve(nursery, handler)}"
    async with tokenrelay.http_client(max_connections=34) as client:
        pool = _sharded(client)
        async with trio.open_nursery() as requests:
            requests.start_soon(client.get, url + "/close")
            await arrived.wait()
            assert (await client.get(url + "/keep")).text == "hello"
            release.set()
        assert [len(shard.connections) for shard in pool.shards] == [0, 1, 0]
        assert (await client.get(url + "/next")).text == "hello"
        assert connections == 2  # /next reused /keep's connection
        assert [len(shard.connections) for shard in pool.shards] == [0, 1, 0]


@bounded(10)
async def test_waiting_requests_take_the_first_room_made_in_any_shard_in_turn(
    nursery: trio.Nursery,
) -> None:
    # A request waits only when every shard is full, and then for the first connection freed
    # anywhere (not only in one shard), the waiting requests in the order they came, as in
    # one pool of the same limit.
    answer: dict[str, trio.Event] = {}
    arrived: list[str] = []
    all_in = trio.Event()
    late_in = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        while request := await _read_request(stream):
            path = request.split(b" ")[1].decode()
            arrived.append(path)
            answer.setdefault(path, trio.Event())
            if len(arrived) == 34:
                all_in.set()
            if path.startswith("/late"):
                late_in.set()
            await answer[path].wait()
            await stream.send_all(HELLO)

    port = await _serve(nursery, handler)
    url = f"http://127.0.0.1:{port}"
    async with tokenrelay.http_client(max_connections=34) as client:  # 3 shards: 12, 11, 11
        pool = _sharded(client)
        done: list[str] = []

        async def get(path: str) -> None:
            await client.get(url + path)
            done.append(path)

        async with trio.open_nursery() as requests:
            for i in range(34):
                requests.start_soon(get, f"/{i}")
            await all_in.wait()
            for path in ("/late-1", "/late-2"):  # no room anywhere: they wait, in this order
                answer[path] = trio.Event()
                requests.start_soon(get, path)
                await trio.testing.wait_all_tasks_blocked()
            assert [len(shard._requests) for shard in pool.shards] == [12, 11, 11]
            assert len(pool._queue) == 2
            # A request of the last shard ends: the first waiting one takes its room.
            freed = pool.shards[-1]._requests[0].request.url.target.decode()
            answer[freed].set()
            await late_in.wait()
            await trio.testing.wait_all_tasks_blocked()
            assert arrived[34:] == ["/late-1"]  # /late-2 still waits: no other room made
            assert done == [freed]
            assert len(pool._queue) == 1
            assert [len(shard._requests) for shard in pool.shards] == [12, 11, 11]
            for event in answer.values():
                event.set()
        assert sorted(done) == sorted(answer)
        assert len(pool.connections) == 34  # the waiting requests reused connections
        assert not pool._queue


@bounded(10)
async def test_a_request_waiting_for_room_honours_the_pool_timeout_and_cancellation(
    nursery: trio.Nursery,
) -> None:
    server = Holding(20)
    url = f"http://127.0.0.1:{await _serve(nursery, server.handler)}/"
    limits = httpx2.Limits(max_connections=20)
    async with httpx2.AsyncClient(limits=limits, timeout=httpx2.Timeout(None, pool=0.05)) as client:
        use_lean_backend(client)
        pool = _sharded(client)
        async with trio.open_nursery() as requests:
            for _ in range(20):
                requests.start_soon(client.get, url)
            await server.all_in.wait()
            with pytest.raises(httpx2.PoolTimeout):
                await client.get(url)
            with trio.move_on_after(0.01):  # cancelled while it waits
                await client.get(url, timeout=httpx2.Timeout(None))
            assert not pool._queue  # neither is left in the line
            server.release.set()
        assert (await client.get(url)).text == "hello"


@bounded(10)
async def test_idle_shards_close_their_expired_connections(
    nursery: trio.Nursery, mock_clock: trio.testing.MockClock
) -> None:
    # Requests go to the first idle shard with connections, so the others make no pass of
    # their own; the sweep, due once per keep-alive expiry, makes it for them. (Expired
    # connections: what every httpcore2 pass closes. Before httpcore2 2.17, a pass closed
    # the idle connections the server had hung up too; from 2.17, the one a request picks.)
    server = Holding(20)
    url = f"http://127.0.0.1:{await _serve(nursery, server.handler)}/"
    limits = httpx2.Limits(max_connections=20, keepalive_expiry=5.0)
    async with httpx2.AsyncClient(limits=limits) as client:
        use_lean_backend(client)
        pool = _sharded(client)  # 2 shards of 10
        async with trio.open_nursery() as requests:
            for _ in range(20):
                requests.start_soon(client.get, url)
            await server.all_in.wait()
            server.release.set()
        assert [len(shard.connections) for shard in pool.shards] == [10, 10]
        streams = [c._connection._network_stream for c in pool.connections]  # type: ignore[attr-defined]
        expired = time.monotonic() - 1  # (httpcore2 times the keep-alive on this clock)
        for connection in pool.connections:
            connection._connection._expire_at = expired  # type: ignore[attr-defined]
        mock_clock.jump(pool._sweep_at - trio.current_time())  # the next request sweeps first
        response = await client.get(url)
        assert response.text == "hello"
        assert len(pool.connections) == 1  # the 20 expired ones closed, in both shards
        assert all(stream.get_extra_info("socket").fileno() == -1 for stream in streams)


class CountingEpoll:
    """An epoll object that counts its ``poll`` calls."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.polls = 0

    def poll(self, *args: Any) -> Any:
        self.polls += 1
        return self.inner.poll(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


@bounded(10)
async def test_a_reset_connection_is_a_read_error(nursery: trio.Nursery) -> None:
    async def handler(stream: trio.abc.Stream) -> None:
        await _read_request(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nhalf")
        assert isinstance(stream, trio.SocketStream)
        # Linger 0: closing sends a reset, not an orderly end.
        stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        await stream.aclose()

    port = await _serve(nursery, handler)
    async with (
        tokenrelay.http_client() as client,
        client.stream("GET", f"http://127.0.0.1:{port}/") as response,
    ):
        with pytest.raises(httpx2.ReadError):
            await response.aread()


@bounded(10)
async def test_tls_upstreams_work_through_the_same_transport(nursery: trio.Nursery) -> None:
    ca = trustme.CA()
    server_context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("localhost").configure_cert(server_context)
    client_context = ssl.create_default_context()
    ca.configure_trust(client_context)

    answer = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await _read_request(tls)
        await answer.wait()
        await tls.send_all(HELLO)
        await tls.aclose()

    port = await _serve(nursery, handler)
    sent = trio.Event()
    response: httpx2.Response | None = None

    async def get(client: httpx2.AsyncClient) -> None:
        nonlocal response
        request_sent.set(sent)  # as HTTPDeltaStream does around its request
        response = await client.get(f"https://localhost:{port}/")

    async with httpx2.AsyncClient(verify=client_context) as client:
        use_lean_backend(client)
        async with trio.open_nursery() as requests:
            requests.start_soon(get, client)
            await sent.wait()  # told with the request out and its answer not yet there
            assert response is None
            answer.set()
    assert response is not None
    assert response.text == "hello"
    stream = response.extensions["network_stream"]
    assert isinstance(stream, _LeanStream)
    assert stream.get_extra_info("ssl_object") is not None


@bounded(10)
async def test_the_transports_own_settings_are_kept(nursery: trio.Nursery) -> None:
    # Only the network backend changes: whatever the transport was built with still applies.
    async def handler(stream: trio.abc.Stream) -> None:
        await _read_request(stream)
        await stream.send_all(HELLO)
        await trio.sleep_forever()  # keep the connection open, to look at its socket

    port = await _serve(nursery, handler)
    transport_options = [(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)]
    transport = httpx2.AsyncHTTPTransport(
        retries=2, local_address="127.0.0.1", socket_options=transport_options
    )
    async with httpx2.AsyncClient(transport=transport) as client:
        use_lean_backend(client)
        response = await client.get(f"http://127.0.0.1:{port}/")
        stream = response.extensions["network_stream"]
        assert isinstance(stream, _LeanStream)
        sock = stream.get_extra_info("socket")
        assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
        assert sock.getsockname()[0] == "127.0.0.1"
    pool = transport._pool
    assert isinstance(pool, ShardedPool)  # httpx2's default limit of 100: split, each shard alike
    assert {(shard._retries, shard._local_address) for shard in pool.shards} == {(2, "127.0.0.1")}
    assert {id(shard._socket_options) for shard in pool.shards} == {id(transport_options)}


async def test_connections_through_a_proxy_keep_httpx2s_own_backend() -> None:
    def backend(transport: httpx2.AsyncBaseTransport | None) -> object:
        return transport._pool._network_backend  # type: ignore[union-attr]

    # A proxy for every URL: httpx2 mounts a proxy transport, which is left alone.
    async with httpx2.AsyncClient(proxy="http://127.0.0.1:9") as client:
        use_lean_backend(client)
        [mounted] = client._mounts.values()
        assert not isinstance(backend(mounted), LeanTrioBackend)
    # A proxy as the default transport itself.
    transport = httpx2.AsyncHTTPTransport(proxy="http://127.0.0.1:9")
    async with httpx2.AsyncClient(transport=transport) as client:
        use_lean_backend(client)
        assert not isinstance(backend(transport), LeanTrioBackend)


async def test_a_lean_read_of_a_socket_closed_meanwhile_is_a_read_error() -> None:
    """The pool may close a connection's socket from another task between two reads: the
    next read raises httpcore2's ReadError (what trio's recv gave), every time."""
    ours, theirs = trio.socket.socketpair()
    lean = _LeanStream(TrioStream(trio.SocketStream(ours)))
    ours.close()
    for _ in range(2):
        with pytest.raises(httpcore2.ReadError):
            await lean.read(1024)
    theirs.close()


async def test_lean_reads_wait_first_then_read_at_once_after_a_full_read() -> None:
    """A read waits for the socket and then reads it; one that filled its buffer is followed
    by one that reads at once (more is waiting, as a rule). Nothing is lost either way."""
    ours, theirs = trio.socket.socketpair()
    lean = _LeanStream(TrioStream(trio.SocketStream(ours)))
    payload = bytes(range(256)) * 40  # 10,240 bytes
    received = b""
    async with trio.open_nursery() as nursery:

        async def send_later() -> None:
            await trio.testing.wait_all_tasks_blocked()  # the reader is waiting
            await theirs.send(payload)

        nursery.start_soon(send_later)
        received += await lean.read(1024)  # waited, then read: the buffer is full
        assert lean._full
        while len(received) < len(payload):
            received += await lean.read(4096)
    assert received == payload
    assert not lean._full  # the last read did not fill its buffer
    ours.close()
    theirs.close()


async def _read_post(stream: trio.abc.Stream) -> bytes:
    """One request with a Content-Length body: its body."""
    data = await _read_request(stream)
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
    while len(body) < length:
        body += await stream.receive_some()
    return body


def record_socket_writes(monkeypatch: pytest.MonkeyPatch) -> list[bytes]:
    """What the lean streams hand the kernel directly, write by write, from now on."""
    writes: list[bytes] = []

    def write(fd: int, data: Any) -> int:
        sent = os.write(fd, data)
        writes.append(bytes(data[:sent]))
        return sent

    monkeypatch.setattr(
        tokenrelay.upstreams._transport, "os", types.SimpleNamespace(write=write, read=os.read)
    )
    return writes


@bounded(10)
async def test_a_request_goes_out_in_one_write(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # httpcore2 writes a request's head and its body apart: two system calls, two packets.
    async def handler(stream: trio.abc.Stream) -> None:
        while body := await _read_post(stream):
            await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body))
            await stream.send_all(body)

    port = await _serve(nursery, handler)
    writes = record_socket_writes(monkeypatch)
    async with tokenrelay.http_client() as client:
        for content in (b'{"model": "m"}', b"x" * 5000):
            response = await client.post(f"http://127.0.0.1:{port}/", content=content)
            assert response.content == content
    assert len(writes) == 2
    for write, content in zip(writes, (b'{"model": "m"}', b"x" * 5000), strict=True):
        assert write.startswith(b"POST / HTTP/1.1\r\n")
        assert write.endswith(b"\r\n\r\n" + content)


@bounded(10)
async def test_a_request_the_socket_takes_in_part_is_sent_whole(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A small send buffer, and a server that reads only once the client waits: the socket
    # takes part of the request at once, and the rest goes through httpcore2's write.
    body = bytes(range(256)) * 240  # 61,440 bytes: under UNSENT_LIMIT, kept for one write
    client_waits = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        await client_waits.wait()
        received = await _read_post(stream)
        await stream.send_all(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(received))
        await stream.send_all(received)

    port = await _serve(nursery, handler)
    writes = record_socket_writes(monkeypatch)
    transport = httpx2.AsyncHTTPTransport(
        socket_options=[(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)]
    )
    async with httpx2.AsyncClient(transport=transport) as client:
        use_lean_backend(client)
        async with trio.open_nursery() as waiting:

            async def tell_when_waiting() -> None:
                await trio.testing.wait_all_tasks_blocked()
                client_waits.set()

            waiting.start_soon(tell_when_waiting)
            response = await client.post(f"http://127.0.0.1:{port}/", content=body)
    assert response.content == body
    assert isinstance(response.extensions["network_stream"], _LeanStream)
    [taken] = writes  # what the socket took at once: the head and part of the body
    assert taken.startswith(b"POST / HTTP/1.1\r\n")
    assert len(taken) < len(body)


async def test_a_prompt_lock_is_taken_at_once_when_free_and_waited_for_when_not() -> None:
    lock = _PromptLock()
    with trio.testing.assert_no_checkpoints():
        await lock.acquire()
    taken = trio.Event()

    async def second() -> None:
        await lock.acquire()
        taken.set()
        lock.release()

    async with trio.open_nursery() as nursery:
        nursery.start_soon(second)
        await trio.testing.wait_all_tasks_blocked()
        assert not taken.is_set()  # waits while the lock is held
        lock.release()
    assert taken.is_set()
    await lock.acquire()
    with trio.move_on_after(0.01) as scope:  # a wait for a held lock is cancellable
        async with trio.open_nursery() as nursery:
            nursery.start_soon(lock.acquire)
    assert scope.cancelled_caught
    lock.release()


@bounded(10)
async def test_a_connection_read_directly_takes_its_locks_promptly(nursery: trio.Nursery) -> None:
    # httpcore2 takes a connection's locks with trio's Lock (a schedule point each, three per
    # request); once a response of the connection has been read directly, with prompt ones.
    async def handler(stream: trio.abc.Stream) -> None:
        while await _read_request(stream):
            await stream.send_all(HELLO)

    port = await _serve(nursery, handler)
    async with tokenrelay.http_client() as client:
        for _ in range(3):
            async with client.stream("GET", f"http://127.0.0.1:{port}/") as response:
                body = lean_body(response)
                assert body is not None
                assert await body.read() == b"hello"
                assert await body.read() is None  # read to its end: the connection is kept
        [connection] = _sharded(client).connections
        assert type(connection._request_lock._trio_lock) is _PromptLock  # type: ignore[attr-defined]
        assert type(connection._connection._state_lock._trio_lock) is _PromptLock  # type: ignore[attr-defined]


class SSEUpstream:
    """A raw OpenAI-style upstream: each request's head and body noted, each answered with
    one token (and ``Set-Cookie: sticky=1``, if ``cookie``), on a connection kept alive; or
    not answered at all while ``silent``."""

    def __init__(self, *, cookie: bool = False) -> None:
        self.cookie = cookie
        self.silent = False
        self.heads: list[bytes] = []
        self.bodies: list[bytes] = []

    async def handle(self, stream: trio.abc.Stream) -> None:
        data = b""
        while True:
            while b"\r\n\r\n" not in data:
                chunk = await stream.receive_some()
                if not chunk:
                    return
                data += chunk
            head, _, data = data.partition(b"\r\n\r\n")
            if b"transfer-encoding: chunked" in head.lower():  # (kept raw, to its last chunk)
                while b"0\r\n\r\n" not in data:
                    data += await stream.receive_some()
                length = data.index(b"0\r\n\r\n") + 5
            else:
                length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            while len(data) < length:
                data += await stream.receive_some()
            self.bodies.append(data[:length])
            data = data[length:]
            self.heads.append(head.lower())
            if self.silent:
                await trio.sleep_forever()
            body = (
                b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
                b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
                b"data: [DONE]\n\n"
            )
            cookie = b"Set-Cookie: sticky=1; Path=/\r\n" if self.cookie else b""
            await stream.send_all(
                b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n%b"
                b"Content-Length: %d\r\n\r\n%b" % (cookie, len(body), body)
            )


def _chat_stream(
    client: httpx2.AsyncClient, port: int, question: str = "q", *, userinfo: str = ""
) -> HTTPDeltaStream:
    """An OpenAI-style upstream at ``port``'s stream of one question (not opened yet)."""
    upstream = tokenrelay.OpenAIUpstream(f"http://{userinfo}127.0.0.1:{port}/v1", client, model="m")
    return upstream.stream(
        tokenrelay.ChatRequest.from_openai({"messages": [{"role": "user", "content": question}]})
    )


async def _one_answer(
    client: httpx2.AsyncClient, port: int, question: str = "q", *, userinfo: str = ""
) -> str:
    stream = _chat_stream(client, port, question, userinfo=userinfo)
    try:
        return "".join([delta.text async for delta in stream])
    finally:
        await stream.aclose()


def _calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[None]:
    """Counts calls of ``AsyncClient``'s method ``name`` (``client.stream`` goes through
    ``send``, ``client.send`` does not build requests)."""
    calls: list[None] = []
    method = getattr(httpx2.AsyncClient, name)

    async def counted_async(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return await method(*args, **kwargs)

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(None)
        return method(*args, **kwargs)

    async_method = inspect.iscoroutinefunction(method)
    monkeypatch.setattr(httpx2.AsyncClient, name, counted_async if async_method else counted)
    return calls


@bounded(10)
async def test_a_plain_client_s_stream_goes_straight_to_its_transport_and_keeps_cookies(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _calls(monkeypatch, "send")
    upstream = SSEUpstream(cookie=True)
    port = await _serve(nursery, upstream.handle)
    async with tokenrelay.http_client() as client:
        assert await _one_answer(client, port) == "hi"
        assert sent == []  # (not through client.send)
        assert client.cookies.get("sticky") == "1"  # kept, as client.send keeps it
        assert await _one_answer(client, port) == "hi"  # (now through client.send: a cookie)
    assert len(sent) == 1
    first, second = upstream.heads
    assert b"user-agent: python-httpx2/" in first  # (the client's own headers)
    assert b"cookie: sticky=1" in second


@pytest.mark.parametrize(
    ("settings", "seen"),
    [
        ({"auth": ("user", "secret")}, b"authorization: basic dxnlcjpzzwnyzxq="),
        ({"cookies": {"session": "abc"}}, b"cookie: session=abc"),
        ({"event_hooks": {"request": []}, "headers": {"x-mine": "1"}}, b"x-mine: 1"),
    ],
)
@bounded(10)
async def test_a_client_with_its_own_ways_streams_through_client_send(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch, settings: dict[str, Any], seen: bytes
) -> None:
    sent = _calls(monkeypatch, "send")
    upstream = SSEUpstream()
    port = await _serve(nursery, upstream.handle)
    hooked: list[httpx2.Request] = []

    async def hook(request: httpx2.Request) -> None:
        hooked.append(request)

    if "event_hooks" in settings:
        settings = {**settings, "event_hooks": {"request": [hook]}}
    async with httpx2.AsyncClient(**settings) as client:
        assert await _one_answer(client, port) == "hi"
    assert len(sent) == 1
    assert seen in upstream.heads[0]
    assert len(hooked) == ("event_hooks" in settings)


@bounded(10)
async def test_a_plain_client_builds_its_first_request_and_copies_it_for_the_next_ones(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _calls(monkeypatch, "build_request")
    upstream = SSEUpstream()
    port = await _serve(nursery, upstream.handle)
    questions = ["q", 'a longer question, with ünïcödé and a "quote"', "?"]
    async with tokenrelay.http_client() as client:
        for question in questions:
            assert await _one_answer(client, port, question) == "hi"
        assert len(built) == 1  # the first request's, kept for the next ones
        for question, body in zip(questions, upstream.bodies, strict=True):
            payload = json.loads(body)
            assert payload["messages"] == [{"role": "user", "content": question}]
            # Byte for byte what the client would have built (its JSON is not ASCII-only).
            assert body == client.build_request("POST", "http://x", json=payload).content
        heads = [head.split(b"\r\n") for head in upstream.heads]
        lengths = [line for head in heads for line in head if line.startswith(b"content-length")]
        assert lengths == [b"content-length: %d" % len(body) for body in upstream.bodies]
        # Otherwise the same head, line for line, the client's own headers in it.
        assert len({tuple(line for line in head if line not in lengths) for head in heads}) == 1
        assert b"user-agent: python-httpx2/" in upstream.heads[0]


@bounded(10)
async def test_a_plain_client_s_settings_changed_between_requests_are_honoured(
    nursery: trio.Nursery,
) -> None:
    upstream = SSEUpstream()
    port = await _serve(nursery, upstream.handle)
    async with tokenrelay.http_client() as client:
        assert await _one_answer(client, port) == "hi"
        client.headers["X-Later"] = "1"  # (changed in place)
        assert await _one_answer(client, port) == "hi"
        assert b"x-later: 1" not in upstream.heads[0]
        assert b"x-later: 1" in upstream.heads[1]
        client.timeout.read = 0.2  # (changed in place too)
        upstream.silent = True
        started = trio.current_time()
        with pytest.raises(tokenrelay.UpstreamConnectError) as caught:
            await _one_answer(client, port)
        assert caught.value.timed_out
        assert 0.2 <= trio.current_time() - started < 5
        assert len(upstream.heads) == 3


@bounded(10)
async def test_a_body_s_first_piece_already_there_is_read_without_a_schedule_point(
    nursery: trio.Nursery,
) -> None:
    opened = trio.Event()
    first_sent = trio.Event()
    more = trio.Event()

    async def handler(stream: trio.abc.Stream) -> None:
        await _read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await opened.wait()  # the head is read: the first piece arrives on its own
        piece = b'data: {"choices": [{"index": 0, "delta": {"content": "hi"}}]}\n\n'
        await stream.send_all(b"%x\r\n%b\r\n" % (len(piece), piece))
        first_sent.set()
        await more.wait()
        piece = b'data: {"choices": [{"index": 0, "delta": {"content": "!"}}]}\n\n'
        await stream.send_all(b"%x\r\n%b\r\n" % (len(piece), piece))
        end = b'data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n'
        await stream.send_all(b"%x\r\n%b\r\n0\r\n\r\n" % (len(end), end))

    port = await _serve(nursery, handler)
    async with tokenrelay.http_client() as client:
        stream = _chat_stream(client, port)
        try:
            await stream.open()
            opened.set()
            await first_sent.wait()  # (on loopback, in this socket's buffer once sent)
            with trio.testing.assert_no_checkpoints():
                assert (await stream.__anext__()).text == "hi"
            more.set()
            with trio.testing.assert_checkpoints():  # the next one is waited for, as ever
                assert (await stream.__anext__()).text == "!"
            assert [delta.finish_reason async for delta in stream] == ["stop"]
        finally:
            await stream.aclose()


@bounded(10)
async def test_a_reset_right_after_the_head_is_reported_as_a_reset(nursery: trio.Nursery) -> None:
    opened = trio.Event()
    reset = trio.Event()

    async def handler(stream: trio.SocketStream) -> None:
        await _read_request(stream)
        await stream.send_all(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n"
        )
        await opened.wait()
        stream.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        stream.socket.close()  # (with no lingering: a reset)
        reset.set()

    port = await _serve(nursery, handler)  # type: ignore[arg-type]
    async with tokenrelay.http_client() as client:
        stream = _chat_stream(client, port)
        try:
            await stream.open()
            opened.set()
            await reset.wait()
            with pytest.raises(tokenrelay.UpstreamDisconnected) as caught:
                await stream.__anext__()
        finally:
            await stream.aclose()
    # The reset itself (said once: a read after it would only see the connection's end).
    assert isinstance(caught.value.__cause__, httpx2.ReadError)
    assert "reset" in str(caught.value).lower()


@bounded(10)
async def test_a_client_subclass_and_credentials_in_the_url_go_through_client_send(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    sent = _calls(monkeypatch, "send")
    upstream = SSEUpstream()
    port = await _serve(nursery, upstream.handle)

    class Numbered(httpx2.AsyncClient):
        """Numbers its requests (a subclass may build them its own way)."""

        built = 0

        def build_request(self, method: str, url: Any, **kwargs: Any) -> httpx2.Request:
            self.built += 1
            kwargs["headers"] = {**(kwargs.get("headers") or {}), "X-Request-Id": str(self.built)}
            return super().build_request(method, url, **kwargs)

    async with Numbered() as client:
        use_lean_backend(client)
        assert await _one_answer(client, port) == "hi"
        assert await _one_answer(client, port) == "hi"
    assert len(sent) == 2
    assert [b"x-request-id: 1" in head for head in upstream.heads] == [True, False]
    assert b"x-request-id: 2" in upstream.heads[1]
    async with tokenrelay.http_client() as client:
        assert await _one_answer(client, port, userinfo="user:secret@") == "hi"
    assert len(sent) == 3
    assert b"authorization: basic dxnlcjpzzwnyzxq=" in upstream.heads[2]


@bounded(10)
async def test_a_request_asking_for_chunks_is_built_by_the_client_once_each_time(
    nursery: trio.Nursery, monkeypatch: pytest.MonkeyPatch
) -> None:
    built = _calls(monkeypatch, "build_request")
    sent = _calls(monkeypatch, "send")
    upstream = SSEUpstream()
    port = await _serve(nursery, upstream.handle)
    async with tokenrelay.http_client() as client:
        openai = tokenrelay.OpenAIUpstream(f"http://127.0.0.1:{port}/v1", client, model="m")
        chat = tokenrelay.ChatRequest.from_openai({"messages": [{"role": "user", "content": "q"}]})
        for _ in range(2):
            stream = HTTPDeltaStream(
                client,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                openai.payload(chat),
                openai.decoder(),
                upstream="test",
                headers={"Transfer-Encoding": "chunked"},
            )
            try:
                assert "".join([delta.text async for delta in stream]) == "hi"
            finally:
                await stream.aclose()
    assert len(built) == 2  # no Content-Length to set: one build per request, no more
    assert sent == []
    for head, body in zip(upstream.heads, upstream.bodies, strict=True):
        assert b"transfer-encoding: chunked" in head
        assert b"content-length" not in head
        assert body.endswith(b"0\r\n\r\n")
        assert b'"content":"q"' in body
