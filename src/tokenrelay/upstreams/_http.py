"""The upstream interface, and the HTTP stream the Ollama and OpenAI adapters share.

An upstream turns a :class:`ChatRequest` into an async iterator of :class:`Delta` with an
``aclose()`` (a :class:`ClosableAsyncIterator`), ready for :func:`tokenrelay.guard`. HTTP
streams open their request on the first ``__anext__``, so that connecting, waiting in the
connection pool and waiting for response headers all count against the guard's first-token
timeout; ``aclose()`` closes the response, which closes the connection under it if the
stream was not finished, so the model server stops generating.

The dialects are sans-IO decoders (bytes in, deltas out); this module does the I/O.
"""

from __future__ import annotations

import email.utils
import json
import socket
from collections import deque
from collections.abc import AsyncGenerator, Iterator, Mapping
from contextlib import AsyncExitStack, contextmanager
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any, ClassVar, Protocol

import httpx2
import trio

from .._exceptions import (
    UpstreamConnectError,
    UpstreamDisconnected,
    UpstreamProtocolError,
    UpstreamRateLimited,
    UpstreamStatusError,
)
from .._guard import ClosableAsyncIterator
from ._chat import ChatRequest, Delta
from ._lines import LineSplitter, SurrogateJoiner, mend_surrogates
from ._transport import LeanBody, lean_body, request_sent, send_json, use_lean_backend

__all__ = ["MAX_LINE", "Decoder", "HTTPDeltaStream", "HTTPUpstream", "Upstream", "http_client"]

#: The longest line an upstream may send (1 MiB), newline or not.
MAX_LINE = 1 << 20

#: How much of an error response's body is read for its message.
MAX_ERROR_BODY = 64 << 10

#: The largest JSON answer (a model list, say) read from an upstream.
MAX_JSON_BODY = 8 << 20

#: After a complete answer, how long and how much to read of what is left of the response
#: (normally only its end, already received) so its connection can be reused.
DRAIN_SECONDS = 0.05
DRAIN_BYTES = 64 << 10


class Upstream(Protocol):
    """A model server the relay can stream answers from."""

    @property
    def name(self) -> str:
        """The adapter's name: ``"demo"``, ``"ollama"`` or ``"openai"``."""
        ...

    def stream(self, request: ChatRequest) -> ClosableAsyncIterator[Delta]:
        """The answer to ``request``, delta by delta. Nothing happens until the first
        ``__anext__``; ``aclose()`` stops generation."""
        ...

    async def models(self) -> list[dict[str, Any]]:
        """The models the upstream serves, as OpenAI model objects (``{"id", "object":
        "model", "created", "owned_by"}``). Raises :class:`UpstreamError` when it cannot say."""
        ...


class Decoder(Protocol):
    """A dialect: stream lines in, deltas out."""

    #: Set once the upstream has said its answer is complete.
    finished: bool

    def feed(self, line: bytes) -> list[Delta]:
        """One line of the stream, without its ending."""
        ...

    def close(self) -> list[Delta]:
        """The stream ended: the last deltas, or :exc:`UpstreamDisconnected` if the upstream
        never said it was done."""
        ...


def http_client(*, max_connections: int = 100, connect_timeout: float = 10.0) -> httpx2.AsyncClient:
    """The shared HTTP client for one relay's upstream calls, with explicit limits.

    There is deliberately no read timeout (a model may prefill for minutes): the guard's
    first-token and token timeouts bound every wait, and they count real tokens only, where a
    read timeout would be reset by every keep-alive. Proxies are honoured as httpx2 honours
    them: ``HTTP_PROXY``, ``HTTPS_PROXY``, ``ALL_PROXY`` and ``NO_PROXY``.
    """
    limits = httpx2.Limits(
        max_connections=max_connections,
        max_keepalive_connections=max_connections,
        keepalive_expiry=30.0,
    )
    # No ``transport=``: that would make httpx2 ignore the proxy settings in the environment.
    # httpx2 routes each request as a plain client would, and only its direct connections get
    # the lean backend.
    client = httpx2.AsyncClient(
        limits=limits,
        timeout=httpx2.Timeout(connect=connect_timeout, read=None, write=30.0, pool=None),
        follow_redirects=False,
    )
    use_lean_backend(client)
    return client


