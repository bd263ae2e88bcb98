"""Running the relay server under hypercorn on 127.0.0.1, and reading its streams."""

from __future__ import annotations

import json
import logging
import os
import queue
import re
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import httpx2
import hypercorn.trio
import pytest
import trio
from hypercorn.config import Config
from quart_trio import QuartTrio

import tokenrelay
from tokenrelay.server import _hypercorn
from tokenrelay.server._hypercorn import give_up_writes_after, use_direct_writes
from tokenrelay.testing import FakeModelServer
from tokenrelay.upstreams._lines import LineSplitter, SSEEvent, SSEParser


@dataclass
class Served:
    url: str
    app: QuartTrio
    service: tokenrelay.RelayService
    fake: FakeModelServer

    @property
    def relay(self) -> tokenrelay.Relay:
        assert self.service.relay is not None
        return self.service.relay

    def run(self, session: str, namespace: str = "-") -> tokenrelay.Run:
        run = self.relay.get(f"{namespace}/{session}")
        assert run is not None
        return run

    def request_ended(self) -> trio.Event:
        """An event set when a request's ASGI call (the app's whole handling of it) ends."""
        inner = self.app.asgi_app
        ended = trio.Event()

        async def recording(scope: Any, receive: Any, send: Any) -> None:
            try:
                await inner(scope, receive, send)
            finally:
                ended.set()

        self.app.asgi_app = recording  # type: ignore[method-assign]
        return ended


async def serve_app(
    nursery: trio.Nursery,
    app: QuartTrio,
    *,
    keep_alive_timeout: float = 5.0,
    graceful_timeout: float = 0.5,
    shutdown_trigger: Callable[[], Awaitable[None]] | None = None,
    write_fuse: float | None = None,
) -> str:
    """``write_fuse``: as ``give_up_writes_after`` (``tokenrelay.server.serve`` gives twice
    the relay's stall timeout)."""
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.errorlog = logging.getLogger("tokenrelay.server")
    config.graceful_timeout = graceful_timeout
    config.keep_alive_timeout = keep_alive_timeout
    # As tokenrelay.server.serve (and so ``tokenrelay serve``) runs hypercorn.
    assert use_direct_writes()
    give_up_writes_after(config, write_fuse)
    serve = partial(hypercorn.trio.serve, app, config, shutdown_trigger=shutdown_trigger)
    binds = await nursery.start(serve)
    return str(binds[0])


async def start_served(
    nursery: trio.Nursery,
    fake: FakeModelServer,
    *,
    keep_alive_timeout: float = 5.0,
    write_fuse: float | None = None,
    **overrides: Any,
) -> Served:
    settings: dict[str, Any] = {
        "upstream": f"openai={fake.openai_url}",
        "model": "fake",
        "db": ":memory:",
    }
    settings.update(overrides)
    app = tokenrelay.create_app(tokenrelay.ServerConfig(**settings))
    url = await serve_app(
        nursery, app, keep_alive_timeout=keep_alive_timeout, write_fuse=write_fuse
    )
    return Served(url, app, app.extensions["tokenrelay"], fake)


def record_writes(
    monkeypatch: pytest.MonkeyPatch, url: str | None = None, *, tasks: list[str] | None = None
) -> list[bytes]:
    """What the server hands the kernel directly, write by write, from now on (``os.write``
    in server/_hypercorn.py): on connections to ``url`` only, if given (a fake model server
    in the same process is served by hypercorn too). ``tasks``, if given, gets the name of
    the task that made each write."""
    writes: list[bytes] = []
    port = None if url is None else port_of(url)

    def write(fd: int, data: Any) -> int:
        if port is None or _local_port(fd) == port:
            writes.append(bytes(data))
            if tasks is not None:
                tasks.append(trio.lowlevel.current_task().name)
        return os.write(fd, data)

    monkeypatch.setattr(_hypercorn, "os", SimpleNamespace(write=write, read=os.read, name=os.name))
    return writes


def chunked_body(response: bytes) -> bytes:
    """The de-chunked body of one HTTP/1.1 response."""
    head, _, rest = response.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    body = bytearray()
    while True:
        size_line, _, rest = rest.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            return bytes(body)
        body += rest[:size]
        rest = rest[size + 2 :]


