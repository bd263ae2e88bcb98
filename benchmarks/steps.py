"""Scheduler steps per token: ``tokenrelay serve``'s app in this process (hypercorn's trio
worker, as the CLI runs it), the fake model and the load generator in processes of their own,
and a trio ``Instrument`` counting every task step (``before_task_step``) while N paced
streams run. Prints the steps per token delivered, by kind of task: what wakes per token,
and how often.

Run: ``python -m benchmarks.steps [--streams 100] [--rounds 3]``.
"""

from __future__ import annotations

import argparse
import collections
import json
import subprocess
import sys
from functools import partial

import hypercorn.trio
import trio
from hypercorn.config import Config

from tokenrelay.server import ServerConfig, create_app
from tokenrelay.server._hypercorn import use_direct_writes


class StepCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.counting = False
        self.steps: collections.Counter[str] = collections.Counter()

    def before_task_step(self, task: trio.lowlevel.Task) -> None:
        if self.counting:
            self.steps[_kind(task)] += 1


def _kind(task: trio.lowlevel.Task) -> str:
    """A task's kind: its coroutine's function, and the innermost frame it is parked in."""
    frames = [
        f"{frame.f_code.co_name} ({frame.f_code.co_filename.rsplit('/', 2)[-2]})"
        for frame, _ in task.iter_await_frames()
        if "/trio/" not in frame.f_code.co_filename
    ]
    name = task.name.rsplit(".", 1)[-1]
    if name.startswith("tokenrelay "):
        name = "run producer (Relay._drive)"
    return f"{name} @ {' < '.join(reversed(frames[-2:])) if frames else '?'}"


async def main(streams: int, rounds: int) -> None:
    python = sys.executable
    counter = StepCounter()
    trio.lowlevel.add_instrument(counter)
    async with trio.open_nursery() as nursery:
        fake_process: trio.Process = await nursery.start(
            partial(
                trio.run_process,
                [python, "-m", "benchmarks._fake"],
                stdout=subprocess.PIPE,
                check=False,
            )
        )
        assert fake_process.stdout is not None
        fake = (await fake_process.stdout.receive_some()).decode().split()[0]
        app = create_app(ServerConfig(upstream=f"ollama={fake}", db=":memory:", max_runs=5000))
        config = Config()
        config.bind = ["127.0.0.1:0"]
        config.accesslog = None
        config.backlog = 2048
        use_direct_writes()  # as tokenrelay.server.serve does
        binds = await nursery.start(partial(hypercorn.trio.serve, app, config))
        url = binds[0]
        tokens = 0
        for i in range(rounds + 1):
            counter.counting = i > 0  # the first round warms up
            result = await trio.run_process(
                [python, "-m", "benchmarks.load", url, "--streams", str(streams)],
                capture_stdout=True,
            )
            if i > 0:
                tokens += json.loads(result.stdout)[0]["tokens"]
        counter.counting = False
        total = sum(counter.steps.values())
        print(f"{streams} streams x {rounds} rounds: {tokens} tokens, {total} task steps")
        print(f"steps per token: {total / tokens:.2f}")
        for kind, count in counter.steps.most_common(15):
            print(f"  {count / tokens:6.3f}  {kind}")
        nursery.cancel_scope.cancel()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    trio.run(main, args.streams, args.rounds)
