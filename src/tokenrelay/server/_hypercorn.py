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
client that reads slowly), for a lock that is held, and for TLS. A write stays a schedule
point (one, not two), is cancellable only before any byte is written, and a connection that
fails is reported to hypercorn's protocol exactly as before.

It also lets a response's writes be gathered (:class:`gathered_writes`): hypercorn writes a
response's head as soon as the app starts the response, and the end of a chunked body (its
``0\r\n\r\n``) apart from the body's last bytes, each a system call and a schedule point
of its own. Inside ``async with gathered_writes():`` a task's writes are kept and made as
one, at the block's end.

hypercorn has no parameter for the server class: :func:`use_direct_writes` sets it in
hypercorn's trio worker for the whole process, which :func:`tokenrelay.server.serve` (and so
``tokenrelay serve``) does before it starts serving.
"""

from __future__ import annotations

import os
from contextvars import ContextVar
from types import TracebackType

import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

__all__ = ["DirectWriteTCPServer", "gathered_writes", "use_direct_writes"]

#: Whether a socket's descriptor can be written with ``os.write`` (not on Windows).
_WRITE_FD = os.name == "posix"


class DirectWriteTCPServer(TCPServer):
    """hypercorn's ``TCPServer``, whose writes on plain TCP go straight to the socket when
    the kernel takes them, and can be gathered (:class:`gathered_writes`)."""

    #: Bytes gathered and not written yet. Any write of this connection, from any task,
    #: writes them first, and a close writes them before it closes: nothing is reordered.
    _gathered = b""

    async def protocol_send(self, event: Event) -> None:
        # hypercorn annotates it as an SSLStream; on plain TCP it is a SocketStream.
        plain = isinstance(self.stream, trio.SocketStream)
        if type(event) is not RawData or not plain:
            if self._gathered:  # (Closed, say: what was gathered goes out first)
                await self._write(self._take_gathered())
            await super().protocol_send(event)
            return
        gathering = _GATHERING.get()
        # (A task started inside a block inherits its context, not its gathering.)
        if gathering is not None and gathering._task is trio.lowlevel.current_task():
            gathering._servers[self] = None
            self._gathered += event.data
            return
        data = event.data
        if self._gathered:
            data = self._take_gathered() + data
        await self._write(data)

    def _take_gathered(self) -> bytes:
        data, self._gathered = self._gathered, b""
        return data

    async def _write(self, data: bytes) -> None:
        stream: trio.abc.Stream = self.stream
        assert isinstance(stream, trio.SocketStream)
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:  # a write in progress: wait for it as hypercorn does
            await super().protocol_send(RawData(data=data))
            return
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # nothing is written if cancelled
            try:
                sent = os.write(stream.socket.fileno(), data) if data and _WRITE_FD else 0
            except BlockingIOError:  # the socket's buffer is full: wait below
                sent = 0
            except OSError:  # reset, closed, or shut down by hypercorn's reading task
                await self.protocol.handle(Closed())
                return
            if sent < len(data):
                try:
                    with trio.CancelScope(shield=True):
                        await stream.send_all(memoryview(data)[sent:])
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    await self.protocol.handle(Closed())
            else:
                await trio.lowlevel.cancel_shielded_checkpoint()
        finally:
            lock.release()


_GATHERING: ContextVar[gathered_writes | None] = ContextVar("tokenrelay_gathering", default=None)


class gathered_writes:
    """``async with gathered_writes():`` keeps the socket writes that this task makes in the
    block (on connections served by :class:`DirectWriteTCPServer`), and makes them as one
    write at the block's end: a response's head and the first piece of its body, say, or the
    last piece and the end of a chunked body. One system call and one schedule point, where
    each write is one of each; nothing else in the block waits for them.

    Nothing is reordered: any other write of the connection, from any task, writes what is
    gathered first, and so does closing it. A block that raises leaves what it gathered to
    be written that way (or dropped with the connection). Elsewhere (TLS, another server) the
    writes are made as they come. Only for HTTP/1: an HTTP/2 write may wait for flow
    control, which must not wait for bytes kept here.
    """

    __slots__ = ("_servers", "_task", "_token")

    def __init__(self) -> None:
        #: The servers with writes kept by this block, in order (a dict as an ordered set).
        self._servers: dict[DirectWriteTCPServer, None] = {}

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
        if exc_value is None:
            for server in self._servers:
                if server._gathered:  # (unless another write took it already)
                    await server._write(server._take_gathered())


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
