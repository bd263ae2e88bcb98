"""hypercorn's trio worker, with each write of a plain TCP connection handed to the kernel
at once.

hypercorn writes every ASGI body message through ``TCPServer.protocol_send``: it takes the
connection's send lock (a schedule point even when the lock is free), enters a shielded
cancel scope, and calls trio's ``SocketStream.send_all`` (trio's try-then-wait socket
wrapper, and a second schedule point). A streamed token is one such write, so that is paid
per token: measured alone, 36.5 µs of server CPU per write, where handing the bytes to the
socket directly costs 15.6 µs (``benchmarks/hypercorn_write.py``; docs/upstream-bugs.md).

:class:`DirectWriteTCPServer` takes the free lock without waiting, writes what the kernel
takes at once, and keeps hypercorn's own shielded ``send_all`` for what it does not take (a
client that reads slowly), for a lock that is held, and for TLS. A write the kernel takes
whole passes no schedule point when its task has passed one since its previous write (a
stream's writer, which waits for its next piece between writes: one trip through the
scheduler per piece, not two), and one otherwise (writes one after another, so that a
writer with nothing else to wait for cannot hold the loop). A write is cancellable only
before any byte is written, and a connection that fails is reported to hypercorn's protocol
exactly as before.

It also lets a response's writes be gathered (:class:`gathered_writes`): hypercorn writes a
response's head as soon as the app starts the response, and the end of a chunked body (its
``0\r\n\r\n``) apart from the body's last bytes, each a system call and a schedule point
of its own. Inside ``async with gathered_writes():`` a task's writes are kept and made as
one, at the block's end.

Its reads of a plain TCP connection take what is there without a schedule point, and pass
one after handing it to hypercorn's protocol instead (unless the read waited or the protocol
passed one): a request's app task is started one trip through the scheduler sooner. (trio's
``receive_some`` passes one after a read that finds data.)

A response's chunked body can also be written from outside its app's task
(:meth:`DirectWriteTCPServer.write_chunk_now`, found with :func:`chunk_writer`): a relayed
token is written by the run's producer, in the step that read it, while the stream's task
waits (see ``server/_responses.py`` and ``server/_responses_api.py``). Only when nothing of
the connection is under way or gathered; what the kernel takes in part is kept as gathered
bytes, and so, for a writer that cannot make the same bytes again (``keep``), is a chunk it
takes none of.

And it times a connection's keep-alive without a task. hypercorn starts a task (through
``nursery.start``, a round trip through the scheduler, under a lock) each time a connection
becomes idle, when it opens and after each response, and cancels it (the lock again) when a
request arrives: on the way to every request's first byte, and a fifth of a short request's
task steps. Here the connection's reading task, which waits for the next request anyway,
waits under a cancel scope whose deadline is the keep-alive timeout while the connection is
idle (no deadline while a request is in flight); when it passes, the connection is closed as
hypercorn's idle task closes it. A worker's shutdown closes its idle connections at once,
as hypercorn's idle tasks do: setting the worker's ``terminated`` event expires their
deadlines.

A write that waits for a client to read is shielded, as hypercorn's own are (a write cut
short would cut the response short), but not for ever, as hypercorn's are: it is given up,
and the connection closed, once the worker's graceful shutdown has waited its timeout, or
when :meth:`DirectWriteTCPServer.abort` (a stream stalled) or :func:`abort_writes` (a second
shutdown signal) says so. (docs/upstream-bugs.md)

hypercorn has no parameter for the server class: :func:`use_direct_writes` sets it in
hypercorn's trio worker for the whole process, which :func:`tokenrelay.server.serve` (and so
``tokenrelay serve``) does before it starts serving.
"""

from __future__ import annotations

import contextlib
import math
import os
import weakref
from collections.abc import Awaitable, Callable
from contextvars import ContextVar
from types import TracebackType
from typing import Any, Protocol, cast

import hypercorn.trio.run
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, Event, RawData, Updated
from hypercorn.protocol.h2 import H2Protocol
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.trio.tcp_server import MAX_RECV, TCPServer
from hypercorn.trio.worker_context import TrioSingleTask, WorkerContext
from hypercorn.typing import Scope

