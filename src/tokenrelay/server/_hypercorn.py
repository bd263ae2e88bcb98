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

hypercorn has no parameter for the server class: :func:`use_direct_writes` sets it in
hypercorn's trio worker for the whole process, which :func:`tokenrelay.server.serve` (and so
``tokenrelay serve``) does before it starts serving.
"""

from __future__ import annotations

import os

import hypercorn.trio.run
import trio
from hypercorn.events import Closed, Event, RawData
from hypercorn.trio.tcp_server import TCPServer

__all__ = ["DirectWriteTCPServer", "use_direct_writes"]

#: Whether a socket's descriptor can be written with ``os.write`` (not on Windows).
_WRITE_FD = os.name == "posix"


class DirectWriteTCPServer(TCPServer):
    """hypercorn's ``TCPServer``, whose writes on plain TCP go straight to the socket when
    the kernel takes them."""

    async def protocol_send(self, event: Event) -> None:
        # hypercorn annotates it as an SSLStream; on plain TCP it is a SocketStream.
        stream: trio.abc.Stream = self.stream
        if type(event) is not RawData or not isinstance(stream, trio.SocketStream):
            await super().protocol_send(event)
            return
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:  # a write in progress: wait for it as hypercorn does
            await super().protocol_send(event)
            return
        try:
            await trio.lowlevel.checkpoint_if_cancelled()  # nothing is written if cancelled
            data = event.data
            try:
                sent = os.write(stream.socket.fileno(), data) if _WRITE_FD else 0
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
