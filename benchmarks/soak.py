"""A bounded soak: many runs through a relay against the fake model server over HTTP, each
ended at random (finished, stopped, superseded, detached, its client gone), then checks that
nothing is left behind: tasks, upstream connections, requests the model server still answers,
memory growth after warm-up."""

from __future__ import annotations

import gc
import random
import time
from typing import Any

import httpx2
import psutil
import trio

import tokenrelay
from tokenrelay import ChatRequest

from .latency import producer


def count_tasks() -> int:
    """Every task in this trio run."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(walk(child) for n in task.child_nurseries for child in n.child_tasks)

    return walk(trio.lowlevel.current_root_task())


async def run(url: str, runs: int, concurrency: int = 50, seed: int = 7) -> dict[str, Any]:
    rng = random.Random(seed)
    process = psutil.Process()
    outcomes: dict[str, int] = {}
    rss: list[tuple[int, int]] = []
    done = 0
    grace = 0.5
    async with (
        httpx2.AsyncClient(timeout=30) as control,
        tokenrelay.open_upstream(f"ollama={url}", max_connections=concurrency * 2) as upstream,
    ):
        tasks_before = count_tasks()
        started = time.monotonic()
        async with tokenrelay.open_relay(grace=grace, max_events=200) as relay:

            async def one(worker: int, i: int) -> None:
                session = f"w{worker}-{i % 3}"
                model = rng.choice(["quick", "paced", "stream"])
                request = ChatRequest.from_openai(
                    {"model": model, "messages": [{"role": "user", "content": f"soak {i}"}]}
                )
                run = await relay.start(session, producer(upstream, request))
                action = rng.choice(["finish", "stop", "supersede", "detach", "disconnect"])
                if action == "finish" and model == "stream":
                    action = "stop"  # a long answer is not waited for
                outcomes[action] = outcomes.get(action, 0) + 1
                if action == "finish":
                    await run.wait_finished()
                elif action == "stop":
                    await trio.sleep(rng.random() * 0.05)
                    await relay.stop(session)
                elif action == "supersede":
                    await trio.sleep(rng.random() * 0.05)
                    quick = ChatRequest.from_openai(
                        {"model": "quick", "messages": [{"role": "user", "content": "next"}]}
                    )
                    await (await relay.start(session, producer(upstream, quick))).wait_finished()
                elif action == "detach":
                    async with run.subscribe() as sub:
                        with trio.move_on_after(rng.random() * 0.05):
                            async for _ in sub:
                                pass
                    if model == "stream":
                        await relay.stop(session)
                    else:
                        await run.wait_finished()
                else:  # the client went away with the cancel policy: stopped when unwatched
                    async with run.subscribe():
                        await trio.sleep(rng.random() * 0.05)
                    run.cancel("client_disconnect")
                    await run.wait_finished()

            async def worker(index: int) -> None:
                nonlocal done
                for i in range(index, runs, concurrency):
                    await one(index, i)
                    done += 1
                    if done % max(1, runs // 10) == 0:
                        gc.collect()
                        rss.append((done, process.memory_info().rss))

            async with trio.open_nursery() as nursery:
                for index in range(concurrency):
                    nursery.start_soon(worker, index)
            elapsed = time.monotonic() - started
            await trio.sleep(grace * 2)  # every finished run's grace period is over
            retained = relay.statistics()
        tasks_after = count_tasks()
        pool = upstream._client._transport._pool  # type: ignore[attr-defined]
        active_connections = sum(1 for c in pool.connections if not (c.is_idle() or c.is_closed()))
        server = (await control.get(f"{url}/_fake/open")).json()
    warm = rss[len(rss) // 5][1] if rss else 0
    return {
        "runs": runs,
        "elapsed": elapsed,
        "outcomes": outcomes,
        "leaked_tasks": tasks_after - tasks_before,
        "sessions_left": retained.sessions,
        "active_upstream_connections": active_connections,
        "requests_still_open_upstream": server["open"],
        "rss_after_warmup": warm,
        "rss_end": rss[-1][1] if rss else 0,
        "rss_growth": (rss[-1][1] - warm) / warm if warm else 0.0,
    }