from .._steps import schedule_points, yielded_since
from ._h2_flow import HeldBackBuffer, hold_back_streams

__all__ = [
    "DirectWriteTCPServer",
    "abort_writes",
    "chunk_writer",
    "connection_of",
    "gathered_writes",
    "give_up_writes_after",
    "note_connection",
    "use_direct_writes",
    "writes_of",
]

#: Whether a socket's descriptor can be written with ``os.write`` (not on Windows).
_WRITE_FD = os.name == "posix"


class DirectWriteTCPServer(TCPServer):
    """hypercorn's ``TCPServer``, whose writes on plain TCP go straight to the socket when
    the kernel takes them, and can be gathered (:class:`gathered_writes`)."""

    #: Bytes gathered and not written yet. Any write of this connection, from any task,
    #: writes them first, and a close writes them before it closes: nothing is reordered.
    _gathered = b""
    #: When the connection, idle, is closed: no deadline while a request is in flight (and
    #: where hypercorn's own idle task times it).
    _idle_at = math.inf
    #: The scope of the reading task's wait for data, whose deadline is ``_idle_at``.
    _reading: trio.CancelScope | None = None
    #: The worker's connections (``None``: a worker context not of the shape expected).
    _worker: _IdleConnections | None = None
    #: The scope of a write waiting for the client to take the rest of it: shielded, so
    #: that only :meth:`abort` or the worker's shutdown deadline ends it.
    _waiting: trio.CancelScope | None = None
    #: When such a write last made progress (the client took some of it).
    progressed_at = -math.inf
    #: Whether its HTTP/2 streams' buffers hold their writers back (``_h2_flow``).
    _holding_back = False

    async def run(self) -> None:
        # The connection's tasks (its requests' apps among them) are started from this one
        # and inherit its context: an app finds its connection there (note_connection).
        _SERVING.set(self)
        idle = _IdleConnections.of(self.context)
        if idle is None:  # (a worker context not of the shape expected: hypercorn's own task)
            await super().run()
            return
        self._worker = idle
        self.idle_task = _KeepAliveDeadline(self, idle)
        try:
            await super().run()
        finally:
            idle.servers.discard(self)

    def abort(self) -> None:
        """Give up on the write of this connection that waits for its client to read (a
        client that reads nothing would hold it, and the connection's tasks, for ever): the
        connection is closed, the response cut short. Nothing if no write waits."""
        if self._waiting is not None:
            self._waiting.cancel(reason="the client's write was given up")

    def progress(self) -> float:
        """When the client last took some of a write of this connection's that waited for
        it (:attr:`progressed_at`)."""
        return self.progressed_at

    def spawn(self, function: Callable[[], Awaitable[None]]) -> None:
        """Run ``function`` in a task of this connection's (it ends with them); nothing if
        the connection's tasks are over."""
        if getattr(self._task_group, "_nursery", None) is not None:
            self._task_group.spawn(function)

    @property
    def write_fuse(self) -> float:
        """Seconds the client may take nothing of a write before it is given up
        (:func:`give_up_writes_after`; ``math.inf``: no limit)."""
        return _FUSES.get(self.config, math.inf)

    def write_chunk_now(self, data: bytes, *, keep: bool = False) -> bool:
        """Write ``data`` as one chunk of the HTTP/1.1 chunked body in progress, at once and
        without waiting, if nothing stands in the way: no write of this connection in
        progress, nothing gathered (:attr:`writable`). False if nothing was written (write
        it the usual way: a write is under way, the kernel takes nothing now, or the
        connection is gone). True if it was: whole, or in part, the rest kept as gathered
        bytes, which the connection's next write sends first (:attr:`pending`;
        :meth:`flush`). Empty data is no chunk at all (an empty chunk would end the body):
        True, and nothing written.

        ``keep``: for a writer that cannot make the same bytes again (its rendering moves
        on with each event): on a :attr:`writable` connection the chunk is always taken, a
        chunk the kernel takes none of now (or that finds the connection gone) kept whole
        as gathered bytes, for :meth:`flush` to write or to find the connection gone.

        For a writer that knows its response is an HTTP/1.1 chunked body under way (see
        :func:`chunk_writer`); hypercorn's protocol does not see these bytes, which h11
        does not count in a chunked body."""
        if not data:
            return True
        if not self.writable:
            return False
        stream: trio.abc.Stream = self.stream
        assert isinstance(stream, trio.SocketStream)
        frame = b"%x\r\n%b\r\n" % (len(data), data)
        try:
            sent = os.write(stream.socket.fileno(), frame)
        except OSError:  # full, reset, or closed: the usual write finds out and says so
            if not keep:
                return False
            sent = 0
        if sent < len(frame):
            self._gathered = frame[sent:]
        return True

    @property
    def pending(self) -> bool:
        """Whether bytes gathered (or left by :meth:`write_chunk_now`) wait to be written."""
        return bool(self._gathered)

    @property
    def writable(self) -> bool:
        """Whether :meth:`write_chunk_now` would try to write now: a plain TCP connection
        with no write under way and nothing gathered."""
        stream: trio.abc.Stream = self.stream
        return (
            not self._gathered
            and not self.send_lock.locked()
            and isinstance(stream, trio.SocketStream)
        )

    async def flush(self) -> None:
        """Write what is :attr:`pending`, waiting for the client to take it if need be."""
        if self._gathered:
            await self._write(b"")

    def take_back(self) -> bytes:
        """Take back what is gathered and not written yet (``b""`` if nothing is, written by
        another write in between): nothing of it will be written. For bytes kept by
        ``gathered_writes(write=False)`` and made again otherwise."""
        return self._take_gathered()

    def keep(self, data: bytes) -> None:
        """Gather ``data`` after what is gathered already: the connection's next write sends
        it first (see :class:`gathered_writes`)."""
        self._gathered += data

    async def _read_data(self) -> None:
        # hypercorn's loop, its wait under the keep-alive deadline (see the module's doc), and
        # on plain TCP its schedule point after the data is handed to the protocol rather
        # than before: a request's app starts one trip through the scheduler sooner. Each
        # pass passes one at least: in the read (a wait), in the protocol, or at its end.
        read_timeout = self.config.read_timeout or math.inf
        stream: trio.abc.Stream = self.stream  # (annotated by hypercorn as an SSLStream)
        plain = isinstance(stream, trio.SocketStream) and _WRITE_FD
        task = trio.lowlevel.current_task()
        data: bytes | bytearray
        while True:
            points = schedule_points(task)
            with trio.CancelScope(deadline=self._idle_at) as reading:
                self._reading = reading
                try:
                    with trio.fail_after(read_timeout):
                        if plain:
                            data = await self._receive_plain()
                        else:
                            data = await stream.receive_some(MAX_RECV)
                except (trio.ClosedResourceError, trio.BrokenResourceError, trio.TooSlowError):
                    break
                finally:
                    self._reading = None
            if reading.cancelled_caught:
                if self._idle_at == math.inf:  # (a request came in since: read on)
                    continue
                # What hypercorn's idle task does when the keep-alive timeout passes.
                with trio.CancelScope(shield=True):
                    await self._initiate_server_close()
                break
            await self.protocol.handle(RawData(bytes(data)))
            if data == b"":
                break
            if plain and not yielded_since(task, points):  # (a read that waited has)
                await trio.lowlevel.cancel_shielded_checkpoint()  # one per read, at least
        await self.protocol.handle(Closed())

    async def _receive_plain(self) -> bytes:
        # trio's ``receive_some``, but for a read that finds data there: no schedule point
        # (``_read_data`` passes one after handling it). Waits only if nothing is there.
        stream: trio.abc.Stream = self.stream
        assert isinstance(stream, trio.SocketStream)
        sock = stream.socket
        await trio.lowlevel.checkpoint_if_cancelled()
        while True:
            try:
                return os.read(sock.fileno(), MAX_RECV)
            except BlockingIOError:
                pass
            except OSError as exc:  # reset, or closed (a descriptor of -1)
                raise trio.BrokenResourceError from exc
            await trio.lowlevel.wait_readable(sock)

    async def _close(self) -> None:
        # hypercorn's close (the end of our side of the stream, then the socket), called when
        # the protocol closes the connection and again as the connection's task ends: on
        # plain TCP without the two schedule points of ``send_eof`` and ``aclose``, and
        # nothing the second time.
        stream: trio.abc.Stream = self.stream  # (annotated by hypercorn as an SSLStream)
        if not isinstance(stream, trio.SocketStream):
            await super()._close()
            return
        sock = stream.socket
        if sock.fileno() == -1:  # closed already
            return
        if not sock.did_shutdown_SHUT_WR:
            with contextlib.suppress(OSError):  # (reset, or not connected any more)
                sock.shutdown(trio.socket.SHUT_WR)
        sock.close()  # (what the stream's aclose does, before its schedule point)

    def _set_idle_at(self, deadline: float) -> None:
        self._idle_at = deadline
        if self._reading is not None:
            self._reading.deadline = deadline

    async def protocol_send(self, event: Event) -> None:
        if not self._holding_back and type(self.protocol.protocol) is H2Protocol:
            # (An HTTP/2 connection's first write, before it has any stream.)
            self._holding_back = True
            hold_back_streams(self.protocol.protocol, self)
        if type(event) is Updated:
            # No bytes, so nothing to write first; and at once: the keep-alive deadline's
            # starts and stops must keep their order (hypercorn's idle task takes a lock for
            # it), and a write first would let the reading task overtake a start with the
            # stop of a pipelined request.
            await super().protocol_send(event)
            return
        # hypercorn annotates it as an SSLStream; on plain TCP it is a SocketStream.
        plain = isinstance(self.stream, trio.SocketStream)
        if type(event) is not RawData or not plain:
            if self._gathered:  # (Closed, say: what was gathered goes out first)
                await self._write(b"")
            await super().protocol_send(event)
            return
        gathering = _GATHERING.get()
        # (A task started inside a block inherits its context, not its gathering.)
        if gathering is not None and gathering._task is trio.lowlevel.current_task():
            gathering._servers[self] = None
            self._gathered += event.data
            return
        await self._write(event.data)

    def _take_gathered(self) -> bytes:
        data, self._gathered = self._gathered, b""
        return data

    async def _write(self, data: bytes) -> None:
        """Write what is gathered, then ``data``. Cancellable only before any byte is
        written (what was gathered then stays gathered); once writing, it waits (shielded)
        for the client to take it all, as hypercorn's own write does."""
        global _last_write
        stream: trio.abc.Stream = self.stream
        assert isinstance(stream, trio.SocketStream)
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:  # a write in progress: wait for it as hypercorn does
            await lock.acquire()
            waited = True
        else:
            waited = False
        try:
            if not waited:
                await trio.lowlevel.checkpoint_if_cancelled()  # nothing is written if cancelled
            if self._gathered:  # (taken only now, past the last point of cancellation)
                data = self._take_gathered() + data
            try:
                sent = os.write(stream.socket.fileno(), data) if data and _WRITE_FD else 0
            except BlockingIOError:  # the socket's buffer is full: wait below
                sent = 0
            except OSError:  # reset, closed, or shut down by hypercorn's reading task
                await self.protocol.handle(Closed())
                return
            task = trio.lowlevel.current_task()
            if sent < len(data):
                await self._wait_for_client(stream, memoryview(data)[sent:])
            elif _last_write == (id(task), schedule_points(task)):
                # Taken whole, by a task that has passed no schedule point since its previous
                # write (of any connection: another task can only have written in between if
                # this one yielded, so one mark is exact).
                await trio.lowlevel.cancel_shielded_checkpoint()
            _last_write = (id(task), schedule_points(task))
        finally:
            lock.release()

    async def _wait_for_client(self, stream: trio.SocketStream, rest: memoryview) -> None:
        """Write ``rest``, waiting for the client to take it, shielded as hypercorn's own
        writes are (a write cut short would cut the response short), but not for ever:
        :meth:`abort` ends the wait, and so does the worker's shutdown, once its graceful
        timeout has passed (hypercorn then cancels the connections, which a shielded wait
        would outlive). A wait so ended closes the connection, and so does one in which the
        client takes nothing for the seconds :func:`give_up_writes_after` gives its worker."""
        worker = self._worker
        deadline = math.inf
        if worker is not None and worker.terminated_at is not None:
            deadline = worker.terminated_at + self.config.graceful_timeout
        closed = False
        with trio.CancelScope(shield=True, deadline=deadline) as waiting:
            self._waiting = waiting
            if worker is not None:
                worker.waiting.add(self)
            try:
                await self._send_all(stream, rest)
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                closed = True
            except _NoProgress:
                waiting.cancel(reason="the client took nothing for too long")
            finally:
                self._waiting = None
                if worker is not None:
                    worker.waiting.discard(self)
        if waiting.cancel_called:  # (the rest of the response can never be written)
            stream.socket.close()
            closed = True
        if closed:
            await self.protocol.handle(Closed())

    async def _send_all(self, stream: trio.SocketStream, rest: memoryview) -> None:
        """``stream.send_all(rest)``, noting each time the client takes some
        (:attr:`progressed_at`): a client that reads slowly is not one that reads nothing."""
        if not _WRITE_FD:
            await stream.send_all(rest)
            return
        sock = stream.socket
        fuse = _FUSES.get(self.config, math.inf)
        while rest:
            fd = sock.fileno()
            if fd < 0:
                raise trio.ClosedResourceError("the connection was closed")
            with trio.move_on_after(fuse) as fused:
                await trio.lowlevel.wait_writable(sock)
            if fused.cancelled_caught:
                raise _NoProgress
            try:
                sent = os.write(sock.fileno(), rest)
            except BlockingIOError:  # woken, yet no room: wait again
                continue
            except OSError as exc:  # reset, or closed (a descriptor of -1)
                raise trio.BrokenResourceError from exc
            rest = rest[sent:]
            self.progressed_at = trio.current_time()


