"""An ASGI middleware that lets hypercorn close quart-trio's connections, runs the
request-end callbacks registered with :func:`at_request_end`, and writes a response's head
with its first piece of body (and a :class:`LastBody` with its end).

quart-trio runs a request as two tasks in one nursery: one reads ASGI messages, one handles
the request and sends the response; whichever ends first cancels the other. hypercorn, on the
response's last send, first tells the reading task ``http.disconnect`` and then, in the same
call, closes the connection (``Connection: close``, an unread request body) or arms its
keep-alive timer. The reading task ends at once and cancels the nursery, so the sending task
is cancelled at its next checkpoint: inside hypercorn's close, before the socket is closed,
or before the keep-alive timer starts. Either way the connection is never closed. (A plain
ASGI app has no sibling task to cancel it.) See docs/upstream-bugs.md.

The fix here: the response's last send is shielded, so that what hypercorn does in it (close
the socket, or arm the keep-alive timer) completes. hypercorn already shields every socket
write, so no wait becomes longer than it was.

A held head (:func:`hold_head`) of a stream on HTTP/1.1, on a connection that writes at once
(:func:`~tokenrelay.server._hypercorn.chunk_writer`), is made by hypercorn as soon as the app
starts the response, and kept unwritten until the first piece of body: making it (hypercorn's
headers, h11's checks of them, three times over) is then done while the app waits for that
piece, not after it has it. A :class:`ReplacedResponse` then replaces the bytes made, in the
framing h11 has taken on for them (a chunked body).

A send that races hypercorn closing the connection from its reading task (it does that
without its send lock) would fail with ``trio.BusyResourceError``; that send is dropped.

It also refuses, and closes the connection of, a request that has both ``Content-Length`` and
``Transfer-Encoding``: h11 reads such a request by its chunked body and keeps the connection,
where RFC 9112 (section 6.1) requires closing it, since a proxy in front may have read the
same bytes differently (request smuggling).
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Callable
from typing import Any, Self, cast

import h11
import trio
from hypercorn.protocol.http_stream import HTTPStream
from hypercorn.typing import (
    ASGIReceiveCallable,
    ASGIReceiveEvent,
    ASGISendCallable,
    ASGISendEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Scope,
)

from ._hypercorn import DirectWriteTCPServer, chunk_writer, gathered_writes, note_connection

__all__ = [
    "CloseConnections",
    "LastBody",
    "ReplacedResponse",
    "at_request_end",
    "close_connections",
    "hold_head",
]

_AT_END = "tokenrelay.at_request_end"
_HOLD = "tokenrelay.hold_head"


def hold_head(scope: Scope) -> None:
    """Let :class:`CloseConnections` hold this request's response head until the first piece
    of its body (see there). For responses that write their first piece at once: a head held
    while the app waits is a head the client waits for. The relay's routes opt in; other
    routes of an app that mounts the relay keep their heads as they were."""
    cast(dict[str, Any], scope)[_HOLD] = True


def at_request_end(scope: Scope, callback: Callable[[], object]) -> None:
    """Call ``callback`` (synchronous; it must not raise) once the request's ASGI call is over,
    however it ended: answered, failed, or cancelled because its client hung up, even before
    its response body started. (Unlike a response body's ``finally``, which never runs for a
    body that never started.)"""
    cast(dict[str, Any], scope).setdefault(_AT_END, []).append(callback)


ASGIApp = Any  # an ASGI 3 callable (Quart's ``asgi_app`` is a bound method)


class CloseConnections:
    """Wraps an ASGI app (``app.asgi_app = CloseConnections(app.asgi_app)``) so that the last
    message of each HTTP response is sent shielded from cancellation.

    On HTTP/1 it also saves writes: a response's head waits for the first piece of its body
    and goes out with it, and a :class:`LastBody` goes out with the response's end (on
    :class:`~tokenrelay.server._hypercorn.DirectWriteTCPServer`, one write each). A client
    sees the head no later than the first byte of the body; every stream tokenrelay serves
    writes that at once."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        note_connection(scope, send)
        headers = {name.lower(): value for name, value in scope["headers"]}
        if b"content-length" in headers and b"transfer-encoding" in headers:
            await _refuse_ambiguous_length(send)
            return
        # HTTP/1 only: an HTTP/2 response ends its stream, never the connection.
        body = _RequestBody(headers) if scope.get("http_version") in ("1.0", "1.1") else None
        closing = False
        gone = False  # the client left (http.disconnect)

        ready = _receive_ready(receive)

        async def receive_tracked() -> ASGIReceiveEvent:
            nonlocal gone
            if ready is not None:
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    message = ready()
                except trio.WouldBlock:
                    message = await receive()
            else:
                message = await receive()
            gone = gone or message["type"] == "http.disconnect"
            if body is not None:
                if message["type"] == "http.request":
                    body.arrived(message)
                elif message["type"] == "http.disconnect":
                    body.gone()
            return message

        # The head waits for the body's first piece (which may replace it: ReplacedResponse);
        # on HTTP/1 the two go out in one write, and a LastBody with the response's end.
        start: HTTPResponseStartEvent | None = None
        last: bytes | None = None
        replaced = False
        # On HTTP/1.1 over a connection that writes at once, a held stream's head is given to
        # hypercorn as soon as it comes, its bytes kept unwritten until the first piece
        # (``ahead``): made while the app waits for that piece, not after it has it.
        server = chunk_writer(scope)
        ahead: HTTPResponseStartEvent | None = None

        async def send_last_shielded(message: ASGISendEvent) -> None:
            nonlocal closing, start, last, replaced, ahead
            if replaced:  # the app's own end of the response it replaced
                return
            try:
                if message["type"] == "http.response.start":
                    if body is not None and body.too_much_left():
                        message = _closing(message)
                        closing = True
                    if scope.get(_HOLD):
                        if server is not None and server.writable and _chunked(message):
                            async with gathered_writes(write=False):
                                await send(message)
                            ahead = message
                        else:
                            start = message
                        return
                if message["type"] == "http.response.body":
                    data = message.get("body", b"")
                    more = message.get("more_body", False)
                    if type(data) is ReplacedResponse and ahead is not None:
                        assert server is not None
                        replaced = True
                        _replace_head_made(server, send, _replaced(ahead, data))
                        message = HTTPResponseBodyEvent(
                            type="http.response.body", body=bytes(data), more_body=False
                        )
                        more = False
                    elif type(data) is ReplacedResponse and start is not None:
                        replaced = True
                        start = _replaced(start, data)
                        if closing:
                            start = _closing(start)
                        message = HTTPResponseBodyEvent(
                            type="http.response.body", body=bytes(data), more_body=False
                        )
                        more = False
                    elif body is not None and more and type(data) is LastBody and last is None:
                        last = data
                        return
                    ahead = None  # (written with this piece, or with the next write)
                    if last is not None:
                        message = {**message, "body": last + data}
                        last = None
                    if not more:
                        # Shielded on HTTP/1, where the connection's fate is in this send;
                        # not on HTTP/2, where it ends one stream, and waits for the client
                        # to open the stream's flow-control window, maybe for ever.
                        with trio.CancelScope(shield=body is not None):
                            if body is not None and not closing:
                                await body.wait_for_the_rest()
                            held, start = start, None
                            await _send_after(send, held, message, gather=body is not None)
                        return
                held, start = start, None
                await _send_after(send, held, message, gather=body is not None)
            except trio.BusyResourceError:
                # hypercorn's reading task is closing this connection at this very moment
                # (a protocol error from the client; its close does not take the send lock):
                # this response cannot be delivered, and the connection is being closed.
                pass

        try:
            await self.app(scope, receive_tracked, send_last_shielded)
            # An app that returns without ending its response (Quart always ends it, unless
            # its client left): what is held goes out as it came, and hypercorn deals with
            # the rest. Nothing goes to a client that has left.
            if not gone:
                if start is not None:
                    await send(start)
                if last is not None:
                    await send({"type": "http.response.body", "body": last, "more_body": True})
        finally:
            for callback in cast(dict[str, Any], scope).get(_AT_END, ()):
                callback()


