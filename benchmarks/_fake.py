"""The fake model server in a process of its own, for benchmarks.

Prints its URL on stdout once it listens. Besides the two chat dialects it serves
``GET /_fake/closed?marker=M``: waits until the request whose last message is ``M`` has
ended, and returns when it arrived and when it closed on ``time.monotonic()``, the clock every
process on the machine shares (trio's own clock has a per-process offset).
"""

from __future__ import annotations

import sys
import time

import trio
from quart import request

from tokenrelay.testing import FakeModelServer, FakeRequest, FakeScript

#: Scripts by model name.
SCRIPTS = {
    # Prefill for a minute: stop it while the model "thinks".
    "prefill": FakeScript(tokens=["never"], prefill=60.0),
    # 50 tokens/s for a long time: stop it mid-stream.
    "stream": FakeScript(tokens=[f" t{i}" for i in range(100_000)], interval=0.02),
    # Answer at once: latency overheads.
    "quick": FakeScript(tokens=[f" t{i}" for i in range(5)]),
    # 50 tokens at 50 tokens/s, each stamped with when it was sent: throughput, added delay.
    "paced": FakeScript(tokens=[f" t{i}" for i in range(50)], interval=0.02, stamp=True),
    # One stamped token at once: time to first token.
    "first": FakeScript(tokens=[" t0"], stamp=True),
}


def _marker(record: FakeRequest) -> str | None:
    messages = record.body.get("messages")
    if isinstance(messages, list) and messages and isinstance(messages[-1], dict):
        content = messages[-1].get("content")
        return content if isinstance(content, str) else None
    return None


async def main() -> None:
    server = FakeModelServer(SCRIPTS["quick"])
    for model, script in SCRIPTS.items():
        server.add_model(model, script)
    offset = time.monotonic() - trio.current_time()

    @server.app.get("/_fake/closed")
    async def closed() -> dict[str, object]:
        marker = request.args["marker"]
        with trio.fail_after(30):
            while True:
                found = [r for r in server.requests if _marker(r) == marker]
                if found:
                    break
                await server.wait_for_requests(len(server.requests) + 1)
            record = found[0]
            await record.wait_closed()
        assert record.closed_at is not None
        return {
            "received": record.received_at + offset,
            "closed": record.closed_at + offset,
            "generating": record.generating_at_close,
            "tokens": record.tokens_sent,
        }

    @server.app.get("/_fake/open")
    async def still_open() -> dict[str, object]:
        """How many requests are still being answered (a soak must end with none)."""
        return {"open": len(server.open_requests()), "total": len(server.requests)}

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve)
        print(server.url, flush=True)
        await trio.sleep_forever()


if __name__ == "__main__":
    try:
        trio.run(main)
    except KeyboardInterrupt:
        sys.exit(0)