class _NoProgress(Exception):
    """A write's client took nothing of it for as long as its worker allows."""


#: Per worker (by its hypercorn configuration): how long a write may wait with its client
#: taking nothing (:func:`give_up_writes_after`).
_FUSES: weakref.WeakKeyDictionary[Config, float] = weakref.WeakKeyDictionary()


def give_up_writes_after(config: Config, seconds: float | None) -> None:
    """Give up a write whose client takes nothing of it for ``seconds`` (``None``: wait for
    ever), on the workers serving with ``config``: any response's write, a large answer to a
    client that reads nothing, say. Its connection is closed (on HTTP/2, its stream reset).
    (A relay stream's own stall check acts sooner, with its run's release:
    ``RelayService._check_stall``.)"""
    if seconds is None:
        _FUSES.pop(config, None)
    else:
        _FUSES[config] = seconds


#: The task of the last write taken whole, and its count of schedule points then.
_last_write: tuple[int, int | None] = (0, None)


class _KeepAliveDeadline(TrioSingleTask):
    """What hypercorn's ``TCPServer`` calls its idle task (started when the connection
    becomes idle, stopped when a request arrives), as a deadline on the connection's reads."""

    def __init__(self, server: DirectWriteTCPServer, idle: _IdleConnections) -> None:
        super().__init__()
        self._server = server
        self._idle = idle

    async def restart(self, task_group: Any, action: Callable[..., Any]) -> None:
        # ``action`` is hypercorn's ``_idle_timeout``, which the reading task does instead.
        server = self._server
        self._idle.servers.add(server)
        if self._idle.terminated.is_set():
            server._set_idle_at(-math.inf)  # shutting down: idle connections close at once
        else:
            server._set_idle_at(trio.current_time() + server.config.keep_alive_timeout)

    async def stop(self) -> None:
        self._idle.servers.discard(self._server)
        self._server._set_idle_at(math.inf)


