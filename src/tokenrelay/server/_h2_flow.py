"""HTTP/2 streams whose writers are held back while their client's window is shut.

hypercorn keeps each HTTP/2 stream's unsent body in a ``StreamBuffer``, whose ``push`` (the
app's write) is to wait while the buffer holds two frames or more, until its sending task
has popped it down again. But ``pop`` lets the writer go whenever it pops less than a frame,
and a stream whose flow-control window the client keeps shut is popped for nothing (zero
bytes) each time its writer writes: the writer is never held back, and the buffer grows
with everything the app writes, for as long as the client stays (docs/upstream-bugs.md).

:func:`hold_back_streams` gives an HTTP/2 connection's streams buffers that hold their
writer back as hypercorn means to: a write that leaves two frames or more waits until the
client has taken the buffer down to one frame, and the end of a body waits until it has
taken it all. The wait ends early when the connection closes (hypercorn's own never does),
and the connection is closed (:meth:`Connection.abort`) when its client takes nothing of
the stream for the connection's write fuse. A relay stream's writer that waits this long is
one its stall check sees, as on HTTP/1.
"""

from __future__ import annotations

import math
from typing import Any, Protocol

import trio
from hypercorn.events import Closed, Event
from hypercorn.protocol.h2 import (
    BUFFER_HIGH_WATER,
    BUFFER_LOW_WATER,
    BufferCompleteError,
    H2Protocol,
    StreamBuffer,
)

__all__ = ["Connection", "hold_back_streams"]


class Connection(Protocol):
    """What a held-back stream needs of its connection."""

    @property
    def write_fuse(self) -> float:
        """Seconds a client may take nothing of a write before the connection is closed."""
        ...

    def abort(self) -> None:
        """Close the connection, giving up what waits to be written."""
        ...


def hold_back_streams(protocol: H2Protocol, connection: Connection) -> None:
    """From now on, give ``protocol``'s streams buffers that hold their writers back (see
    the module's doc), and release every writer still waiting once it has handled the
    connection's close. Call it before ``protocol`` has any stream."""
    protocol.stream_buffers = _HeldBackBuffers(connection)
    handle = protocol.handle

    async def handle_then_release(event: Event) -> None:
        await handle(event)
        if isinstance(event, Closed):  # (hypercorn closes the streams, not their buffers)
            for buffer in list(protocol.stream_buffers.values()):
                await buffer.close()

    protocol.handle = handle_then_release  # type: ignore[method-assign]


class _HeldBackBuffers(dict[int, StreamBuffer]):
    """A connection's streams' buffers: each one hypercorn makes is one of ours instead."""

    def __init__(self, connection: Connection) -> None:
        super().__init__()
        self._connection = connection

    def __setitem__(self, stream_id: int, buffer: StreamBuffer) -> None:
        if type(buffer) is StreamBuffer:
            buffer = _HeldBackBuffer(type(buffer._is_empty), self._connection)
        super().__setitem__(stream_id, buffer)


class _HeldBackBuffer(StreamBuffer):
    """One stream's unsent body, whose writer waits while it is full (see the module's doc)."""

    def __init__(self, event_class: Any, connection: Connection) -> None:
        super().__init__(event_class)
        self._connection = connection
        #: Set (and replaced) each time some of the buffer is taken, or it is closed.
        self._taken = trio.Event()

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
            self._taken.set()
            self._taken = trio.Event()
        return data

    async def close(self) -> None:
        await super().close()  # (empties the buffer)
        self._taken.set()

    async def _wait_until_below(self, size: float) -> None:
        """Wait until the buffer holds less than ``size`` bytes (or is closed). If its client
        takes nothing of it for the connection's write fuse, the connection is closed."""
        fuse = self._connection.write_fuse
        while len(self.buffer) >= size:
            with trio.move_on_after(fuse) as fused:
                await self._taken.wait()
            if fused.cancelled_caught:
                self._connection.abort()  # (closing it closes this buffer)
                fuse = math.inf
