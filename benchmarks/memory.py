"""What runs cost in memory: a retained finished run, many idle sessions, a stalled reader."""

from __future__ import annotations

import gc
import math
import tracemalloc

import psutil
import trio

import tokenrelay
from tokenrelay import Emit
from tokenrelay.upstreams._codec import encode_text

WORDS = ["the", " model", " answers", " in", " tokens", " of", " a", " few", " bytes", " each"]


async def _emit_tokens(emit: Emit, count: int) -> None:
    # As the server stores them: each token's text as a JSON string literal, a fresh string
    # for every token of every run (sharing one list of strings would hide their cost).
    for i in range(count):
        await emit(encode_text(WORDS[i % len(WORDS)]))


async def _finished_runs(relay: tokenrelay.Relay, runs: int, tokens: int) -> None:
    async def produce(emit: Emit) -> None:
        await _emit_tokens(emit, tokens)

    for i in range(runs):
        run = await relay.start(f"session-{i}", produce)
        await run.wait_finished()


async def bytes_per_retained_run(tokens: int = 1000, runs: int = 200) -> float:
    """Bytes a finished run of ``tokens`` tokens holds while retained (tracemalloc)."""
    async with tokenrelay.open_relay(grace=math.inf) as relay:
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        await _finished_runs(relay, runs, tokens)
        gc.collect()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        assert relay.statistics().runs_retained == runs
    return (after - before) / runs


async def rss_for_idle_sessions(sessions: int, tokens: int = 200) -> tuple[float, float]:
    """The process's RSS growth, and its RSS, holding ``sessions`` finished runs."""
    process = psutil.Process()
    async with tokenrelay.open_relay(grace=math.inf) as relay:
        gc.collect()
        before = process.memory_info().rss
        await _finished_runs(relay, sessions, tokens)
        gc.collect()
        after = process.memory_info().rss
        assert relay.statistics().runs_retained == sessions
    return after - before, after


async def stalled_subscriber(events: int, max_events: int | None) -> float:
    """Bytes still allocated once a run has emitted ``events`` events while one subscriber
    never read any (tracemalloc)."""
    async with tokenrelay.open_relay(grace=math.inf, max_events=max_events) as relay:
        emitted = trio.Event()
        release = trio.Event()

        async def produce(emit: Emit) -> None:
            await _emit_tokens(emit, events)
            emitted.set()
            await release.wait()

        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        run = await relay.start("s", produce)
        async with run.subscribe():  # and never read
            await emitted.wait()
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
        tracemalloc.stop()
        release.set()
    return held
