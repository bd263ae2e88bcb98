"""An ASGI middleware that lets hypercorn close quart-trio's connections, and runs the
request-end callbacks registered with :func:`at_request_end`.

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

A send that races hypercorn closing the connection from its reading task (it does that
without its send lock) would fail with ``trio.BusyResourceError``; that send is dropped.

It also refuses, and closes the connection of, a request that has both ``Content-Length`` and
``Transfer-Encoding``: h11 reads such a request by its chunked body and keeps the connection,
where RFC 9112 (section 6.1) requires closing it, since a proxy in front may have read the
same bytes differently (request smuggling).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any, cast

import trio
from hypercorn.typing import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope

__all__ = ["CloseConnections", "at_request_end", "close_connections"]

_AT_END = "tokenrelay.at_request_end"


def at_request_end(scope: Scope, callback: Callable[[], object]) -> None:
    """Call ``callback`` (synchronous; it must not raise) once the request's ASGI call is over,
    however it ended: answered, failed, or cancelled because its client hung up, even before
    its response body started. (Unlike a response body's ``finally``, which never runs for a
    body that never started.)"""
    cast(dict[str, Any], scope).setdefault(_AT_END, []).append(callback)


ASGIApp = Any  # an ASGI 3 callable (Quart's ``asgi_app`` is a bound method)


class CloseConnections:
    """Wraps an ASGI app (``app.asgi_app = CloseConnections(app.asgi_app)``) so that the last
    message of each HTTP response is sent shielded from cancellation."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(
        self, scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable
    ) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        names = {name.lower() for name, _ in scope["headers"]}
        if b"content-length" in names and b"transfer-encoding" in names:
            await _refuse_ambiguous_length(send)
            return

        async def send_last_shielded(message: ASGISendEvent) -> None:
            try:
                if message["type"] == "http.response.body" and not message.get("more_body"):
                    with trio.CancelScope(shield=True):
                        await send(message)
                else:
                    await send(message)
            except trio.BusyResourceError:
                # hypercorn's reading task is closing this connection at this very moment
                # (a protocol error from the client; its close does not take the send lock):
                # this response cannot be delivered, and the connection is being closed.
                pass

        try:
            await self.app(scope, receive, send_last_shielded)
        finally:
            for callback in cast(dict[str, Any], scope).get(_AT_END, ()):
                callback()


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


def close_connections(app: Any) -> None:
    """Install :class:`CloseConnections` on a Quart app, once."""
    if not isinstance(app.asgi_app, CloseConnections):
        app.asgi_app = CloseConnections(app.asgi_app)