def _receive_ready(receive: ASGIReceiveCallable) -> Callable[[], ASGIReceiveEvent] | None:
    """What takes a message already there without a schedule point, when ``receive`` is
    hypercorn's: its trio worker passes the ``receive`` of the request's memory channel, which
    is a schedule point even for a message already there, and a request's body comes as two
    messages (its bytes, then its end), both there by the time the app asks. The app gets
    them in one step; a wait for a message is a wait as before."""
    channel = getattr(receive, "__self__", None)
    if (
        isinstance(channel, trio.MemoryReceiveChannel)
        and getattr(receive, "__func__", None) is trio.MemoryReceiveChannel.receive
    ):
        return cast(Callable[[], ASGIReceiveEvent], channel.receive_nowait)
    return None


def _chunked(start: HTTPResponseStartEvent) -> bool:
    """Whether the response ``start`` starts has a chunked body on HTTP/1.1 (a body whose
    length it does not say), which a replacement can have too (:func:`_replace_head_made`)."""
    status = start["status"]
    return (
        200 <= status < 300
        and status != 204
        and all(name.lower() != b"content-length" for name, _ in start["headers"])
    )


def _replace_head_made(
    server: DirectWriteTCPServer, send: ASGISendCallable, answer: HTTPResponseStartEvent
) -> None:
    """Replace the head hypercorn made of a response (kept unwritten on ``server``) with the
    head of ``answer``, in the same framing: a chunked body, which hypercorn's h11 writes from
    now on, and ``Connection: close`` if the head made said so (the connection's fate is
    h11's already). With hypercorn's own headers (``Date``, ``Server``), and made by h11 as
    hypercorn's is. hypercorn is told the status (its access log, its body rules).

    Nothing to replace if the head was written already: only a connection being closed
    writes what is kept (a client that has left)."""
    made = server.take_back()
    if not made:
        return
    headers = [(name, value) for name, value in answer["headers"] if name.lower() not in _FRAMING]
    headers += server.config.response_headers("h11")
    if _says_close(made):
        headers.append((b"connection", b"close"))
    head = h11.Connection(h11.SERVER)  # in the state of one answering an HTTP/1.1 request
    head.receive_data(b"GET / HTTP/1.1\r\nHost: tokenrelay\r\n\r\n")
    head.next_event()
    data = head.send(h11.Response(status_code=answer["status"], headers=headers))
    assert data is not None  # (h11 makes bytes of every event but a ConnectionClosed)
    server.keep(data)
    stream = getattr(send, "__self__", None)
    if isinstance(stream, HTTPStream):
        stream.response = answer


