"""The upstream client's direct connections: httpx2's own, over a leaner trio network backend.

Relaying a stream costs one network read per token. httpcore2's trio backend wraps every
read in an exception-mapping context manager and a ``fail_after`` scope, even with no read
timeout, which is the relay's case (the guard's timeouts bound every wait instead). The
backend here reads plain TCP sockets directly when there is no timeout, and takes every
other path (timeouts, TLS, writes, connecting) unchanged from httpcore2.

Its second saving is in the connection pool's bookkeeping, which before httpcore2 2.17 asks
every idle connection "is your socket readable?" (has the server hung up?) on each request
and on each response closed, one system call each: with a hundred idle connections, that is
two hundred system calls per request (see docs/upstream-bugs.md; from 2.17 it asks only the
idle connection a request picks). The backend keeps its plain TCP sockets in
one ``epoll`` set, and one ``epoll_wait`` answers every question asked in the same step of
the same task (a pool pass asks them all without yielding, so nothing else can happen in
between). Where ``select.epoll`` does not exist (not Linux), or trio's private count of a
task's steps does not, httpcore2's own check answers instead.

Together they save about 7% of ``tokenrelay serve``'s CPU per token at 100 streams
(``python -m benchmarks``).

The pass itself is a walk over every connection of the pool, busy or idle, in Python: with
a thousand streams open, a tenth of the relay's CPU. :class:`ShardedPool` splits a pool of
more than 16 connections into pools of at most 16, so a pass walks one of those.

A request goes out in one write: httpcore2 writes its head and its body separately (two
system calls, two packets); on plain TCP the lean stream keeps them and sends them together
when the response is first read (or as soon as 64 KiB wait), handed to the socket directly
when it takes them all, dropping a write error there as httpcore2 drops one while sending a
request.

On trio, httpcore2 takes a connection's locks with ``trio.Lock``, a schedule point each,
three per request, where on asyncio it takes anyio's without one when they are free
(``fast_acquire``). :func:`lean_body` gives the connections it reads a lock that does the
same on trio (:class:`_PromptLock`).

Nothing else changes: :func:`use_lean_backend` gives the backend to the connection pool
httpx2 built itself, with everything it was configured with (limits, TLS, ``retries``,
``local_address``, socket options), and only to a client's direct connections. Requests
httpx2 routes through a proxy (``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY``, ``NO_PROXY``,
read as httpx2 reads them) go through httpx2's own proxy transports, untouched.

:func:`lean_body` reads a streamed response's body straight from httpcore2's HTTP/1.1
connection (its h11 state and network stream), one method call per network read, where
``Response.aiter_bytes()`` goes through seven nested async generators and two
exception-mapping context managers per read. Closing is unchanged: ``Response.aclose()``
releases the connection exactly as before (back to the pool when the body was read to its
end, closed otherwise).

:func:`send_json` sends a plain client's request (no auth, hooks, cookies or redirects:
``HTTPDeltaStream`` decides) straight to its transport's pool, copied from the first one the
client built, where ``client.build_request`` and the transport would make a new
``httpx2.Request`` and a new ``httpcore2.Request`` from the client's settings every time.

A body's first piece often follows its head at once (a server that writes them apart, as
hypercorn does): :class:`LeanBody` takes it if it is already there, before the task gives
its turn away (a server waiting for the head to write its own would otherwise write that
first, and the piece only after).

httpx2 has no parameter for the network backend, so this sets a private attribute of
httpcore2's pool (and, to shard it, reads its settings and replaces the transport's pool);
pyproject.toml bounds both versions, and where the pool is not the shape expected the client
is left as httpx2 built it (correct, only without the saving).
"""

# The ``timeout`` parameters are httpcore2's network stream interface, not ours to change.
# ruff: noqa: ASYNC109

from __future__ import annotations

import contextlib
import contextvars
import json
import math
import os
import select
import ssl
import weakref
from collections import deque
from collections.abc import AsyncIterable, Callable, Iterable, Mapping
from typing import Any, cast

import h11
import httpcore2
import httpx2
import trio
from httpcore2 import AsyncNetworkStream
from httpcore2 import _synchronization as httpcore2_sync
from httpcore2._async import connection_pool as httpcore2_pool
from httpcore2._async import http11 as httpcore2_http11
from httpx2 import _client as httpx2_client
from httpx2._transports import default as httpx2_default