class _IdleConnections:
    """A worker's idle connections, closed at once when the worker shuts down: hypercorn's
    trio worker sets its context's ``terminated`` event then, which wakes the idle tasks of
    its connections; here setting it expires the idle connections' deadlines."""

    __slots__ = ("servers", "terminated", "terminated_at", "waiting")

    def __init__(self, terminated: Any) -> None:
        self.servers: set[DirectWriteTCPServer] = set()
        #: The worker's ``terminated`` event.
        self.terminated = terminated
        #: When it was set (the worker's graceful shutdown began).
        self.terminated_at: float | None = None
        #: The connections whose write waits for the client to read.
        self.waiting: set[DirectWriteTCPServer] = set()

    @classmethod
    def of(cls, context: WorkerContext) -> _IdleConnections | None:
        """``context``'s idle connections; ``None`` if its ``terminated`` event is not the
        shape expected (hypercorn's idle task then times the keep-alive, as it ships)."""
        idle = _IDLE.get(context)
        if idle is None:
            terminated: Any = context.terminated
            set_terminated = getattr(terminated, "set", None)
            if set_terminated is None or not callable(getattr(terminated, "is_set", None)):
                return None
            idle = _IDLE[context] = cls(terminated)
            if terminated.is_set():  # (a first connection's task that runs after shutdown began)
                idle.terminated_at = trio.current_time()

            async def set_and_close_idle() -> None:
                await set_terminated()
                idle.terminated_at = trio.current_time()
                idle.close_all()

            terminated.set = set_and_close_idle  # (an attribute of this one event only)
        return idle

    def close_all(self) -> None:
        """Close the idle connections now; give up the writes waiting for a client to read
        once the graceful timeout has passed."""
        for server in list(self.servers):
            server._set_idle_at(-math.inf)
        assert self.terminated_at is not None
        for server in self.waiting:
            if server._waiting is not None:
                server._waiting.deadline = self.terminated_at + server.config.graceful_timeout


