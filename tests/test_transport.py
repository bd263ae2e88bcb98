"""The upstream client's transport (httpx2 over the lean trio backend), against small raw
servers on 127.0.0.1 whose every byte the test controls. Real time, bounded."""

from __future__ import annotations

import socket
import ssl
import struct
from collections.abc import Awaitable, Callable
from functools import partial

import httpx2
import pytest
import trio
import trustme

import tokenrelay
from _helpers import bounded
from tokenrelay._transport import _LeanStream, relay_transport

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


@bounded(10)
async def test_an_idle_connection_the_server_closed_is_not_reused(nursery: trio.Nursery) -> None:
    # The pool asks each idle connection whether its socket is readable (the server hung
    # up); the lean stream answers from its own poll object. A wrong answer would send the
    # second request down the dead connection and fail it.
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
        assert stream.get_extra_info("is_readable") is False
        hang_up.set()
        await trio.lowlevel.wait_readable(stream.get_extra_info("socket"))  # the hang-up is here
        assert stream.get_extra_info("is_readable") is True
        second = await client.get(f"http://127.0.0.1:{port}/")
    assert (first.text, second.text) == ("hello", "hello")
    assert connections == 2


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

    async def handler(stream: trio.abc.Stream) -> None:
        tls = trio.SSLStream(stream, server_context, server_side=True)
        await _read_request(tls)
        await tls.send_all(HELLO)
        await tls.aclose()

    port = await _serve(nursery, handler)
    limits = httpx2.Limits(max_connections=2)
    transport = relay_transport(limits, ssl_context=client_context)
    async with httpx2.AsyncClient(transport=transport) as client:
        response = await client.get(f"https://localhost:{port}/")
    assert response.text == "hello"
    assert response.extensions["network_stream"].get_extra_info("ssl_object") is not None