def _local_port(fd: int) -> int:
    with socket.socket(fileno=os.dup(fd)) as sock:
        return int(sock.getsockname()[1])


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


class RawHTTP:
    """One client connection as a raw socket: what is sent is exactly what was written."""

    def __init__(self, stream: trio.SocketStream) -> None:
        self.stream = stream
        self.buffer = b""
        self.head_lines: list[str] = []

    @classmethod
    async def connect(cls, url: str, *, receive_buffer: int | None = None) -> RawHTTP:
        """``receive_buffer``: the client socket's ``SO_RCVBUF``, set before it connects (so
        that the kernel does not grow it): for a client that reads nothing, the server's
        writes then wait once that little is taken."""
        if receive_buffer is None:
            return cls(await trio.open_tcp_stream("127.0.0.1", port_of(url)))
        sock = trio.socket.socket()
        sock.setsockopt(trio.socket.SOL_SOCKET, trio.socket.SO_RCVBUF, receive_buffer)
        await sock.connect(("127.0.0.1", port_of(url)))
        return cls(trio.SocketStream(sock))

    async def send(self, data: bytes) -> None:
        await self.stream.send_all(data)

    async def response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response (its body framed by Content-Length, or chunked): status,
        headers, body (de-chunked). Its header lines, as sent, are kept in ``head_lines``."""
        while b"\r\n\r\n" not in self.buffer:
            await self._fill()
        head, _, self.buffer = self.buffer.partition(b"\r\n\r\n")
        status_line, *self.head_lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in self.head_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if headers.get("transfer-encoding") == "chunked":
            return int(status_line.split()[1]), headers, await self._chunks()
        length = int(headers.get("content-length", "0"))
        body = await self._take(length)
        return int(status_line.split()[1]), headers, body

    async def _chunks(self) -> bytes:
        body = b""
        while True:
            while b"\r\n" not in self.buffer:
                await self._fill()
            size_line, _, self.buffer = self.buffer.partition(b"\r\n")
            size = int(size_line, 16)
            chunk = await self._take(size + 2)
            assert chunk.endswith(b"\r\n"), chunk
            if size == 0:
                return body
            body += chunk[:-2]

    async def _take(self, length: int) -> bytes:
        while len(self.buffer) < length:
            await self._fill()
        data, self.buffer = self.buffer[:length], self.buffer[length:]
        return data

    async def final_response(self) -> tuple[int, dict[str, str], bytes]:
        """The next response that is not ``100 Continue``."""
        while (response := await self.response())[0] == 100:
            pass
        return response

    async def eof(self, within: float = 1.0) -> bool:
        """Whether the server closes the connection, without sending more, within ``within``
        seconds: at once, that is, not at the end of its 5 s keep-alive timeout."""
        with trio.move_on_after(within):
            try:
                while not self.buffer:
                    await self._fill()
            except (EOFError, trio.BrokenResourceError):
                return True
        return False

    async def closed_by_server(self) -> bool:
        """Read until the server closes the connection: ``True`` at EOF (or a reset)."""
        try:
            while await self.stream.receive_some():
                pass
        except trio.BrokenResourceError:
            pass
        return True

    async def _fill(self) -> None:
        chunk = await self.stream.receive_some()
        if not chunk:
            raise EOFError(f"the server closed the connection; it had sent {self.buffer!r}")
        self.buffer += chunk

    async def aclose(self) -> None:
        await self.stream.aclose()


def chat(content: str = "hi", *, stream: bool = True, **fields: Any) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": content}], "stream": stream, **fields}


@asynccontextmanager
async def streaming_chat(
    url: str, headers: Mapping[str, str] | None = None
) -> AsyncIterator[httpx2.Response]:
    """POST a streaming chat completion to the server at ``url``; yield the open response."""
    async with (
        httpx2.AsyncClient(base_url=url) as client,
        client.stream("POST", "/v1/chat/completions", json=chat(), headers=headers) as response,
    ):
        yield response


class SSEReader:
    """Reads SSE events off an httpx2 streaming response."""

    def __init__(self, response: httpx2.Response) -> None:
        self._chunks: AsyncGenerator[bytes, None] = response.aiter_bytes()  # type: ignore[assignment]
        self._splitter = LineSplitter(1 << 22)
        self._parser = SSEParser()
        self._ready: list[SSEEvent] = []
        self.raw = bytearray()

    async def __aenter__(self) -> SSEReader:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        """Close the byte iterator (a reader that stops part-way must, under trio)."""
        await self._chunks.aclose()

    async def next(self) -> SSEEvent | None:
        while not self._ready:
            try:
                chunk = await self._chunks.__anext__()
            except StopAsyncIteration:
                return None
            self.raw += chunk
            for line in self._splitter.feed(chunk):
                event = self._parser.feed_line(line)
                if event is not None:
                    self._ready.append(event)
        return self._ready.pop(0)

    async def all(self) -> list[SSEEvent]:
        events = []
        while (event := await self.next()) is not None:
            events.append(event)
        return events

    async def content_events(self, count: int) -> list[SSEEvent]:
        """The next ``count`` events that carry content."""
        got = []
        while len(got) < count:
            event = await self.next()
            assert event is not None, "the stream ended early"
            if event.id is not None:
                got.append(event)
        return got


def text_of(events: list[SSEEvent]) -> str:
    return "".join(
        json.loads(e.data)["choices"][0]["delta"].get("content") or ""
        for e in events
        if e.event == "message" and e.data != "[DONE]"
    )


def seqs(events: list[SSEEvent]) -> list[int]:
    return [int(e.id) for e in events if e.id is not None]


def last_chunk(events: list[SSEEvent]) -> dict[str, Any]:
    """The last chunk before [DONE]."""
    assert events[-1].data == "[DONE]", events[-1]
    return dict(json.loads(events[-2].data))


@dataclass
class ServeProcess:
    """``tokenrelay serve`` running as a subprocess, for tests that do not run under trio (the
    browser tests): its URL, and what it has logged so far."""

    process: subprocess.Popen[bytes]
    url: str
    log: list[str] = field(default_factory=list)
    reader: threading.Thread | None = None

    def stop(self, timeout: float = 10.0) -> int:
        """SIGTERM, as an operator stops it; its exit code (it is killed if it hangs)."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait(timeout)
        if self.reader is not None:
            self.reader.join(timeout)
        assert self.process.stderr is not None
        self.process.stderr.close()
        return code