from .._steps import COUNTED, schedule_points

__all__ = [
    "LeanBody",
    "LeanTrioBackend",
    "ShardedPool",
    "lean_body",
    "request_sent",
    "send_json",
    "use_lean_backend",
]

#: Whether a socket's descriptor can be read with ``os.read`` and written with ``os.write``
#: (not on Windows).
_READ_FD = os.name == "posix"

#: The most bytes a plain TCP stream keeps unsent before it sends them (see ``write``).
UNSENT_LIMIT = 64 * 1024

SocketOption = (
    tuple[int, int, int] | tuple[int, int, bytes | bytearray] | tuple[int, int, None, int]
)


#: The event to set once the request the current task is sending has gone out (see
#: :attr:`HTTPDeltaStream.sent <tokenrelay.upstreams.HTTPDeltaStream>`), or ``None``.
request_sent: contextvars.ContextVar[trio.Event | None] = contextvars.ContextVar(
    "tokenrelay_request_sent", default=None
)


def _tell_sent() -> None:
    """What a lean stream's write of a request tells :data:`request_sent`. On plain TCP the
    whole request goes out in that write; through TLS, each of its writes tells (its head's
    first), which is as soon as the request is on its way."""
    event = request_sent.get()
    if event is not None:
        event.set()


class _LeanStream(AsyncNetworkStream):
    """httpcore2's trio stream, with a direct read when there is no timeout."""

    def __init__(self, inner: AsyncNetworkStream, readiness: _Readiness | None = None) -> None:
        self._inner = inner
        # Only plain TCP is read directly; TLS goes through trio's SSLStream as before.
        plain = inner.get_extra_info("ssl_object") is None
        self._socket: trio.socket.SocketType | None = (
            inner.get_extra_info("socket") if plain else None
        )
        #: The backend's readiness set, once this stream's socket is in it.
        self._readiness: _Readiness | None = None
        self._fd = -1
        if self._socket is not None and readiness is not None:
            try:
                readiness.add(self._socket.fileno())
            except OSError:  # no descriptor left for the epoll set: httpcore2's check then
                pass
            else:
                self._fd = self._socket.fileno()
                self._readiness = readiness
        #: Plain TCP: what was written and not yet sent, and the write timeout it was given.
        self._unsent = b""
        self._unsent_timeout: float | None = None
        #: Whether the last read filled its buffer.
        self._full = False

    async def read(self, max_bytes: int, timeout: float | None = None) -> bytes:
        if self._unsent:
            await self._send_unsent()
        sock = self._socket
        if timeout is not None or sock is None:
            return await self._inner.read(max_bytes, timeout)
        try:
            if self._full or not _READ_FD:
                # A read that filled its buffer leaves more waiting, as a rule: try at once.
                data = await sock.recv(max_bytes)
            else:
                data = await self._recv_when_readable(sock, max_bytes)
        except (OSError, trio.ClosedResourceError) as exc:  # what a trio socket raises
            raise httpcore2.ReadError(str(exc) or type(exc).__name__) from exc
        self._full = len(data) == max_bytes
        return data

    def read_ready(self, max_bytes: int) -> bytes | None:
        """What the socket holds already (``b""`` if the server closed), read without a
        schedule point; ``None`` if it holds nothing, or where only :meth:`read` reads
        (TLS, a request not sent yet, not POSIX). Raises as :meth:`read` does."""
        sock = self._socket
        if sock is None or self._unsent or not _READ_FD:
            return None
        fd = sock.fileno()
        if fd < 0:
            return None
        try:
            data = os.read(fd, max_bytes)
        except BlockingIOError:
            return None
        except OSError as exc:  # reset (said once: a read after it would only see the end)
            raise httpcore2.ReadError(str(exc)) from exc
        self._full = len(data) == max_bytes
        return data

    async def _recv_when_readable(self, sock: trio.socket.SocketType, max_bytes: int) -> bytes:
        """Wait until ``sock`` is readable, then read it. A relayed stream's next piece has
        not arrived yet when it is asked for (the last one was just read), so trio's
        ``recv``, which first tries and then waits, makes a system call and raises and
        catches ``BlockingIOError`` for nothing, once per token. (The wait is the checkpoint.)
        """
        while True:
            fd = sock.fileno()
            if fd < 0:  # closed by another task since the last read
                raise trio.ClosedResourceError("the socket was closed")
            await trio.lowlevel.wait_readable(fd)
            try:
                return os.read(fd, max_bytes)
            except BlockingIOError:  # woken, yet nothing to read: wait again
                continue

    async def write(self, buffer: bytes, timeout: float | None = None) -> None:
        # A request's head and body are two writes: on plain TCP they are kept and sent as
        # one (one system call, one packet) when the response is read (a request is always
        # followed by reading its response), or as soon as UNSENT_LIMIT bytes are waiting.
        if self._socket is None:
            await self._inner.write(buffer, timeout)
            _tell_sent()
            return
        await trio.lowlevel.checkpoint_if_cancelled()
        self._unsent += buffer
        self._unsent_timeout = timeout
        if len(self._unsent) >= UNSENT_LIMIT:
            data, self._unsent = self._unsent, b""
            await self._inner.write(data, timeout)

    async def _send_unsent(self) -> None:
        """Send what the writes left: handed to the socket at once if it takes it all (a
        request does fit in an idle connection's send buffer), the rest through httpcore2's
        write. The read that follows is the schedule point. A write error is dropped here,
        as httpcore2 drops one while sending a request: the server may have answered and
        closed early, and reading its response tells (a timeout is raised)."""
        data, self._unsent = self._unsent, b""
        sock = self._socket
        if sock is not None and _READ_FD:
            try:
                sent = os.write(sock.fileno(), data)
            except BlockingIOError:
                sent = 0
            except OSError:  # reset or closed: the read says so
                _tell_sent()
                return
            data = data[sent:]
        if data:
            with contextlib.suppress(httpcore2.WriteError):
                await self._inner.write(data, self._unsent_timeout)
        _tell_sent()

    async def aclose(self) -> None:
        # Out of the readiness set first: the descriptor is about to be closed, and its number
        # may be reused.
        self._forget()
        self._unsent = b""
        await self._inner.aclose()

    def _forget(self) -> None:
        if self._readiness is not None:
            self._readiness.discard(self._fd)
            self._readiness = None

    async def start_tls(
        self,
        ssl_context: ssl.SSLContext,
        server_hostname: str | None = None,
        timeout: float | None = None,
    ) -> AsyncNetworkStream:
        if self._unsent:
            data, self._unsent = self._unsent, b""
            await self._inner.write(data, self._unsent_timeout)
        # TLS over this connection: its socket's readiness says nothing of the TLS stream's.
        self._forget()
        return _LeanStream(await self._inner.start_tls(ssl_context, server_hostname, timeout))

    def get_extra_info(self, info: str) -> Any:
        if info == "is_readable" and self._readiness is not None:
            readable = self._readiness.readable(self._fd)
            if readable is not None:
                return readable
        return self._inner.get_extra_info(info)