#: Each worker's idle connections, by its context.
_IDLE: weakref.WeakKeyDictionary[WorkerContext, _IdleConnections] = weakref.WeakKeyDictionary()

_GATHERING: ContextVar[gathered_writes | None] = ContextVar("tokenrelay_gathering", default=None)

#: The connection whose task this is (set by the connection's task; each of its requests'
#: apps is started from it, and :func:`note_connection` takes it from there).
_SERVING: ContextVar[DirectWriteTCPServer | None] = ContextVar("tokenrelay_serving", default=None)

#: The scope's key for the connection that can write its response's chunks at once.
_CHUNKS = "tokenrelay.chunk_writer"
#: The scope's key for an HTTP/2 request's stream (its held-back buffer).
_STREAM = "tokenrelay.h2_stream"


def note_connection(scope: Scope, send: Callable[..., object]) -> None:
    """At the start of a request's ASGI call, in its app's task: note in ``scope`` the
    :class:`DirectWriteTCPServer` connection the request came in on, if ``send`` is
    hypercorn's own (no middleware between the connection and this call: one that sees the
    response's bytes must see all of them; and an app called in-process by another one,
    through an ASGI transport, in a task of a connection of its own, is not that
    connection's). Then forget it in this task's context: tasks the app starts (a run's
    producer) need not hold on to the connection."""
    server = _SERVING.get()
    if server is None:
        return
    _SERVING.set(None)
    if getattr(send, "__func__", None) is HTTPStream.app_send:
        cast(dict[str, Any], scope)[_CHUNKS] = server
        protocol = server.protocol.protocol
        if server._holding_back and isinstance(protocol, H2Protocol):
            # (the request's stream's own buffer, made before its app was started)
            buffer = protocol.stream_buffers.get(cast(HTTPStream, send.__self__).stream_id)  # type: ignore[attr-defined]
            if isinstance(buffer, HeldBackBuffer):
                cast(dict[str, Any], scope)[_STREAM] = buffer