#: The headers that say how a body is framed (h11 adds those of the head it makes).
_FRAMING = {b"content-length", b"transfer-encoding", b"connection"}


def _says_close(head: bytes) -> bool:
    """Whether an HTTP/1.1 response ``head``, as h11 writes one, says ``Connection: close``."""
    for line in head.split(b"\r\n")[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"connection" and b"close" in value.lower():
            return True
    return False


#: Headers of a started response that describe its body: a replacement brings its own.
_BODY_HEADERS = {b"content-type", b"content-length", b"transfer-encoding", b"cache-control"}


def _replaced(start: HTTPResponseStartEvent, answer: ReplacedResponse) -> HTTPResponseStartEvent:
    """``start`` with ``answer``'s status and headers. The started response's other headers
    stay (those an ``after_request`` hook added: CORS, cookies), but for those describing its
    body and those ``answer`` sets itself."""
    names = _BODY_HEADERS | {b"x-accel-buffering"} | {name.lower() for name, _ in answer.headers}
    kept = [(name, value) for name, value in start["headers"] if name.lower() not in names]
    return {**start, "status": answer.status, "headers": [*kept, *answer.headers]}


async def _send_after(
    send: ASGISendCallable,
    start: HTTPResponseStartEvent | None,
    message: ASGISendEvent,
    *,
    gather: bool,
) -> None:
    """Send ``message``, after ``start`` if it was held; on HTTP/1 (``gather``) in one write,
    and a response's last piece of body with the body's end (hypercorn writes them apart)."""
    last = message["type"] == "http.response.body" and not message.get("more_body", False)
    if not gather or (start is None and not (last and message.get("body"))):
        if start is not None:
            await send(start)
        await send(message)
        return
    async with gathered_writes():
        if start is not None:
            await send(start)
        await send(message)


#: A response that starts before its request's body has all arrived waits, at its end, for
#: the rest of the body if it is at most this long (and says ``Connection: close`` if not).
DRAIN_BYTES = 256 << 10
#: ... for at most this long.
DRAIN_SECONDS = 1.0


class _RequestBody:
    """How much of a request's body has reached the app (quart-trio reads it all, in a task
    of its own, whether or not the handler asks for it).

    hypercorn closes a connection, without saying so, when a response ends before the
    request's body was read to its end (it cannot find the next request past it). A client
    that sent its whole request and reuses the connection then sees it closed under its next
    request ("Server disconnected without sending a response"), so an early answer (a 413
    or a 401, say) lost the client's next request whenever the response was faster than
    the body. So, as Go's net/http does: the end of such a response waits (bounded) for the
    rest of a short body, which keeps the connection, and a response that will not wait
    for a long one says ``Connection: close``. See docs/upstream-bugs.md."""

    __slots__ = ("_complete", "_left")

    def __init__(self, headers: dict[bytes, bytes]) -> None:
        self._complete: trio.Event | None = None  # made only when waited for
        #: Bytes still to come (``None``: unknown, chunked); 0 once it has all arrived.
        self._left: int | None = None
        if b"transfer-encoding" not in headers:
            with contextlib.suppress(ValueError):  # h11 checked it: "unknown" if not a number
                self._left = int(headers.get(b"content-length", b"0"))

    def arrived(self, message: ASGIReceiveEvent) -> None:
        if self._left == 0:
            return
        if message.get("more_body", False):
            if self._left is not None:
                self._left = max(1, self._left - len(cast(bytes, message.get("body", b""))))
            return
        self._left = 0
        if self._complete is not None:
            self._complete.set()

    def gone(self) -> None:
        """The client hung up: no more of the body will come."""
        self._left = 0
        if self._complete is not None:
            self._complete.set()

    def too_much_left(self) -> bool:
        """Whether so much of the body is still to come that the response will not wait."""
        return self._left is None or self._left > DRAIN_BYTES

    async def wait_for_the_rest(self) -> None:
        """Wait, at most :data:`DRAIN_SECONDS`, for the body to have all arrived."""
        if self._left == 0:
            return
        self._complete = self._complete or trio.Event()
        with trio.move_on_after(DRAIN_SECONDS):
            await self._complete.wait()


def _closing(start: HTTPResponseStartEvent) -> HTTPResponseStartEvent:
    """``http.response.start`` with ``Connection: close`` (see :class:`_RequestBody`)."""
    headers = [(name, value) for name, value in start["headers"] if name.lower() != b"connection"]
    return {**start, "headers": [*headers, (b"connection", b"close")]}


_AMBIGUOUS = json.dumps(
    {
        "error": {
            "message": "a request must not have both Content-Length and Transfer-Encoding",
            "type": "invalid_request_error",
            "code": "ambiguous_body_length",
        }
    }
).encode()


async def _refuse_ambiguous_length(send: ASGISendCallable) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": 400,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_AMBIGUOUS)).encode()),
                (b"connection", b"close"),
            ],
            "trailers": False,
        }
    )
    await send({"type": "http.response.body", "body": _AMBIGUOUS, "more_body": False})


class ReplacedResponse(bytes):
    """A first piece of response body that replaces the response: its status and headers
    instead of those the app started it with, and this body, whole. :class:`CloseConnections`
    holds a response's head until its first piece of body, so an app can start a response
    early and still answer with an error, as long as it has written nothing yet. (Without
    the wrapper, the bytes would be the started response's body.)"""

    def __new__(cls, body: bytes, status: int, headers: list[tuple[bytes, bytes]]) -> Self:
        answer = super().__new__(cls, body)
        answer.status = status
        answer.headers = headers
        return answer

    status: int
    headers: list[tuple[bytes, bytes]]


class LastBody(bytes):
    """A piece of a response body after which the app sends nothing but the response's end
    (Quart's closing ``more_body: False``): :class:`CloseConnections` writes the two together,
    on HTTP/1. A streamed response's ``[DONE]`` and the chunked body's end are then one
    write, not two. Only a promise about what follows: a piece that is not the last is sent
    all the same, with the next one."""

    __slots__ = ()


def close_connections(app: Any) -> None:
    """Install :class:`CloseConnections` on a Quart app, once."""
    if not isinstance(app.asgi_app, CloseConnections):
        app.asgi_app = CloseConnections(app.asgi_app)
