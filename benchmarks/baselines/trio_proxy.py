"""The FastAPI proxy (``fastapi_proxy.py``) written for the relay's own server stack: the same
proxying, as plainly, on quart-trio and hypercorn's trio worker, with a plain httpx2 client.
What a relay on this stack costs before anything is done about it: no sessions, stop or
resume, and none of the relay's shortcuts.

``--lean`` gives it the relay's shortcuts and nothing else of the relay: the upstream
request straight to httpx2's connection pool (``send_json``), the body read straight from
the connection (``lean_body``) over the relay's network backend, and hypercorn's
connections with the relay's direct writes. No run, no task of its own, no log, no
fan-out: what is left between it and ``tokenrelay serve`` is the relay itself. It does not
tune its garbage collector as ``tokenrelay serve`` does (``_settle_gc``), so it pays
collections the relay does not: a yardstick that errs on the relay's side. (It reaches into
tokenrelay's private modules: a yardstick for this benchmark, not a way to write a proxy.)

Run: ``python -m benchmarks.baselines.trio_proxy UPSTREAM_URL [--lean]``; prints its own URL.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from collections.abc import AsyncGenerator, AsyncIterator
from functools import partial
from typing import Any

import httpx2
import hypercorn.trio
import trio
from hypercorn.config import Config
from quart import Response, request
from quart_trio import QuartTrio

from tokenrelay.server._hypercorn import use_direct_writes
from tokenrelay.upstreams._transport import lean_body, send_json, use_lean_backend


def create_app(upstream: str, *, lean: bool = False) -> QuartTrio:
    app = QuartTrio("trio-proxy")
    client = httpx2.AsyncClient(
        timeout=httpx2.Timeout(10.0, read=None),
        limits=httpx2.Limits(max_connections=2000, max_keepalive_connections=2000),
    )
    url = httpx2.URL(f"{upstream}/api/chat")
    if lean:
        use_lean_backend(client)

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        body = json.loads(await request.get_data(cache=False, as_text=False))
        payload = {"model": body.get("model"), "messages": body["messages"], "stream": True}
        lines = _lean_lines(client, url, payload) if lean else _lines(client, url, payload)

        async def events() -> AsyncIterator[bytes]:
            async with contextlib.aclosing(lines):
                async for line in lines:
                    data = json.loads(line)
                    done = bool(data.get("done"))
                    chunk = {
                        "id": "proxy",
                        "object": "chat.completion.chunk",
                        "model": payload["model"],
                        "choices": [
                            {
                                "index": 0,
                                "delta": {} if done else {"content": data["message"]["content"]},
                                "finish_reason": data.get("done_reason", "stop") if done else None,
                            }
                        ],
                    }
                    yield f"data: {json.dumps(chunk)}\n\n".encode()
                    if done and not lean:
                        # (As the FastAPI proxy does: the response is closed before its end
                        # is read, and its connection with it. The lean one reads to the end,
                        # as the relay does, and keeps the connection.)
                        break
            yield b"data: [DONE]\n\n"

        response = Response(events(), mimetype="text/event-stream")
        response.timeout = None
        return response

    return app


async def _lines(
    client: httpx2.AsyncClient, url: httpx2.URL, payload: dict[str, Any]
) -> AsyncGenerator[str | bytes]:
    async with client.stream("POST", url, json=payload) as response:
        async for line in response.aiter_lines():
            if line:
                yield line


async def _lean_lines(
    client: httpx2.AsyncClient, url: httpx2.URL, payload: dict[str, Any]
) -> AsyncGenerator[str | bytes]:
    transport = client._transport
    assert isinstance(transport, httpx2.AsyncHTTPTransport)
    response = await send_json(client, transport, url, {}, payload)
    try:
        body = lean_body(response)
        assert body is not None, "not the connection the lean path expects"
        rest = b""
        while (piece := await body.read()) is not None:
            *lines, rest = (rest + piece).split(b"\n")
            for line in lines:
                if line:
                    yield line
    finally:
        await response.aclose()


async def main(upstream: str, lean: bool) -> None:
    if lean:
        use_direct_writes()
    config = Config()  # as ``tokenrelay serve`` configures hypercorn
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.backlog = 2048
    async with trio.open_nursery() as nursery:
        app = create_app(upstream, lean=lean)
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
        print(binds[0], flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("upstream")
    parser.add_argument("--lean", action="store_true")
    args = parser.parse_args()
    try:
        trio.run(main, args.upstream, args.lean)
    except KeyboardInterrupt:
        sys.exit(0)
