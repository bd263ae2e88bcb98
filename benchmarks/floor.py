"""The serving floor: a bare quart-trio endpoint on hypercorn's trio worker that writes the
events ``tokenrelay serve`` writes, paced as the fake model paces them, with no upstream and
no relay logic. What it costs is what the mandated server stack costs; what the relay costs
beyond it is the relay's own share.

``POST /v1/chat/completions`` with model ``paced`` streams 50 stamped tokens at 50 tokens/s,
``first`` one stamped token at once (the stamps are those the fake model puts on its tokens,
so the load generator times them alike): the stream's opening comment, ``retry:`` and role
chunk in one write, then one write per token (a ``chat.completion.chunk`` with its ``id:``
line, as the relay renders it), the finishing chunk and ``[DONE]``.

Run: ``python -m benchmarks.floor``; prints its URL on stdout.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import AsyncIterator
from functools import partial

import hypercorn.trio
import trio
from hypercorn.config import Config
from quart import Response, request
from quart_trio import QuartTrio

#: Model name → (tokens, seconds between them), as ``benchmarks._fake`` scripts them.
SCRIPTS = {"paced": (50, 0.02), "first": (1, 0.0)}


def create_app() -> QuartTrio:
    app = QuartTrio("floor")

    @app.post("/v1/chat/completions")
    async def chat() -> Response:
        body = json.loads(await request.get_data(cache=False, as_text=False))
        model = body.get("model", "paced")
        tokens, interval = SCRIPTS.get(model, SCRIPTS["paced"])
        response = Response(_events(model, tokens, interval), mimetype="text/event-stream")
        response.headers.update({"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        response.timeout = None
        return response

    return app


async def _events(model: str, tokens: int, interval: float) -> AsyncIterator[bytes]:
    head = json.dumps(
        {"id": "floor", "object": "chat.completion.chunk", "created": 1, "model": model},
        separators=(",", ":"),
    )[:-1]
    content_head = head + ',"choices":[{"index":0,"delta":{"content":'
    content_tail = '},"finish_reason":null}]}'
    yield (
        b": tokenrelay run floor\n\nretry: 3000\ndata: "
        + (
            head + ',"choices":[{"index":0,"delta":{"role":"assistant"},"finish_reason":null}]}'
        ).encode()
        + b"\n\n"
    )
    for i in range(tokens):
        await trio.sleep(interval)
        text = json.dumps(f" t{i}@{time.monotonic():.6f}")
        yield f"id: {i}\ndata: {content_head}{text}{content_tail}\n\n".encode()
    finish = head + ',"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}'
    yield f"id: {tokens}\ndata: {finish}\n\ndata: [DONE]\n\n".encode()


async def main() -> None:
    config = Config()  # as ``tokenrelay serve`` configures hypercorn
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    config.backlog = 2048
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, create_app(), config))
        print(binds[0], flush=True)


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
