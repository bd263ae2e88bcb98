"""What one body write costs in hypercorn's trio worker, and what of it is its write path:
``TCPServer.protocol_send`` takes a ``trio.Lock`` (a schedule point even when nobody holds
it), enters a shielded ``CancelScope`` and calls ``send_all`` (another schedule point).

A raw ASGI app (no Quart) streams ``--events`` small SSE events to each of ``--clients``
connections (a load process reads them); the server's own CPU time per event is measured
with ``time.process_time()``, for hypercorn as it is and with ``protocol_send`` patched:

- ``lock fast path``: the lock taken with ``acquire_nowait()`` when it is free (the await
  only when it is not);
- ``+ direct send``: that, and the data handed to the socket at once when the kernel takes
  all of it (the shielded ``send_all`` only for what is left), followed by one
  ``cancel_shielded_checkpoint`` so that a write is still a schedule point.

Run: ``python -m benchmarks.hypercorn_write [--clients 50] [--events 2000] [--rounds 3]``.
Each variant runs in a process of its own; rounds interleave.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from functools import partial
from typing import Any

import hypercorn.trio
import trio
from hypercorn.config import Config
from hypercorn.events import Closed, RawData
from hypercorn.trio.tcp_server import TCPServer

EVENT = b'id: 1\ndata: {"id":"x","object":"chat.completion.chunk","choices":[{"index":0,' + (
    b'"delta":{"content":" tok"},"finish_reason":null}]}\n\n'
)


def patch(variant: str) -> None:
    """Replace ``TCPServer.protocol_send`` for ``variant``."""
    if variant == "as is":
        return
    original = TCPServer.protocol_send
    direct = variant == "+ direct send"

    async def protocol_send(self: TCPServer, event: Any) -> None:
        if not isinstance(event, RawData):
            await original(self, event)
            return
        lock = self.send_lock
        try:
            lock.acquire_nowait()
        except trio.WouldBlock:
            await lock.acquire()
        try:
            data = event.data
            if direct:
                sock = getattr(getattr(self.stream, "socket", None), "_sock", None)
                await trio.lowlevel.checkpoint_if_cancelled()
                try:
                    sent = sock.send(data) if sock is not None else 0
                except BlockingIOError:
                    sent = 0
                except OSError:
                    await self.protocol.handle(Closed())
                    return
                data = data[sent:]
            if data:
                with trio.CancelScope(shield=True):
                    await self.stream.send_all(data)
            elif direct:
                await trio.lowlevel.cancel_shielded_checkpoint()
        except (trio.BrokenResourceError, trio.ClosedResourceError):
            await self.protocol.handle(Closed())
        finally:
            lock.release()

    TCPServer.protocol_send = protocol_send  # type: ignore[method-assign]


def app(events: int) -> Any:
    async def asgi(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": f"{message['type']}.complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        if scope["type"] != "http":
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for _ in range(events):
            await send({"type": "http.response.body", "body": EVENT, "more_body": True})
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    return asgi


async def serve(variant: str, clients: int, events: int) -> None:
    """The server process: serve, run the load process once per line on stdin, print the
    CPU time per event of each round."""
    patch(variant)
    config = Config()
    config.bind = ["127.0.0.1:0"]
    config.accesslog = None
    async with trio.open_nursery() as nursery:
        binds = await nursery.start(partial(hypercorn.trio.serve, app(events), config))
        port = binds[0].rsplit(":", 1)[1]
        stdin = trio.lowlevel.FdStream(0)
        while await stdin.receive_some():
            before = time.process_time()
            await trio.run_process(
                [sys.executable, "-m", "benchmarks.hypercorn_write", "--load", port, str(clients)]
            )
            used = time.process_time() - before
            print(json.dumps(used / (clients * events)), flush=True)
        nursery.cancel_scope.cancel()


async def load(port: int, clients: int) -> None:
    async def one() -> None:
        stream = await trio.open_tcp_stream("127.0.0.1", port)
        async with stream:
            await stream.send_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            while await stream.receive_some(1 << 16):
                pass

    async with trio.open_nursery() as nursery:
        for _ in range(clients):
            nursery.start_soon(one)


VARIANTS = ("as is", "lock fast path", "+ direct send")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--events", type=int, default=2000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--serve", choices=VARIANTS)
    parser.add_argument("--load", nargs=2, type=int)
    args = parser.parse_args()
    if args.load:
        trio.run(load, *args.load)
        return
    if args.serve:
        trio.run(serve, args.serve, args.clients, args.events)
        return
    servers = {
        variant: subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.hypercorn_write",
                "--serve",
                variant,
                "--clients",
                str(args.clients),
                "--events",
                str(args.events),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for variant in VARIANTS
    }
    samples: dict[str, list[float]] = {variant: [] for variant in VARIANTS}
    for _ in range(args.rounds):
        for variant, server in servers.items():
            assert server.stdin is not None
            assert server.stdout is not None
            server.stdin.write("go\n")
            server.stdin.flush()
            samples[variant].append(float(server.stdout.readline()))
    for server in servers.values():
        assert server.stdin is not None
        server.stdin.close()
        server.wait()
    base = statistics.median(samples["as is"])
    for variant in VARIANTS:
        median = statistics.median(samples[variant])
        print(f"{variant:<16} {median * 1e6:6.1f} us of server CPU per write  {median / base:.2f}x")


if __name__ == "__main__":
    main()
