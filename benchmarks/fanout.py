"""One run's events to many in-process subscribers, against raw trio memory channels."""

from __future__ import annotations

import math
import time

import trio
import trio.testing

import tokenrelay
from tokenrelay import Emit


async def relay_fanout(subscribers: int, events: int, *, batched: bool) -> float:
    """Deliveries per second from one relay run to ``subscribers`` subscriptions."""
    go = trio.Event()
    delivered = 0

    async def produce(emit: Emit) -> None:
        await go.wait()
        for _ in range(events):
            await emit("token")

    async def read(sub: tokenrelay.Subscription) -> None:
        nonlocal delivered
        async with sub:
            if batched:
                try:
                    while True:
                        batch = await sub.receive_batch()  # not inside the +=: another
                        delivered += len(batch)  # task may add between its read and write
                except trio.EndOfChannel:
                    pass
            else:
                async for _ in sub:
                    delivered += 1

    async with tokenrelay.open_relay() as relay:
        run = await relay.start("s", produce)
        async with trio.open_nursery() as nursery:
            for _ in range(subscribers):
                nursery.start_soon(read, run.subscribe())
            await trio.testing.wait_all_tasks_blocked()
            started = time.perf_counter()
            go.set()
        elapsed = time.perf_counter() - started
    assert delivered == subscribers * events
    return delivered / elapsed


async def raw_fanout(subscribers: int, events: int) -> float:
    """The same through bare trio memory channels: send_nowait to each, one checkpoint per
    event, each reader ``async for``. (The relay's emit() yields only once every 32 events
    when its producer passes no other schedule point, as this producer does not.)"""
    channels = [trio.open_memory_channel[str](math.inf) for _ in range(subscribers)]
    delivered = 0

    async def read(receive: trio.MemoryReceiveChannel[str]) -> None:
        nonlocal delivered
        async with receive:
            async for _ in receive:
                delivered += 1

    async with trio.open_nursery() as nursery:
        for _, receive in channels:
            nursery.start_soon(read, receive)
        await trio.testing.wait_all_tasks_blocked()
        started = time.perf_counter()
        for _ in range(events):
            for send, _ in channels:
                send.send_nowait("token")
            await trio.lowlevel.checkpoint()
        for send, _ in channels:
            send.close()
    elapsed = time.perf_counter() - started
    assert delivered == subscribers * events
    return delivered / elapsed