class _Readiness:
    """Which of a backend's plain TCP sockets are readable, asked of the kernel once per step
    of a task: one ``epoll_wait`` answers every socket the pool asks about in one pass.

    A task's step is told by trio's private count of the times it yielded
    (``Task._schedule_points``) together with the task itself: within one step no other task
    runs, so the answer is exactly as fresh as one system call per socket would be.

    The set holds the connections in use too (a connection is idle or not without telling
    its stream), so one answer lists the readable ones among those as well: a pass costs one
    system call and a set of the sockets readable at that instant, where it cost one system
    call per idle connection.
    """

    __slots__ = ("_count", "_epoll", "_readable", "_step", "_task")

    def __init__(self) -> None:
        self._epoll: select.epoll | None = None
        self._count = 0
        self._task: weakref.ref[trio.lowlevel.Task] | None = None
        self._step = -1
        self._readable: set[int] = set()

    @staticmethod
    def available() -> bool:
        return hasattr(select, "epoll") and COUNTED

    def add(self, fd: int) -> None:
        """Watch ``fd`` (raises :exc:`OSError` if it cannot be: nothing is changed then)."""
        epoll = self._epoll if self._epoll is not None else select.epoll()
        try:
            epoll.register(fd, select.EPOLLIN)
        except OSError:
            if not self._count:
                epoll.close()
            raise
        self._epoll = epoll
        self._count += 1
        self._task = None  # an answer from before does not cover this socket

    def discard(self, fd: int) -> None:
        epoll = self._epoll
        if epoll is None:
            return
        with contextlib.suppress(OSError):  # already closed (and so out of the set)
            epoll.unregister(fd)
        self._count -= 1
        self._readable.discard(fd)
        if not self._count:  # no socket left: no descriptor kept
            epoll.close()
            self._epoll = None

    def readable(self, fd: int) -> bool | None:
        """Whether ``fd`` is readable now (``None``: ask the stream itself)."""
        epoll = self._epoll
        if epoll is None:
            return None
        task = trio.lowlevel.current_task()
        step = schedule_points(task)
        if step is None:
            return None
        if self._task is None or self._task() is not task or self._step != step:
            self._readable = {ready for ready, _ in epoll.poll(0, self._count)}
            self._task = weakref.ref(task)
            self._step = step
        return fd in self._readable


