"""The relay's upstream client honours proxy settings in the environment exactly as a plain
``httpx2.AsyncClient`` does: against a real recording forward proxy on 127.0.0.1, in front of
the fake model server. Real time, bounded."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from urllib.parse import urlsplit

import h11
import httpx2
import pytest
import trio

import tokenrelay
from _helpers import bounded
from tokenrelay import ChatRequest
from tokenrelay.testing import FakeModelServer
from tokenrelay.upstreams._transport import _LeanStream

#: Everything urllib (and so httpx2) reads proxies from, in both cases. REQUEST_METHOD makes
#: it ignore HTTP_PROXY (a CGI precaution).
PROXY_VARIABLES = [
    name
    for base in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "NO_PROXY")
    for name in (base, base.lower())
] + ["REQUEST_METHOD"]

#: Hop-by-hop headers a proxy does not pass on.
HOP_BY_HOP = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization"}


@dataclass
class RecordingProxy:
    """A plain-HTTP forward proxy: takes absolute-form requests (``POST http://host:port/path
    HTTP/1.1``), records their method and URL, forwards each on a new connection to its target
    and relays the response as it arrives. Keeps the client's connection alive."""

    seen: list[tuple[str, str]] = field(default_factory=list)
    url: str = ""

    async def serve(self, *, task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED) -> None:
        async with trio.open_nursery() as nursery:
            listeners = await nursery.start(
                partial(trio.serve_tcp, self._handle, 0, host="127.0.0.1")
            )
            port = listeners[0].socket.getsockname()[1]
            self.url = f"http://127.0.0.1:{port}"
            task_status.started(self.url)

    async def _handle(self, client: trio.abc.Stream) -> None:
        conn = h11.Connection(h11.SERVER)
        while True:
            request = await _next_event(conn, client)
            if not isinstance(request, h11.Request):
                return  # the client closed its connection
            body = b""
            while isinstance(event := await _next_event(conn, client), h11.Data):
                body += event.data
            target = request.target.decode()
            self.seen.append((request.method.decode(), target))
            try:
                await self._forward(conn, client, request, target, body)
            except trio.BrokenResourceError:
                return  # the client hung up before the end of the response (it may)
            conn.start_next_cycle()

    async def _forward(
        self,
        conn: h11.Connection,
        client: trio.abc.Stream,
        request: h11.Request,
        target: str,
        body: bytes,
    ) -> None:
        parts = urlsplit(target)
        assert parts.scheme == "http", target
        assert parts.hostname, target
        assert parts.port, target
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        up = h11.Connection(h11.CLIENT)
        headers = [(n, v) for n, v in request.headers if n.lower() not in HOP_BY_HOP]
        async with await trio.open_tcp_stream(parts.hostname, parts.port) as upstream:
            await upstream.send_all(
                up.send(h11.Request(method=request.method, target=path, headers=headers))
                + (up.send(h11.Data(data=body)) or b"")
                + (up.send(h11.EndOfMessage()) or b"")
            )
            while True:
                event = await _next_event(up, upstream)
                if isinstance(event, h11.Response):
                    kept = [(n, v) for n, v in event.headers if n.lower() not in HOP_BY_HOP]
                    out = h11.Response(
                        status_code=event.status_code, headers=kept, reason=event.reason
                    )
                elif isinstance(event, h11.Data):
                    out = h11.Data(data=event.data)
                elif isinstance(event, h11.EndOfMessage):
                    await client.send_all(conn.send(h11.EndOfMessage()) or b"")
                    return
                else:
                    raise AssertionError(f"unexpected from the upstream: {event!r}")
                await client.send_all(conn.send(out) or b"")


async def _next_event(conn: h11.Connection, stream: trio.abc.Stream) -> object:
    """The next h11 event, reading from ``stream`` as needed."""
    while (event := conn.next_event()) is h11.NEED_DATA:
        conn.receive_data(await stream.receive_some())
    return event


@pytest.fixture
async def proxy(nursery: trio.Nursery) -> RecordingProxy:
    proxy = RecordingProxy()
    await nursery.start(proxy.serve)
    return proxy


@pytest.fixture(autouse=True)
def no_proxy_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    """Start from an environment with no proxy settings, whatever the machine has."""
    for name in PROXY_VARIABLES:
        monkeypatch.delenv(name, raising=False)


def ask() -> ChatRequest:
    return ChatRequest.from_openai(
        {"model": "fake", "messages": [{"role": "user", "content": "hi"}]}
    )


#: Environment settings (``{proxy}`` standing for the proxy's URL), and whether a request to
#: the fake model server on 127.0.0.1 goes through the proxy (what httpx2 does: it makes no
#: exception for loopback addresses).
CASES = {
    "HTTP_PROXY": ({"HTTP_PROXY": "{proxy}"}, True),
    "http_proxy": ({"http_proxy": "{proxy}"}, True),
    "ALL_PROXY": ({"ALL_PROXY": "{proxy}"}, True),
    "HTTPS_PROXY only (the upstream is http)": ({"HTTPS_PROXY": "{proxy}"}, False),
    "HTTP_PROXY, NO_PROXY=127.0.0.1": ({"HTTP_PROXY": "{proxy}", "NO_PROXY": "127.0.0.1"}, False),
    "ALL_PROXY, no_proxy=*": ({"ALL_PROXY": "{proxy}", "no_proxy": "*"}, False),
    "HTTP_PROXY, NO_PROXY=localhost (not the URL's host)": (
        {"HTTP_PROXY": "{proxy}", "NO_PROXY": "localhost"},
        True,
    ),
    "none": ({}, False),
}


@pytest.mark.parametrize(("settings", "proxied"), CASES.values(), ids=CASES.keys())
@bounded(20)
async def test_the_upstream_client_honours_proxy_settings_like_httpx2(
    fake_server: FakeModelServer,
    proxy: RecordingProxy,
    monkeypatch: pytest.MonkeyPatch,
    settings: dict[str, str],
    proxied: bool,
) -> None:
    for name, value in settings.items():
        monkeypatch.setenv(name, value.format(proxy=proxy.url))
    url = f"{fake_server.openai_url}/chat/completions"
    body = {"model": "fake", "messages": [{"role": "user", "content": "hi"}], "stream": True}
    expected = [("POST", url)] if proxied else []

    # A plain httpx2 client: what "honoured" means.
    async with httpx2.AsyncClient() as plain:
        response = await plain.post(url, json=body)
    assert response.status_code == 200
    assert proxy.seen == expected
    proxy.seen.clear()

    # The relay's shared client, as built by http_client().
    async with tokenrelay.http_client() as client:
        response = await client.post(url, json=body)
        lean = isinstance(response.extensions["network_stream"], _LeanStream)
    assert response.status_code == 200
    assert proxy.seen == expected
    assert lean is not proxied  # direct connections, and only those, are the lean ones
    proxy.seen.clear()

    # An upstream as the CLI opens it, streaming a whole answer.
    async with (
        tokenrelay.open_upstream(f"openai={fake_server.openai_url}") as upstream,
        tokenrelay.guard(upstream.stream(ask()), first_token_timeout=5, token_timeout=5) as deltas,
    ):
        texts = [delta.text async for delta in deltas]
    assert "".join(texts) == "tok0 tok1 tok2 tok3 tok4 "
    assert proxy.seen == expected
    assert len(fake_server.requests) == 3
