"""Stop and supersede latency through tokenrelay, measured the way the baseline is."""

from __future__ import annotations

import random
import time
from typing import Any

import httpx2
import trio

import tokenrelay
from tokenrelay import ChatRequest, Emit
from tokenrelay.upstreams import encode_delta


def _request(model: str, marker: str) -> ChatRequest:
    return ChatRequest.from_openai(
        {"model": model, "messages": [{"role": "user", "content": marker}]}
    )


def producer(upstream: tokenrelay.Upstream, request: ChatRequest) -> tokenrelay.Produce:
    async def produce(emit: Emit) -> None:
        await tokenrelay.pump(
            upstream.stream(request),
            emit,
            encode_delta,
            first_token_timeout=120,
            token_timeout=30,
        )

    return produce


async def closed_at(client: httpx2.AsyncClient, url: str, marker: str) -> dict[str, Any]:
    response = await client.get(f"{url}/_fake/closed", params={"marker": marker}, timeout=60)
    return dict(response.json())


async def _tokens(run: tokenrelay.Run, count: int) -> None:
    async with run.subscribe() as sub:
        for _ in range(count):
            await sub.receive()


async def measure_stop(url: str, phase: str, trials: int, batch: int) -> list[float]:
    """Stop -> the model server sees its connection closed."""
    latencies: list[float] = []
    async with (
        tokenrelay.open_upstream(f"ollama={url}") as upstream,
        httpx2.AsyncClient(timeout=None) as control,
        tokenrelay.open_relay() as relay,
    ):

        async def one(i: int) -> None:
            marker = f"trio-stop-{phase}-{i}-{random.random()}"
            session = f"s{i}"
            run = await relay.start(session, producer(upstream, _request(phase, marker)))
            if phase == "prefill":
                await trio.sleep(0.2 + random.random())
            else:
                await _tokens(run, 3)
                await trio.sleep(random.random() * 0.02)
            stopped = time.monotonic()
            await relay.stop(session)
            record = await closed_at(control, url, marker)
            latencies.append(record["closed"] - stopped)

        for start in range(0, trials, batch):
            async with trio.open_nursery() as nursery:
                for i in range(start, min(trials, start + batch)):
                    nursery.start_soon(one, i)
    return latencies


async def measure_supersede(url: str, trials: int) -> tuple[list[float], int]:
    """A second prompt arrives -> its upstream request is sent (old run cleaned up first).
    Also returns how often the model server saw the old request still open when the new one
    arrived."""
    latencies: list[float] = []
    overlaps = 0
    async with (
        tokenrelay.open_upstream(f"ollama={url}") as upstream,
        httpx2.AsyncClient(timeout=None) as control,
        tokenrelay.open_relay() as relay,
    ):
        for i in range(trials):
            session = f"s{i}"
            a = f"trio-a-{i}-{random.random()}"
            run_a = await relay.start(session, producer(upstream, _request("stream", a)))
            await _tokens(run_a, 3)
            await trio.sleep(random.random() * 0.02)
            b = f"trio-b-{i}-{random.random()}"
            arrived = time.monotonic()
            run_b = await relay.start(session, producer(upstream, _request("quick", b)))
            record_b = await closed_at(control, url, b)
            record_a = await closed_at(control, url, a)
            overlaps += record_a["closed"] > record_b["received"]
            latencies.append(record_b["received"] - arrived)
            await run_b.wait_finished()
    return latencies, overlaps