def connection_of(scope: Scope) -> DirectWriteTCPServer | None:
    """The :class:`DirectWriteTCPServer` connection the request of ``scope`` came in on
    (noted by :func:`note_connection`), if any: what :meth:`DirectWriteTCPServer.abort`
    gives up the response of."""
    server: DirectWriteTCPServer | None = cast(dict[str, Any], scope).get(_CHUNKS)
    return server


class ResponseWrites(Protocol):
    """A response's writes, as its stall check sees them (:func:`writes_of`)."""

    def progress(self) -> float:
        """When the client last took some of a write that waits for it."""
        ...

    def abort(self) -> None:
        """Give the response up: on HTTP/1 its write that waits for the client, and with it
        the connection (nothing if none waits); on HTTP/2 its stream, which is reset."""
        ...


def writes_of(scope: Scope) -> ResponseWrites | None:
    """What gives up the response of the request of ``scope`` and tells of its client's
    progress, when :class:`DirectWriteTCPServer` serves it: its connection on HTTP/1, its
    stream on HTTP/2 (:class:`~tokenrelay.server._h2_flow.HeldBackBuffer`)."""
    stream: HeldBackBuffer | None = cast(dict[str, Any], scope).get(_STREAM)
    return stream if stream is not None else connection_of(scope)