class LeanTrioBackend(httpcore2.TrioBackend):
    """httpcore2's trio network backend, whose streams read without a timeout directly."""

    def __init__(self) -> None:
        super().__init__()
        self._readiness = _Readiness() if _Readiness.available() else None

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
        return _LeanStream(stream, self._readiness)


def use_lean_backend(client: httpx2.AsyncClient) -> None:
    """Give ``client``'s direct connections :class:`LeanTrioBackend`, before its first request.

    Only the client's default transport changes, and only its network backend: the proxy
    transports httpx2 mounted (from ``HTTP(S)_PROXY``/``ALL_PROXY``/``NO_PROXY``, or
    ``proxy=``) and any other mounts keep httpx2's own, so requests go where a plain
    ``httpx2.AsyncClient`` would send them. A default transport that is not httpx2's
    HTTP transport over a plain connection pool (say, one routing everything through a proxy)
    is left as it is. A pool of more than :attr:`ShardedPool.SHARD_CONNECTIONS` connections
    is split into a :class:`ShardedPool`, all its shards on the one backend.
    """
    transport = getattr(client, "_transport", None)
    if not isinstance(transport, httpx2.AsyncHTTPTransport):
        return
    pool = getattr(transport, "_pool", None)
    # Exactly the pool class: httpcore2's proxies are subclasses of it.
    if type(pool) is not httpcore2.AsyncConnectionPool or not hasattr(pool, "_network_backend"):
        return
    backend = LeanTrioBackend()
    sharded = ShardedPool.split(pool, backend)
    if sharded is not None:
        transport._pool = sharded  # type: ignore[assignment]
    else:
        pool._network_backend = backend


