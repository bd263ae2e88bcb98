"""HTTP/2 streams whose writers are held back while their client's window is shut.

hypercorn keeps each HTTP/2 stream's unsent body in a ``StreamBuffer``, whose ``push`` (the
app's write) is to wait while the buffer holds two frames or more, until its sending task
has popped it down again. But ``pop`` lets the writer go whenever it pops less than a frame,
and a stream whose flow-control window the client keeps shut is popped for nothing (zero
bytes) each time its writer writes: the writer is never held back, and the buffer grows
with everything the app writes, for as long as the client stays (docs/upstream-bugs.md).

:func:`hold_back_streams` gives an HTTP/2 connection's streams buffers that hold their
writer back as hypercorn means to: a write that leaves two frames or more waits until the
client has taken the buffer down to less than one frame, and the end of a body waits until
it has taken it all. The wait ends when the connection closes (hypercorn's own never does).

Each buffer tells when its client last took some of it (:meth:`HeldBackBuffer.progress`: a
stream read slowly is not a stream not read), and can give its stream up
(:meth:`HeldBackBuffer.abort`): the stream is reset, and the connection's other streams
go on. A relay stream's writer held back is one its stall check sees, and gives up, as on
HTTP/1; and a stream whose client takes nothing of it for the connection's write fuse is
given up too. (A connection whose client takes nothing at all is its own write's to give
up: ``DirectWriteTCPServer``.)
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import h2.errors
import h2.exceptions
import trio
from hypercorn.events import Closed, Event
from hypercorn.protocol.events import StreamClosed
from hypercorn.protocol.h2 import (
    BUFFER_HIGH_WATER,
    BUFFER_LOW_WATER,
    BufferCompleteError,
    H2Protocol,
    StreamBuffer,
)

__all__ = ["Connection", "HeldBackBuffer", "hold_back_streams"]

#: What of hypercorn's ``H2Protocol`` this relies on (where it is not this shape, streams
#: keep hypercorn's own buffers).
_EXPECTED = ("stream_buffers", "connection", "stream_send", "_flush", "_window_updated")


class Connection(Protocol):
    """What a held-back stream needs of its connection."""

    @property
    def write_fuse(self) -> float:
        """Seconds a client may take nothing of a write before it is given up."""
        ...

    def spawn(self, function: Callable[[], Awaitable[None]]) -> None:
        """Run ``function`` in a task of the connection's."""
        ...


def hold_back_streams(protocol: H2Protocol, connection: Connection) -> bool:
    """From now on, give ``protocol``'s streams buffers that hold their writers back (see
    the module's doc), and release every writer still waiting once it has handled the
    connection's close. Call it before ``protocol`` has any stream. False (and nothing
    changed) where ``protocol`` is not the shape expected."""
    if not all(hasattr(protocol, name) for name in _EXPECTED) or protocol.stream_buffers:
        return False
    protocol.stream_buffers = _HeldBackBuffers(protocol, connection)
    handle = protocol.handle

    async def handle_then_release(event: Event) -> None:
        await handle(event)
        if isinstance(event, Closed):  # (hypercorn closes the streams, not their buffers)
            for buffer in list(protocol.stream_buffers.values()):
                await buffer.close()

    protocol.handle = handle_then_release  # type: ignore[method-assign]
    return True


class _HeldBackBuffers(dict[int, StreamBuffer]):
    """A connection's streams' buffers: each one hypercorn makes is one of ours instead."""

    def __init__(self, protocol: H2Protocol, connection: Connection) -> None:
        super().__init__()
        self._protocol = protocol
        self._connection = connection

    def __setitem__(self, stream_id: int, buffer: StreamBuffer) -> None:
        if type(buffer) is StreamBuffer:
            buffer = HeldBackBuffer(
                type(buffer._is_empty), self._protocol, stream_id, self._connection
            )
        super().__setitem__(stream_id, buffer)


class HeldBackBuffer(StreamBuffer):
    """One stream's unsent body, whose writer waits while it is full (see the module's doc)."""

    def __init__(
        self, event_class: Any, protocol: H2Protocol, stream_id: int, connection: Connection
    ) -> None:
        super().__init__(event_class)
        self._protocol = protocol
        self._stream_id = stream_id
        self._connection = connection
        #: Set (and replaced) each time some of the buffer is taken, or it is closed.
        self._taken = trio.Event()
        self._given_up = False
        #: When the client last took some of the stream's body.
        self._taken_at = -math.inf

    async def push(self, data: bytes) -> None:
        if self._complete:
            raise BufferCompleteError()
        self.buffer.extend(data)
        await self._is_empty.clear()
        if len(self.buffer) >= BUFFER_HIGH_WATER:
            await self._wait_until_below(BUFFER_LOW_WATER)

    async def drain(self) -> None:
        await self._wait_until_below(1)

    async def pop(self, max_length: int) -> bytes:
        data = await super().pop(max_length)
        if data:
            self._taken_at = trio.current_time()
            self._taken.set()
            self._taken = trio.Event()
        return data

    async def close(self) -> None:
        await super().close()  # (empties the buffer)
        self._taken.set()

    def progress(self) -> float:
        """When the client last took some of the stream's body."""
        return self._taken_at

    def abort(self) -> None:
        """Give the stream up: it is reset (``CANCEL``), its writer let go, and the
        connection's other streams go on."""
        if not self._given_up:
            self._given_up = True
            self._connection.spawn(self._reset)

    async def _reset(self) -> None:
        protocol, stream_id = self._protocol, self._stream_id
        with contextlib.suppress(h2.exceptions.ProtocolError):  # (closed already)
            protocol.connection.reset_stream(stream_id, h2.errors.ErrorCodes.CANCEL)
        # The writer let go first: the frame's write may wait behind the connection's own.
        await self.close()
        # Closed as hypercorn closes a stream (its app told the client left; the connection
        # idle, or told to go away at shutdown, if that was its last), then the frame sent.
        await protocol.stream_send(StreamClosed(stream_id=stream_id))
        await protocol._flush()
        await protocol._window_updated(stream_id)  # (its sending task forgets it)

    async def _wait_until_below(self, size: float) -> None:
        """Wait until the buffer holds less than ``size`` bytes (or is closed). If its client
        takes nothing of it for the connection's write fuse, the stream is given up."""
        fuse = self._connection.write_fuse
        while len(self.buffer) >= size:
            with trio.move_on_after(fuse) as fused:
                await self._taken.wait()
            if fused.cancelled_caught:  # (nothing taken: that would have woken it)
                self.abort()  # (which closes this buffer)
                fuse = math.inf
