"""The upstream client's transport: httpx2's own, over a leaner trio network backend.

Relaying a stream costs one network read per token. httpcore2's trio backend wraps every
read in an exception-mapping context manager and a ``fail_after`` scope, even with no read
timeout, which is the relay's case (the guard's timeouts bound every wait instead). Under
load those two scopes were about 6% of the relay's CPU. The backend here reads plain TCP
sockets directly when there is no timeout, and takes every other path (timeouts, TLS,
writes, connecting) unchanged from httpcore2.

Its second saving is in the connection pool's bookkeeping, which asks every idle connection
"is your socket readable?" (has the server hung up?) on each request and on each response
closed: one ``poll`` object per stream, registered once, answers that with one system call.
"""

# The ``timeout`` parameters are httpcore2's network stream interface, not ours to change.
# ruff: noqa: ASYNC109

from __future__ import annotations

import select
import ssl
from collections.abc import Iterable
from typing import Any

import httpcore2
import httpx2
import trio
from httpcore2 import AsyncNetworkStream

__all__ = ["LeanTrioBackend", "relay_transport"]

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


class _LeanStream(AsyncNetworkStream):
    """httpcore2's trio stream, with a direct read when there is no timeout."""

    def __init__(self, inner: AsyncNetworkStream) -> None:
        self._inner = inner
        # Only plain TCP is read directly; TLS goes through trio's SSLStream as before.
        plain = inner.get_extra_info("ssl_object") is None
        self._socket: trio.socket.SocketType | None = (
            inner.get_extra_info("socket") if plain else None
        )
        self._poll: select.poll | None = None
        if self._socket is not None:
            self._poll = select.poll()
            self._poll.register(self._socket.fileno(), select.POLLIN)

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if timeout is not None or self._socket is None:
            return await self._inner.read(max_bytes, timeout)
        try:
            return await self._socket.recv(max_bytes)
        except (OSError, trio.ClosedResourceError) as exc:  # what a trio socket raises
            raise httpcore2.ReadError(str(exc) or type(exc).__name__) from exc

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        await self._inner.write(buffer, timeout)

    async def aclose(self) -> None:
        # The poll object goes first: the descriptor it watches is about to be closed, and
        # its number may be reused.
        self._poll = None
        await self._inner.aclose()

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        return _LeanStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._poll is not None:
            return bool(self._poll.poll(0))
        return self._inner.get_extra_info(info)


class LeanTrioBackend(httpcore2.TrioBackend):
    """httpcore2's trio network backend, whose streams read without a timeout directly."""

    async def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[SocketOption] | None = None,
    ) -> AsyncNetworkStream:
        stream = await super().connect_tcp(
            host,
            port,
            timeout=timeout,
            local_address=local_address,
            socket_options=socket_options,
        )
        return _LeanStream(stream)


def relay_transport(
    limits: httpx2.Limits, *, ssl_context: ssl.SSLContext | None = None
) -> httpx2.AsyncHTTPTransport:
    """httpx2's HTTP/1.1 transport with ``limits``, over :class:`LeanTrioBackend`.

    httpx2 has no parameter for the network backend, so its connection pool is replaced by
    one built the same way with the backend added; everything else about the transport
    (request and response conversion, error mapping) is httpx2's. ``ssl_context`` defaults
    to httpx2's (system certificates, ``SSL_CERT_FILE`` honoured).
    """
    if ssl_context is None:
        ssl_context = httpx2.create_ssl_context()
    transport = httpx2.AsyncHTTPTransport(limits=limits, verify=ssl_context)
    transport._pool = httpcore2.AsyncConnectionPool(
        ssl_context=ssl_context,
        max_connections=limits.max_connections,
        max_keepalive_connections=limits.max_keepalive_connections,
        keepalive_expiry=limits.keepalive_expiry,
        network_backend=LeanTrioBackend(),
    )
    return transport