class HTTPUpstream:
    """What the HTTP adapters share: where the server is, the relay's client, the default
    model. Subclasses name their ``path``, build the ``payload`` and pick a decoder."""

    name: ClassVar[str]
    #: The chat route, under ``base_url``.
    path: ClassVar[str]
    #: The stream's content type, if the dialect has a reliable one to check.
    content_type: ClassVar[str | None] = None

    def __init__(
        self,
        base_url: str,
        client: httpx2.AsyncClient,
        *,
        model: str | None = None,
        headers: Mapping[str, str] | None = None,
        max_line: int = MAX_LINE,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.model = model
        self._client = client
        self._headers = dict(headers or {})
        self._max_line = max_line
        # Parsed once: httpx2 would parse a string URL again on every request.
        self._url = httpx2.URL(f"{self.base_url}{self.path}")

    def __str__(self) -> str:
        """The adapter and its server's host and port: what logs and error messages show.
        Never the URL's path, query or credentials."""
        return f"{self.name} at {_host_and_port(self._url)}"

    def payload(self, request: ChatRequest) -> dict[str, Any]:
        """The request body for ``request``, in the upstream's dialect."""
        raise NotImplementedError

    def decoder(self) -> Decoder:
        """A fresh decoder for one response."""
        raise NotImplementedError

    async def get_json(self, url: httpx2.URL, what: str) -> Any:
        """``GET url`` through the relay's client: its JSON answer (at most
        :data:`MAX_JSON_BODY` bytes). ``what`` names it in error messages.

        Raises:
            UpstreamConnectError: the server could not be reached.
            UpstreamStatusError: it answered with an HTTP error status.
            UpstreamProtocolError: the answer is not JSON, or too large.
            UpstreamDisconnected: the connection broke before the answer was complete.
        """
        upstream = str(self)
        headers = {k: v for k, v in self._headers.items() if k.lower() != "accept"}
        with _transport_errors(upstream, f"broke before its {what} was complete"):
            async with self._client.stream("GET", url, headers=headers) as response:
                if not 200 <= response.status_code < 300:
                    await _raise_for_status(upstream, response)
                body = bytearray()
                async for chunk in response.aiter_bytes():
                    body += chunk
                    if len(body) > MAX_JSON_BODY:
                        raise UpstreamProtocolError(
                            f"{upstream} sent a {what} larger than {MAX_JSON_BODY} bytes"
                        )
        try:
            return json.loads(body)
        except ValueError:
            raise UpstreamProtocolError(f"{upstream} sent a {what} that is not JSON") from None

    def stream(self, request: ChatRequest) -> HTTPDeltaStream:
        """Stream the answer to ``request``: nothing is sent until ``open()`` or the first
        ``__anext__``. Raises :class:`InvalidRequest` at once for a request the upstream
        cannot take (no model, say)."""
        return HTTPDeltaStream(
            self._client,
            self._url,
            self.payload(request),
            self.decoder(),
            upstream=str(self),
            headers=self._headers,
            content_type=self.content_type,
            max_line=self._max_line,
        )


class HTTPDeltaStream:
    """One streaming ``POST`` to a model server, decoded into deltas.

    :attr:`sent` is set once the request has gone out and its answer is awaited, or the
    stream has ended (or failed) before that: the model works from then on, and a server
    can use the wait to prepare its own response (``tokenrelay serve`` does).
    """

    def __init__(
        self,
        client: httpx2.AsyncClient,
        url: httpx2.URL | str,
        payload: Mapping[str, Any],
        decoder: Decoder,
        *,
        upstream: str,
        headers: Mapping[str, str] | None = None,
        content_type: str | None = None,
        max_line: int = MAX_LINE,
    ) -> None:
        self._client = client
        self._url = httpx2.URL(url)
        self._payload = payload
        self._headers = dict(headers or {})
        self._decoder = decoder
        self._upstream = upstream
        self._content_type = content_type
        self._splitter = LineSplitter(max_line)
        self._text = SurrogateJoiner()  # choice 0's; other choices' in _joiners
        self._joiners: dict[int, SurrogateJoiner] = {}
        self._stack = AsyncExitStack()
        #: The body: read directly (``LeanBody``), or through httpx2's ``aiter_bytes()``.
        self._body: LeanBody | None = None
        self._chunks: AsyncGenerator[bytes, None] | None = None
        self._opened = False
        self._pending: deque[Delta] = deque()
        self._done = False
        self._ended = False
        self._closed = False
        self._deltas = 0
        self.sent = trio.Event()

    def __aiter__(self) -> HTTPDeltaStream:
        return self

    async def __anext__(self) -> Delta:
        while not self._pending:
            if self._done or self._closed:
                raise StopAsyncIteration
            if not self._opened:
                await self._open()
            try:
                chunk = await self._read()
            except httpx2.TransportError as exc:
                raise UpstreamDisconnected(
                    f"the connection to {self._upstream} broke mid-stream after "
                    f"{self._deltas} token(s): {_describe(exc)}"
                ) from exc
            if chunk is None:
                lines = self._splitter.close()
                ended = True
            else:
                lines = self._splitter.feed(chunk)
                ended = False
            decoder = self._decoder
            for line in lines:
                self._pending.extend(decoder.feed(line))
                if decoder.finished:
                    break
            if ended and not decoder.finished:
                self._pending.extend(decoder.close())
            self._ended = ended
            self._done = ended or decoder.finished
        self._deltas += 1
        delta = self._pending.popleft()
        joiner = self._text if delta.choice == 0 else self._joiner(delta.choice)
        text = joiner.feed(delta.text)
        if delta.finish_reason is not None:
            text += joiner.flush()
        if text is not delta.text:
            delta = delta._replace(text=text)
        if delta.reasoning or delta.refusal or delta.tool_calls:
            delta = _mend(delta)
        return delta

    def _joiner(self, choice: int) -> SurrogateJoiner:
        joiner = self._joiners.get(choice)
        if joiner is None:
            joiner = self._joiners[choice] = SurrogateJoiner()
        return joiner

    async def open(self) -> None:
        """Send the request and wait for the response headers (what the first ``__anext__``
        would do anyway): returns once the upstream accepted the request, raises
        :class:`UpstreamError` if it could not be reached or refused it."""
        if not self._opened and not self._closed:
            await self._open()
        else:
            await trio.lowlevel.checkpoint()

    async def _read(self) -> bytes | None:
        """The next piece of the body, ``None`` at its end."""
        if self._body is not None:
            return await self._body.read()
        assert self._chunks is not None
        try:
            return await self._chunks.__anext__()
        except StopAsyncIteration:
            return None

    async def _open(self) -> None:
        told = request_sent.set(self.sent)  # the lean stream sets it once the request is out
        try:
            with _transport_errors(self._upstream, "closed before it answered"):
                response = await self._send()
        finally:
            request_sent.reset(told)
            self.sent.set()  # (and here, where the connection was not a lean one)
        if response.status_code >= 400:
            await _raise_for_status(self._upstream, response)
        if self._content_type is not None:
            content_type = response.headers.get("content-type", "")
            if not content_type.startswith(self._content_type):
                raise UpstreamProtocolError(
                    f"{self._upstream} answered with content-type {content_type!r}, not a "
                    f"{self._content_type} stream"
                )
        self._body = lean_body(response)
        if self._body is None:
            chunks = self._chunks = response.aiter_bytes()
            self._stack.push_async_callback(chunks.aclose)
        self._opened = True

    async def _send(self) -> httpx2.Response:
        """Send the request; the response, its body not read yet.

        Through ``client.stream()``, or, for a client that has nothing of its own to apply
        to it (httpx2's own class, with no auth, credentials in the URL, event hooks,
        cookies or redirects to follow, and its own transport for the URL: not a proxy's),
        straight to that transport's pool (:func:`send_json`: the request as the client
        builds it, copied from its first one), and a ``Set-Cookie`` answered kept in its
        jar, as ``client.send`` would keep it. (Even with nothing to apply, ``client.send``
        runs its auth, redirect and hook generators and context managers around the
        transport: per request, on the way to the first token.)"""
        client = self._client
        transport = _bare_transport(client, self._url)
        if transport is None:
            return await self._stack.enter_async_context(
                client.stream("POST", self._url, json=self._payload, headers=self._headers)
            )
        response = await send_json(client, transport, self._url, self._headers, self._payload)
        self._stack.push_async_callback(response.aclose)
        if "set-cookie" in response.headers:
            response.request = client.build_request(
                "POST", self._url, json=self._payload, headers=self._headers
            )
            client.cookies.extract_cookies(response)
        return response

    async def aclose(self) -> None:
        """Close the response. If the upstream had said the answer was complete, what is left
        of the response (normally just its end) is read first, so that the connection goes
        back to the pool; otherwise the connection is closed at once, which is what makes a
        model server stop generating."""
        self.sent.set()
        if self._decoder.finished and not self._ended and not self._closed:
            await self._drain()
        self._closed = True
        await self._stack.aclose()

    async def _drain(self) -> None:
        drained = 0
        with trio.move_on_after(DRAIN_SECONDS):
            try:
                while (chunk := await self._read()) is not None:
                    drained += len(chunk)
                    if drained > DRAIN_BYTES:
                        break
            except httpx2.TransportError:
                pass  # it only costs the connection


def _bare_transport(
    client: httpx2.AsyncClient, url: httpx2.URL
) -> httpx2.AsyncHTTPTransport | None:
    """``client``'s transport for ``url``, if ``client.send`` would do nothing but hand it
    the request (see ``HTTPDeltaStream._send``); else ``None``."""
    if (
        type(client) is not httpx2.AsyncClient  # (a subclass may send its own way)
        or client.auth is not None
        or url.username  # (credentials in the URL: client.send makes them Basic auth)
        or url.password
        or client.follow_redirects
        or client.cookies
        or any(client.event_hooks.values())
    ):
        return None
    transport = client._transport_for_url(url)
    if transport is not client._transport or type(transport) is not httpx2.AsyncHTTPTransport:
        return None
    return transport


async def _raise_for_status(upstream: str, response: httpx2.Response) -> None:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body += chunk
        if len(body) >= MAX_ERROR_BODY:
            break
    message = _error_message(bytes(body[:MAX_ERROR_BODY])) or response.reason_phrase
    status = response.status_code
    text = f"{upstream} answered {status} {response.reason_phrase}: {message}"
    if status == 429:
        retry_after = _retry_after(response.headers.get("retry-after"))
        if retry_after is not None:
            text += f" (retry after {retry_after:g} s)"
        raise UpstreamRateLimited(
            text, status_code=status, upstream_message=message, retry_after=retry_after
        )
    raise UpstreamStatusError(text, status_code=status, upstream_message=message)


def _error_message(body: bytes) -> str:
    """The message in an error body: Ollama's ``{"error": "..."}``, OpenAI's
    ``{"error": {"message": "..."}}``, FastAPI's ``{"detail": ...}``, or the text."""
    try:
        data = json.loads(body)
    except ValueError:
        return body.decode("utf-8", errors="replace").strip()[:500]
    return error_text(data) or body.decode("utf-8", errors="replace").strip()[:500]


def error_text(data: object) -> str | None:
    """The human message in a decoded JSON error, in any of the common shapes."""
    if isinstance(data, dict):
        for key in ("error", "message", "detail"):
            value = data.get(key)
            if isinstance(value, str) and value:
                return value
            if isinstance(value, dict):
                inner = error_text(value)
                if inner:
                    return inner
    return None


def _retry_after(value: str | None) -> float | None:
    """``Retry-After`` as seconds: a number of seconds, or an HTTP date."""
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _host_and_port(url: httpx2.URL) -> str:
    host = f"[{url.host}]" if ":" in url.host else url.host
    return host if url.port is None else f"{host}:{url.port}"


def _mend(delta: Delta) -> Delta:
    """``delta`` with no lone surrogate in its reasoning, refusal or tool call arguments
    (U+FFFD instead): nothing downstream (an SSE write, a store) can encode one."""
    calls = tuple(
        replace(call, arguments=mend_surrogates(call.arguments))
        if not call.arguments.isascii()
        else call
        for call in delta.tool_calls
    )
    return delta._replace(
        reasoning=mend_surrogates(delta.reasoning),
        refusal=mend_surrogates(delta.refusal),
        tool_calls=calls,
    )


@contextmanager
def _transport_errors(upstream: str, broke: str) -> Iterator[None]:
    """httpx2's transport errors as the upstream errors they are: it could not be reached
    (``UpstreamConnectError``, ``timed_out`` if connecting took too long), or the connection
    to it ``broke`` (``UpstreamDisconnected``)."""
    try:
        yield
    except httpx2.ConnectError as exc:
        raise UpstreamConnectError(_connect_message(upstream, exc)) from exc
    except httpx2.TimeoutException as exc:
        raise UpstreamConnectError(
            f"could not connect to {upstream}: {_describe(exc)}", timed_out=True
        ) from exc
    except httpx2.TransportError as exc:
        raise UpstreamDisconnected(
            f"the connection to {upstream} {broke}: {_describe(exc)}"
        ) from exc


def _connect_message(upstream: str, exc: BaseException) -> str:
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, socket.gaierror):
            return f"could not resolve the host name of {upstream}: {cause.strerror or cause}"
        cause = cause.__cause__ or cause.__context__
    return f"could not connect to {upstream}: {_describe(exc)}"


def _describe(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
