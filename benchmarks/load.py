"""A load generator in a process of its own: N concurrent streaming chat requests over raw
sockets (so that the client costs as little as possible), timing every token against the
stamp the fake model put on it when it sent it.

Run: ``python -m benchmarks.load URL --streams N [--model M] [--path P] [--repeat R]``; prints
JSON. ``--path /v1/responses`` loads OpenAI's Responses API, counting its text deltas.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from urllib.parse import urlsplit

import trio

STAMP = re.compile(rb'@(\d+\.\d{6})"')
#: In a Responses API stream, the stamps of its text deltas only (the events that close the
#: text, and the response, carry the whole text again).
DELTA_STAMP = re.compile(rb'"delta":"[^"]*@(\d+\.\d{6})"')


async def stream(
    host: str,
    port: int,
    request: bytes,
    delays: list[float],
    ttfts: list[float],
    stamp: re.Pattern[bytes] = STAMP,
) -> int:
    """One request; returns how many tokens arrived."""
    sock = await trio.open_tcp_stream(host, port)
    async with sock:
        sent = time.monotonic()
        await sock.send_all(request)
        tokens = 0
        tail = b""
        while True:
            data = await sock.receive_some(1 << 16)
            if not data:
                break
            now = time.monotonic()
            buffer = tail + data
            for match in stamp.finditer(buffer):
                if match.end() <= len(tail):
                    continue  # counted with the previous chunk
                if tokens == 0:
                    ttfts.append(now - sent)
                delays.append(now - float(match.group(1)))
                tokens += 1
            if b"[DONE]" in buffer:
                break
            tail = buffer[-64:]
    return tokens


async def run(url: str, streams: int, model: str, path: str) -> dict[str, object]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    stamp = STAMP
    if path == "/v1/responses":  # OpenAI's Responses API
        body = json.dumps({"model": model, "stream": True, "input": "go"}).encode()
        stamp = DELTA_STAMP
    else:
        body = json.dumps(
            {"model": model, "stream": True, "messages": [{"role": "user", "content": "go"}]}
        ).encode()
    request = (
        f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode() + body
    delays: list[float] = []
    ttfts: list[float] = []
    counts: list[int] = []

    async def one() -> None:
        counts.append(await stream(host, port, request, delays, ttfts, stamp))

    started = time.monotonic()
    async with trio.open_nursery() as nursery:
        for _ in range(streams):
            nursery.start_soon(one)
    elapsed = time.monotonic() - started
    return {
        "streams": streams,
        "tokens": sum(counts),
        "elapsed": elapsed,
        "tokens_per_s": sum(counts) / elapsed,
        "delays": delays,
        "ttfts": ttfts,
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("url")
    parser.add_argument("--streams", type=int, default=1)
    parser.add_argument("--model", default="paced")
    parser.add_argument("--path", default="/v1/chat/completions")
    parser.add_argument("--repeat", type=int, default=1, help="sequential rounds")
    args = parser.parse_args()
    rounds = [
        trio.run(run, args.url, args.streams, args.model, args.path) for _ in range(args.repeat)
    ]
    print(json.dumps(rounds))


if __name__ == "__main__":
    main()
