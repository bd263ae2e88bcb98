"""The upstream client's direct connections: httpx2's own, over a leaner trio network backend.

Relaying a stream costs one network read per token. httpcore2's trio backend wraps every
read in an exception-mapping context manager and a ``fail_after`` scope, even with no read
timeout, which is the relay's case (the guard's timeouts bound every wait instead). The
backend here reads plain TCP sockets directly when there is no timeout, and takes every
other path (timeouts, TLS, writes, connecting) unchanged from httpcore2.

Its second saving is in the connection pool's bookkeeping, which asks every idle connection
"is your socket readable?" (has the server hung up?) on each request and on each response
closed: one ``poll`` object per stream, registered once, answers that with one system call.
Where ``select.poll`` does not exist (Windows), httpcore2's own check answers instead.

Together they save about 7% of ``tokenrelay serve``'s CPU per token at 100 streams
(``python -m benchmarks``). Nothing else changes: :func:`use_lean_backend` gives the backend
to the connection pool httpx2 built itself, with everything it was configured with (limits,
TLS, ``retries``, ``local_address``, socket options), and only to a client's direct
connections. Requests httpx2 routes through a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``,
``ALL_PROXY``, ``NO_PROXY``, read as httpx2 reads them) go through httpx2's own proxy
transports, untouched.

httpx2 has no parameter for the network backend, so this sets a private attribute of
httpcore2's pool; pyproject.toml bounds both versions, and where the pool is not the shape
expected the client is left as httpx2 built it (correct, only without the saving).
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

__all__ = ["LeanTrioBackend", "use_lean_backend"]

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
        if self._socket is not None and hasattr(select, "poll"):  # not on Windows
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


def use_lean_backend(client: httpx2.AsyncClient) -> None:
    """Give ``client``'s direct connections :class:`LeanTrioBackend`, before its first request.

    Only the client's default transport changes, and only its network backend: the proxy
    transports httpx2 mounted (from ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY``, or
    ``proxy=``) and any other mounts keep httpx2's own, so requests go where a plain
    ``httpx2.AsyncClient`` would send them. A default transport that is not httpx2's
    HTTP transport over a plain connection pool (say, one routing everything through a proxy)
    is left as it is.
    """
    transport = getattr(client, "_transport", None)
    if not isinstance(transport, httpx2.AsyncHTTPTransport):
        return
    pool = getattr(transport, "_pool", None)
    # Exactly the pool class: httpcore2's proxies are subclasses of it.
    if type(pool) is httpcore2.AsyncConnectionPool and hasattr(pool, "_network_backend"):
        pool._network_backend = LeanTrioBackend()