def chunk_writer(scope: Scope) -> DirectWriteTCPServer | None:
    """The connection of the request of ``scope`` (noted by :func:`note_connection`), when
    it can write the chunks of the response's body at once
    (:meth:`DirectWriteTCPServer.write_chunk_now`): served by :class:`DirectWriteTCPServer`
    on plain TCP (on POSIX), over HTTP/1.1, whose bodies without a length are chunked, and
    with a body at all (not for ``HEAD``). ``None`` otherwise (HTTP/1.0 and HTTP/2 frame
    bodies otherwise, TLS writes through its own stream)."""
    server = connection_of(scope)
    if server is None or scope.get("http_version") != "1.1" or scope.get("method") == "HEAD":
        return None
    stream: trio.abc.Stream = server.stream  # (annotated by hypercorn as an SSLStream)
    return server if isinstance(stream, trio.SocketStream) and _WRITE_FD else None


class gathered_writes:
    """``async with gathered_writes():`` keeps the socket writes that this task makes in the
    block (on connections served by :class:`DirectWriteTCPServer`), and makes them as one
    write at the block's end: a response's head and the first piece of its body, say, or the
    last piece and the end of a chunked body. One system call where each write is one;
    nothing else in the block waits for them.

    Nothing is reordered: any other write of the connection, from any task, writes what is
    gathered first, and so does closing it. A block that raises leaves what it gathered to
    be written that way (or dropped with the connection). Elsewhere (TLS, another server) the
    writes are made as they come. Only for HTTP/1: an HTTP/2 write may wait for flow
    control, which must not wait for bytes kept here.

    ``gathered_writes(write=False)`` leaves what the block gathered unwritten at its end:
    the connection's next write sends it first, unless it is taken back before
    (:meth:`DirectWriteTCPServer.take_back`). A response's head made ahead of its body, say,
    which the body's first write sends with it.
    """

    __slots__ = ("_servers", "_task", "_token", "_write")

    def __init__(self, *, write: bool = True) -> None:
        #: The servers with writes kept by this block, in order (a dict as an ordered set).
        self._servers: dict[DirectWriteTCPServer, None] = {}
        self._write = write

    async def __aenter__(self) -> None:
        self._task = trio.lowlevel.current_task()
        self._token = _GATHERING.set(self)

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_value: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        _GATHERING.reset(self._token)
        if exc_value is None and self._write:
            for server in self._servers:
                if server._gathered:  # (unless another write took it already)
                    await server._write(b"")


def abort_writes() -> None:
    """Give up every write waiting for its client to read, in every worker of this process
    (:meth:`DirectWriteTCPServer.abort`): for a shutdown that does not wait."""
    for worker in list(_IDLE.values()):
        for server in list(worker.waiting):
            server.abort()


def use_direct_writes() -> bool:
    """Serve every connection that hypercorn's trio worker accepts from now on, in this
    process, with :class:`DirectWriteTCPServer`. Returns whether it is in place: hypercorn's
    worker must look as expected (``hypercorn.trio.run.TCPServer`` its own class, with a
    ``protocol_send`` of its own); otherwise it is left as it is."""
    current = getattr(hypercorn.trio.run, "TCPServer", None)
    if current is DirectWriteTCPServer:
        return True
    if current is not TCPServer or "protocol_send" not in vars(TCPServer):
        return False
    setattr(hypercorn.trio.run, "TCPServer", DirectWriteTCPServer)  # noqa: B010
    return True