@contextmanager
def serve_process(
    *args: str,
    db: Path | str = ":memory:",
    env: Mapping[str, str] | None = None,
    timeout: float = 20.0,
) -> Iterator[ServeProcess]:
    """Run ``tokenrelay serve --port 0 --db DB ARGS`` on 127.0.0.1 until the block ends (then
    SIGTERM; it must exit 0). Its stderr is read by a thread, so that it never blocks."""
    process = subprocess.Popen(
        [sys.executable, "-m", "tokenrelay", "serve", "--port", "0", "--db", str(db), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env={**os.environ, **env} if env is not None else None,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    log: list[str] = []

    def read() -> None:
        assert process.stderr is not None
        for raw in process.stderr:
            line = raw.decode(errors="replace")
            log.append(line)
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name="tokenrelay-serve-stderr", daemon=True)
    reader.start()
    server = None
    try:
        while server is None:
            line = lines.get(timeout=timeout)
            assert line is not None, "tokenrelay serve exited; it said:\n" + "".join(log)
            found = re.search(r"tokenrelay listening on (http://127\.0\.0\.1:\d+)", line)
            if found:
                server = ServeProcess(process, found.group(1), log, reader)
        yield server
    finally:
        code = (server or ServeProcess(process, "", log, reader)).stop()
    assert code == 0, "tokenrelay serve did not exit cleanly; it said:\n" + "".join(log)


def replayed_text(url: str, session: str, headers: Mapping[str, str] | None = None) -> str:
    """The answer text of a session's latest run, as the server replays it (synchronously)."""
    response = httpx2.get(f"{url}/v1/sessions/{session}/stream", headers=headers, timeout=10)
    response.raise_for_status()
    text = []
    for line in response.text.splitlines():
        if line.startswith("data: ") and line != "data: [DONE]":
            for choice in json.loads(line[6:]).get("choices", []):
                text.append(choice.get("delta", {}).get("content") or "")
    return "".join(text)
