"""The reference design, re-implemented on asyncio for comparison (our own code, from the
behaviour ../shared/reference/ describes):

- a stream guard that waits for each chunk in one-second slices, checking a stop event
  between slices (and after each chunk), then cancels the pending read and closes the
  upstream generator;
- a per-session registry whose new run cancels the old one and waits for it with
  ``wait_for(prev, 2.0)``, proceeding anyway when that times out;
- an unbounded ``asyncio.Queue`` per subscriber for fan-out.

Run as a worker: ``python -m benchmarks.baselines.reference MEASURE --url URL --trials N``;
it prints one JSON list of seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import random
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2


async def polling_guard(
    upstream: AsyncIterator[str],
    stop: asyncio.Event,
    first_timeout: float,
    chunk_timeout: float,
) -> AsyncIterator[str]:
    """Yield upstream chunks; notice ``stop`` at most a second late during a wait."""
    first = True
    pending: asyncio.Future[str] | None = None
    try:
        while True:
            limit = first_timeout if first else chunk_timeout
            pending = asyncio.ensure_future(upstream.__anext__())
            waited = 0.0
            while True:
                done, _ = await asyncio.wait({pending}, timeout=1.0)
                if done:
                    break
                waited += 1.0
                if stop.is_set():
                    return
                if waited >= limit:
                    raise TimeoutError(f"no chunk after {waited:.0f}s")
            try:
                chunk = pending.result()
            except StopAsyncIteration:
                return
            pending = None
            first = False
            yield chunk
            if stop.is_set():
                return
    finally:
        if pending is not None and not pending.done():
            pending.cancel()
            with contextlib.suppress(BaseException):
                await pending
        with contextlib.suppress(Exception):
            await upstream.aclose()  # type: ignore[attr-defined]


async def ollama_tokens(
    client: httpx2.AsyncClient, url: str, model: str, marker: str
) -> AsyncIterator[str]:
    """What a user of the reference design writes: an async generator over the HTTP stream."""
    body = {"model": model, "messages": [{"role": "user", "content": marker}], "stream": True}
    async with client.stream("POST", f"{url}/api/chat", json=body) as response:
        async for line in response.aiter_lines():
            if not line:
                continue
            data = json.loads(line)
            if data.get("done"):
                return
            yield data["message"]["content"]


class Registry:
    """One run per session; a new one cancels the old, waits up to 2 s, then proceeds."""

    def __init__(self) -> None:
        self.tasks: dict[str, asyncio.Task[None]] = {}
        self.stops: dict[str, asyncio.Event] = {}

    async def register(self, session: str, stop: asyncio.Event, work: Any) -> asyncio.Task[None]:
        previous = self.tasks.get(session)
        if previous is not None and not previous.done():
            self.stops[session].set()
            previous.cancel()
            with contextlib.suppress(TimeoutError, asyncio.CancelledError, Exception):
                await asyncio.wait_for(previous, timeout=2.0)  # then proceed regardless
        task = asyncio.ensure_future(work)
        self.tasks[session] = task
        self.stops[session] = stop
        return task


async def _consume(guarded: AsyncIterator[str], seen: asyncio.Queue[str]) -> None:
    async for chunk in guarded:
        seen.put_nowait(chunk)


async def _closed_at(client: httpx2.AsyncClient, url: str, marker: str) -> dict[str, Any]:
    response = await client.get(f"{url}/_fake/closed", params={"marker": marker}, timeout=60)
    return dict(response.json())


async def measure_stop(url: str, phase: str, trials: int, batch: int) -> list[float]:
    """Stop -> the model server sees its connection closed."""
    latencies: list[float] = []
    async with httpx2.AsyncClient(timeout=None) as client:

        async def one(i: int) -> None:
            marker = f"ref-stop-{phase}-{i}-{random.random()}"
            stop = asyncio.Event()
            seen: asyncio.Queue[str] = asyncio.Queue()
            guarded = polling_guard(ollama_tokens(client, url, phase, marker), stop, 120, 30)
            task = asyncio.ensure_future(_consume(guarded, seen))
            if phase == "prefill":
                await asyncio.sleep(0.2 + random.random())
            else:
                for _ in range(3):
                    await seen.get()
                await asyncio.sleep(random.random() * 0.02)
            stopped = time.monotonic()
            stop.set()
            record = await _closed_at(client, url, marker)
            latencies.append(record["closed"] - stopped)
            await task

        for start in range(0, trials, batch):
            await asyncio.gather(*(one(i) for i in range(start, min(trials, start + batch))))
    return latencies


async def measure_supersede(url: str, trials: int) -> dict[str, Any]:
    """A second prompt arrives -> its upstream request is sent; and how often the old request
    was still open at the model server when the new one arrived."""
    latencies: list[float] = []
    overlaps = 0
    registry = Registry()
    async with httpx2.AsyncClient(timeout=None) as client:
        for i in range(trials):
            session = f"s{i}"
            seen: asyncio.Queue[str] = asyncio.Queue()
            stop_a = asyncio.Event()
            a = f"ref-a-{i}-{random.random()}"
            await registry.register(
                session,
                stop_a,
                _consume(
                    polling_guard(ollama_tokens(client, url, "stream", a), stop_a, 120, 30), seen
                ),
            )
            for _ in range(3):
                await seen.get()
            await asyncio.sleep(random.random() * 0.02)
            b = f"ref-b-{i}-{random.random()}"
            stop_b = asyncio.Event()
            arrived = time.monotonic()
            task = await registry.register(
                session,
                stop_b,
                _consume(
                    polling_guard(ollama_tokens(client, url, "quick", b), stop_b, 120, 30),
                    asyncio.Queue(),
                ),
            )
            record_b = await _closed_at(client, url, b)
            record_a = await _closed_at(client, url, a)
            overlaps += record_a["closed"] > record_b["received"]
            latencies.append(record_b["received"] - arrived)
            await task
    return {"latencies": latencies, "overlaps": overlaps}


async def measure_fanout(subscribers: int, events: int) -> list[float]:
    """Deliveries per second through one unbounded asyncio.Queue per subscriber."""
    queues: list[asyncio.Queue[Any]] = [asyncio.Queue() for _ in range(subscribers)]

    async def reader(queue: asyncio.Queue[Any]) -> None:
        while (await queue.get()) is not None:
            pass

    readers = [asyncio.ensure_future(reader(q)) for q in queues]
    started = time.perf_counter()
    for i in range(events):
        for queue in queues:
            queue.put_nowait(i)
        await asyncio.sleep(0)
    for queue in queues:
        queue.put_nowait(None)
    await asyncio.gather(*readers)
    return [subscribers * events / (time.perf_counter() - started)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("measure", choices=["stop", "supersede", "fanout"])
    parser.add_argument("--url", default="")
    parser.add_argument("--phase", default="prefill")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--batch", type=int, default=10)
    parser.add_argument("--subscribers", type=int, default=10)
    parser.add_argument("--events", type=int, default=1000)
    args = parser.parse_args()
    result: Any
    if args.measure == "stop":
        result = asyncio.run(measure_stop(args.url, args.phase, args.trials, args.batch))
    elif args.measure == "supersede":
        result = asyncio.run(measure_supersede(args.url, args.trials))
    else:
        result = asyncio.run(measure_fanout(args.subscribers, args.events))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
