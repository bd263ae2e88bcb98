"""What a user would otherwise pick: a FastAPI + sse-starlette + httpx2 proxy on uvicorn,
relaying an Ollama upstream as OpenAI-style SSE chunks. No sessions, stop or resume: just
the proxying, as plainly as it is usually written.

Run: ``python -m benchmarks.baselines.fastapi_proxy UPSTREAM_URL``; prints its own URL.
"""

from __future__ import annotations

import asyncio
import json
import socket
import sys
from collections.abc import AsyncIterator

import httpx2
import uvicorn
from fastapi import FastAPI, Request
from sse_starlette.sse import EventSourceResponse


def create_app(upstream: str) -> FastAPI:
    app = FastAPI()
    client = httpx2.AsyncClient(
        timeout=httpx2.Timeout(10.0, read=None),
        limits=httpx2.Limits(max_connections=2000, max_keepalive_connections=2000),
    )

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> EventSourceResponse:
        body = await request.json()
        payload = {"model": body.get("model"), "messages": body["messages"], "stream": True}

        async def events() -> AsyncIterator[str]:
            async with client.stream("POST", f"{upstream}/api/chat", json=payload) as response:
                async for line in response.aiter_lines():
                    if not line:
                        continue
                    data = json.loads(line)
                    done = bool(data.get("done"))
                    yield json.dumps(
                        {
                            "id": "proxy",
                            "object": "chat.completion.chunk",
                            "model": payload["model"],
                            "choices": [
                                {
                                    "index": 0,
                                    "delta": {}
                                    if done
                                    else {"content": data["message"]["content"]},
                                    "finish_reason": data.get("done_reason", "stop")
                                    if done
                                    else None,
                                }
                            ],
                        }
                    )
                    if done:
                        break
            yield "[DONE]"

        return EventSourceResponse(events())

    return app


def main() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(4096)
    print(f"http://127.0.0.1:{sock.getsockname()[1]}", flush=True)
    config = uvicorn.Config(
        create_app(sys.argv[1]), log_level="warning", access_log=False, backlog=4096
    )
    asyncio.run(uvicorn.Server(config).serve(sockets=[sock]))


if __name__ == "__main__":
    main()