class ShardedPool:
    """httpcore2's connection pool, split into pools of at most :attr:`SHARD_CONNECTIONS`
    connections each: a request goes to an idle shard, else to the one with the most room.

    httpcore2's pool walks every one of its connections, in Python, when a request is queued
    and again when a response is closed (``_assign_requests_to_connections``): with a thousand
    streams open to the model server, that is about 3 ms of CPU per request, or 60 µs per
    token of a 50-token answer (see docs/upstream-bugs.md). Each shard here is httpcore2's
    ``AsyncConnectionPool`` (a subclass that only tells when it made a pass) built with the
    original's settings and its share of its limits, so a pass walks one shard's connections
    only.

    A request goes to the first shard with nothing in flight (one with connections to reuse
    first), otherwise to the one with the most connections to spare: sequential requests all
    go to one shard and reuse its idle connection, and concurrent ones spread evenly. When
    every shard is full, requests wait here, first come first served, and each takes the
    first room made in any shard (a shard tells after each of its passes), as in one pool of
    the same limit; the pool timeout bounds that wait as it bounds one pool's.

    A pool closes its expired idle connections during its passes (and, before httpcore2
    2.17, those the server hung up), so a shard no request goes to would keep them. So, at
    most once per keep-alive expiry (or per second without one), a request first makes that
    pass in every shard with connections and nothing in flight.

    What differs from one pool of the same limits:

    - expired idle connections, in shards no request reaches, are closed at the next sweep
      (within a keep-alive expiry), not at the next request;
    - a shard whose idle connection the server hung up opens a new one, where another shard
      may have an idle one;
    - the keep-alive limit is split too: a shard may close an idle connection while
      another has keep-alive room to spare;
    - room is counted without regard to the origin: with several upstream hosts, a full
      shard closes an idle connection to one host to open one to another while other shards
      are empty (the relay's client talks to one upstream).

    It has what httpx2's transport calls on its pool (``handle_async_request``, ``aclose``
    and the async context manager), and ``connections`` as a pool has.
    """

    #: The most connections one shard holds (while there are at most :attr:`MAX_SHARDS`).
    SHARD_CONNECTIONS = 16
    #: The most shards a pool is split into: a pool of no limit, or of a limit above 4,096,
    #: has shards of more than :attr:`SHARD_CONNECTIONS` each.
    MAX_SHARDS = 256

    __slots__ = ("_change", "_queue", "_shards", "_sweep_at", "_sweep_every")

    def __init__(self, shards: list[_Shard], sweep_every: float) -> None:
        """Over ``shards`` (see :meth:`split`), sweeping idle shards at most once per
        ``sweep_every`` seconds."""
        self._shards = shards
        for shard in shards:
            shard.passed = self._passed
        self._sweep_every = sweep_every
        self._sweep_at = -math.inf
        #: The requests waiting for room (every shard was full), first come first.
        self._queue: deque[object] = deque()
        #: Set (and dropped) at the next pass of any shard, while requests wait.
        self._change: trio.Event | None = None

    @classmethod
    def split(
        cls, pool: httpcore2.AsyncConnectionPool, backend: httpcore2.AsyncNetworkBackend
    ) -> ShardedPool | None:
        """``pool``'s settings over shards sharing ``backend``; ``None`` where a single pool
        is as good (a limit of :attr:`SHARD_CONNECTIONS` or less, HTTP/2, whose connections
        are shared by many requests) or the pool is not the shape expected."""
        try:
            limit: int = pool._max_connections
            keepalive: int = pool._max_keepalive_connections
            expiry: float | None = pool._keepalive_expiry
            settings: dict[str, Any] = {
                "ssl_context": pool._ssl_context,
                "proxy": pool._proxy,
                "keepalive_expiry": expiry,
                "http1": pool._http1,
                "http2": pool._http2,
                "retries": pool._retries,
                "local_address": pool._local_address,
                "uds": pool._uds,
                "socket_options": pool._socket_options,
            }
            used = bool(pool._connections)
            pool._requests  # noqa: B018 (what ``_pick`` reads)
            pool._assign_requests_to_connections  # noqa: B018 (what ``_sweep`` calls)
            pool._close_connections  # noqa: B018
            pool._optional_thread_lock  # noqa: B018
        except AttributeError:
            return None
        if settings["http2"] or limit <= cls.SHARD_CONNECTIONS or used:
            return None
        count = min(-(-limit // cls.SHARD_CONNECTIONS), cls.MAX_SHARDS)
        return cls(
            [
                _Shard(
                    max_connections=_share(limit, count, index),
                    max_keepalive_connections=_share(keepalive, count, index),
                    network_backend=backend,
                    **settings,
                )
                for index in range(count)
            ],
            sweep_every=expiry or 1.0,
        )

    @property
    def shards(self) -> list[httpcore2.AsyncConnectionPool]:
        """The shards, in the order requests prefer them."""
        return list(self._shards)

    @property
    def connections(self) -> list[httpcore2.AsyncConnectionInterface]:
        """Every shard's connections (as ``AsyncConnectionPool.connections``)."""
        return [connection for shard in self._shards for connection in shard.connections]

    def _pick(self) -> _Shard:
        """The first shard with nothing in flight and connections to reuse, else the first
        with nothing in flight, else the one with the most connections to spare."""
        empty: _Shard | None = None
        roomiest = self._shards[0]
        room = -1
        for shard in self._shards:
            busy = len(shard._requests)
            if not busy:
                if shard._connections:
                    return shard
                if empty is None:
                    empty = shard
            elif shard._max_connections - busy > room:
                roomiest, room = shard, shard._max_connections - busy
        return empty if empty is not None else roomiest

    async def handle_async_request(self, request: httpcore2.Request) -> httpcore2.Response:
        """Send ``request`` through a shard with room (see the class), as a pool would."""
        if trio.current_time() >= self._sweep_at:
            await self._sweep()
        shard = self._pick() if not self._queue else None
        if shard is None or not shard.has_room():
            shard = await self._wait_for_room(request)
        # The shard counts the request before its first schedule point: the next request
        # in line sees the room this one took.
        return await shard.handle_async_request(request)

    async def _wait_for_room(self, request: httpcore2.Request) -> _Shard:
        """Wait, behind the requests already waiting, until a shard has room for one more
        request; bounded by the request's pool timeout, as one pool bounds its wait."""
        timeouts: dict[str, float | None] = request.extensions.get("timeout", {})
        timeout = timeouts.get("pool")
        turn = object()
        self._queue.append(turn)
        try:
            with trio.fail_after(math.inf if timeout is None else timeout):
                while True:
                    if self._queue[0] is turn:
                        shard = self._pick()
                        if shard.has_room():
                            return shard
                    if self._change is None:
                        self._change = trio.Event()
                    await self._change.wait()
        except trio.TooSlowError:
            raise httpcore2.PoolTimeout("no connection came free within the pool timeout") from None
        finally:
            self._queue.remove(turn)
            self._passed()  # the next in line looks again

    def _passed(self) -> None:
        """A shard made a pass (a request came, went, or gave up): waiters look again."""
        change = self._change
        if change is not None:
            self._change = None
            change.set()

    async def _sweep(self) -> None:
        """The pass every idle shard would make at its next request: expired and hung-up
        idle connections out, and closed (shielded, as the pool closes them)."""
        self._sweep_at = trio.current_time() + self._sweep_every
        for shard in self._shards:
            if shard._connections and not shard._requests:
                with shard._optional_thread_lock:  # as the pool takes it for a pass
                    closing = shard._assign_requests_to_connections()
                await shard._close_connections(closing)

    async def aclose(self) -> None:
        """Close every shard, as a pool's ``aclose`` closes its connections."""
        for shard in self._shards:
            await shard.aclose()

    async def __aenter__(self) -> ShardedPool:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<ShardedPool of {len(self._shards)}: {self._shards!r}>"


class _Shard(httpcore2.AsyncConnectionPool):
    """One shard of a :class:`ShardedPool`: httpcore2's pool, telling ``passed`` after each
    of its passes, which is when it may have made room."""

    passed: Callable[[], None] = staticmethod(lambda: None)

    def has_room(self) -> bool:
        """Whether one more request would be assigned a connection at once: each request in
        flight holds one HTTP/1.1 connection, so under the limit there is an idle one or
        room to open one."""
        return len(self._requests) < self._max_connections

    def _assign_requests_to_connections(self) -> list[httpcore2.AsyncConnectionInterface]:
        closing = super()._assign_requests_to_connections()
        self.passed()
        return closing


def _share(total: int, parts: int, index: int) -> int:
    """Part ``index`` of ``total`` split into ``parts`` as evenly as integers allow."""
    return total // parts + (index < total % parts)


class LeanBody:
    """A response body read directly from its HTTP/1.1 connection (see :func:`lean_body`)."""

    __slots__ = ("_first", "_h11", "_stream")

    #: What one network read asks for (httpcore2's own ``READ_NUM_BYTES``).
    READ_BYTES = 64 * 1024

    def __init__(self, state: h11.Connection, stream: _LeanStream) -> None:
        self._h11 = state
        self._stream = stream
        self._first = True

    async def read(self) -> bytes | None:
        """The next piece of the body; ``None`` at its end. Raises httpx2's
        :exc:`~httpx2.ReadError` or :exc:`~httpx2.RemoteProtocolError`, as reading through
        httpx2 would."""
        state = self._h11
        # The body's first piece often follows its head at once (a server writing them
        # apart): taken now if it is there, before anyone else's turn.
        first, self._first = self._first, False
        while True:
            try:
                event = state.next_event()
            except h11.RemoteProtocolError as exc:
                raise httpx2.RemoteProtocolError(str(exc)) from exc
            if event is h11.NEED_DATA:
                try:
                    ready = self._stream.read_ready(self.READ_BYTES) if first else None
                    first = False
                    data = (
                        ready
                        if ready is not None
                        else await self._stream.read(self.READ_BYTES, None)
                    )
                except httpcore2.NetworkError as exc:
                    raise httpx2.ReadError(str(exc)) from exc
                except httpcore2.ProtocolError as exc:
                    raise httpx2.RemoteProtocolError(str(exc)) from exc
                if not data and state.their_state == h11.SEND_RESPONSE:
                    raise httpx2.RemoteProtocolError(
                        "Server disconnected without sending a response."
                    )
                state.receive_data(data)
            elif type(event) is h11.Data:
                return bytes(event.data)
            elif type(event) is h11.EndOfMessage or event is h11.PAUSED:
                return None


def lean_body(response: httpx2.Response) -> LeanBody | None:
    """A :class:`LeanBody` for a streamed response of a client given the lean backend, or
    ``None`` where the response is not exactly what it expects (a proxied or HTTP/2
    connection, a content encoding to undo, a read timeout, another httpx2 or httpcore2):
    read that one with ``aiter_bytes()``. Nothing of httpx2's or httpcore2's has been read or
    changed either way."""
    encoding = response.headers.get("content-encoding")
    if encoding is not None and encoding.strip().lower() not in ("", "identity"):
        return None
    outer = response.stream  # (a client's response wraps its transport's stream)
    if type(outer) is httpx2_client.BoundAsyncStream:
        outer = outer._stream
    pooled = getattr(outer, "_httpcore_stream", None)
    inner = getattr(pooled, "_stream", None)
    connection = getattr(inner, "_connection", None)
    request = getattr(inner, "_request", None)
    if not (
        type(outer) is httpx2_default.AsyncResponseStream
        and type(pooled) is httpcore2_pool.PoolByteStream
        and type(inner) is httpcore2_http11.HTTP11ConnectionByteStream
        and type(connection) is httpcore2.AsyncHTTP11Connection
        and isinstance(request, httpcore2.Request)
        and request.extensions.get("timeout", {}).get("read") is None
    ):
        return None
    state = getattr(connection, "_h11_state", None)
    stream = getattr(connection, "_network_stream", None)
    if not isinstance(state, h11.Connection) or not isinstance(stream, _LeanStream):
        return None
    _take_locks_promptly(getattr(pooled._pool_request, "connection", None), "_request_lock")
    _take_locks_promptly(connection, "_state_lock")
    return LeanBody(state, stream)


class _PromptLock:
    """trio's lock, taken without a schedule point when it is free, as httpcore2 takes anyio's
    on asyncio (``fast_acquire=True``); otherwise waited for as trio's is. Only what
    httpcore2's ``AsyncLock`` calls on it. (Taking a free one is not a cancellation point
    either: a request reaches these locks through the pool's wait, which is one.)"""

    __slots__ = ("_lock",)

    def __init__(self) -> None:
        self._lock = trio.Lock()

    async def acquire(self) -> None:
        try:
            self._lock.acquire_nowait()
        except trio.WouldBlock:
            await self._lock.acquire()

    def release(self) -> None:
        self._lock.release()


def _take_locks_promptly(connection: object, name: str) -> None:
    """Give ``connection``'s httpcore2 lock ``name`` a :class:`_PromptLock`, if it is free and
    not given one yet: on trio, httpcore2 takes a connection's locks with ``trio.Lock``, a
    schedule point each time, three per request (docs/upstream-bugs.md). Called with the
    response's headers read, when neither lock is held (each guards a step of the request's
    start, and the connection serves one request at a time); from the connection's next
    request on."""
    lock = getattr(connection, name, None)
    if type(lock) is not httpcore2_sync.AsyncLock:
        return
    if getattr(lock, "_backend", None) != "trio":  # (httpcore2 picks it at the first use)
        return
    inner = lock._trio_lock
    if type(inner) is trio.Lock and not inner.locked():  # (a waiter would hold it: none)
        lock._trio_lock = _PromptLock()  # type: ignore[assignment]


class _Template:
    """What ``client.build_request("POST", url, json=..., headers=headers)`` builds, but for
    its body and ``Content-Length``, as httpcore2 takes it; and what it was built from (see
    :func:`send_json`)."""

    __slots__ = (
        "client_headers",
        "extensions",
        "headers",
        "length_at",
        "request_headers",
        "settings",
        "url",
    )

    def __init__(
        self, client: httpx2.AsyncClient, headers: Mapping[str, str], request: httpx2.Request
    ) -> None:
        self.client_headers = client.headers.raw
        self.request_headers = dict(headers)
        self.settings = (client.params, client.base_url)
        self.url = httpcore2.URL(
            scheme=request.url.raw_scheme,
            host=request.url.raw_host,
            port=request.url.port,
            target=request.url.raw_path,
        )
        self.headers = request.headers.raw
        lengths = [
            i for i, (name, _) in enumerate(self.headers) if name.lower() == b"content-length"
        ]
        self.length_at = lengths[0] if len(lengths) == 1 else None
        self.extensions = request.extensions

    def fits(self, client: httpx2.AsyncClient, headers: Mapping[str, str]) -> bool:
        """Whether ``client`` would build the same request with ``headers`` now (a client's
        settings may change, even in place: its headers and its timeout can)."""
        params, base_url = self.settings
        return (
            client.params is params  # (neither of these changes in place)
            and client.base_url is base_url
            and client.headers.raw == self.client_headers
            and headers == self.request_headers
            and client.timeout.as_dict() == self.extensions["timeout"]
        )


#: The JSON httpx2 writes (``json.dumps`` with these settings builds one per call).
_JSON = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"), allow_nan=False)

#: A client's templates, by URL (at most :data:`MAX_TEMPLATES` of them).
_templates: weakref.WeakKeyDictionary[httpx2.AsyncClient, dict[httpx2.URL, _Template]] = (
    weakref.WeakKeyDictionary()
)
MAX_TEMPLATES = 16


async def send_json(
    client: httpx2.AsyncClient,
    transport: httpx2.AsyncHTTPTransport,
    url: httpx2.URL,
    headers: Mapping[str, str],
    payload: Any,
) -> httpx2.Response:
    """``POST`` ``payload`` as JSON to ``url`` through ``transport``'s pool, the request as
    ``client.build_request`` builds it, and the response as ``transport`` answers it. A
    request with no one ``Content-Length`` to set (``headers`` ask for ``Transfer-Encoding``,
    say) is built by the client each time and handed to ``transport``. ``client`` is
    httpx2's own class (a subclass may build its requests its own way).

    ``client.build_request`` merges the client's headers, cookies, parameters and timeout
    into a new ``httpx2.Request`` on every call, and ``transport`` turns that into an
    ``httpcore2.Request``: on the way to the first token, about a fifth of the relay's own
    work between reading its client's request and sending the upstream's (220 of about
    1,000 µs, measured in ``tokenrelay serve`` on this machine).
    Here the first request of a client to a URL is built by the client itself and kept,
    and later ones copy it with their own body and ``Content-Length``, while their headers
    and the client's headers, timeout, parameters and base URL are what they were (else it
    is built again). The response has no ``request`` (only ``client.send`` sets one)."""
    templates = _templates.get(client)
    if templates is None:
        templates = _templates[client] = {}
    template = templates.get(url)
    built = None
    if template is None or not template.fits(client, headers):
        built = client.build_request("POST", url, json=payload, headers=headers)
        if len(templates) >= MAX_TEMPLATES and url not in templates:
            templates.clear()  # (a caller with a new URL each time: they would only pile up)
        template = templates[url] = _Template(client, headers, built)
    at = template.length_at
    if at is None:  # no one Content-Length to set: the request as the client builds it
        if built is None:
            built = client.build_request("POST", url, json=payload, headers=headers)
        return await transport.handle_async_request(built)
    content = _JSON.encode(payload).encode()
    raw = template.headers.copy()
    raw[at] = (raw[at][0], b"%d" % len(content))
    core = httpcore2.Request(
        b"POST", template.url, headers=raw, content=content, extensions=dict(template.extensions)
    )
    with httpx2_default.map_httpcore_exceptions():
        response = await transport._pool.handle_async_request(core)
    return httpx2.Response(
        status_code=response.status,
        headers=response.headers,
        stream=httpx2_default.AsyncResponseStream(cast(AsyncIterable[bytes], response.stream)),
        extensions=response.extensions,
    )
