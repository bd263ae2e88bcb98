"""Only the 100-stream round of ``throughput.py`` (and its time to first token), for iterating
on the hot path: the fake model directly, ``tokenrelay serve --db :memory:``, the FastAPI
proxy and the serving floor, each in its own process, the rounds interleaved, ``--repeats``
times over. ``--before DIR`` adds a second relay run from the ``src`` directory of another
checkout (``git worktree add DIR main``, say): before and after, side by side.

``--yardsticks`` adds the two proxies on the relay's own stack to the time to first token
(``baselines/trio_proxy.py``, plain and ``--lean``).

Run: ``python -m benchmarks.hundred [--repeats 5] [--streams 100] [--before DIR]
[--yardsticks]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from functools import partial

import trio

from ._stats import Result, table
from .throughput import (
    FLOOR,
    MEMORY,
    PROXY,
    _first_token,
    _paced,
    _start,
    relay_command,
    start_yardsticks,
)

BEFORE = "tokenrelay serve (--before)"


async def run(
    repeats: int,
    streams: int,
    ttft_rounds: int,
    before: str | None,
    *,
    yardsticks: bool = False,
) -> list[Result]:
    """``before``: the ``src`` directory of the relay to run as the before row."""
    python = sys.executable
    results: list[Result] = []
    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-") as directory:
        async with trio.open_nursery() as nursery:
            fake, fake_pid = await _start(
                nursery, [python, "-m", "benchmarks._fake"], url_on="stdout"
            )
            serve = [*relay_command(fake), "--db", ":memory:"]
            memory, memory_pid = await _start(nursery, serve, url_on="stderr", cwd=directory)
            targets = [("the fake model, directly", fake, fake_pid), (MEMORY, memory, memory_pid)]
            if before is not None:
                env = {**os.environ, "PYTHONPATH": before}
                old, old_pid = await _start(nursery, serve, url_on="stderr", cwd=directory, env=env)
                targets.append((BEFORE, old, old_pid))
            proxy, proxy_pid = await _start(
                nursery,
                [python, "-m", "benchmarks.baselines.fastapi_proxy", fake],
                url_on="stdout",
            )
            floor, floor_pid = await _start(
                nursery, [python, "-m", "benchmarks.floor"], url_on="stdout"
            )
            targets += [(PROXY, proxy, proxy_pid), (FLOOR, floor, floor_pid)]
            extra = await start_yardsticks(nursery, fake) if yardsticks else []
            if ttft_rounds:
                results += await _first_token([*targets, *extra], ttft_rounds)
            results += await _paced(targets, streams, repeats)
            nursery.cancel_scope.cancel()
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--streams", type=int, default=100)
    parser.add_argument("--ttft-rounds", type=int, default=100)
    parser.add_argument("--before", help="a checkout (or its src/) run as a second relay")
    parser.add_argument("--yardsticks", action="store_true", help="the proxies on our stack")
    args = parser.parse_args()
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"before: {load}", file=sys.stderr)
    before = None
    if args.before is not None:
        # The checkout, or its src directory; never a path without the package (the "before"
        # relay would then import this checkout's tokenrelay, silently).
        root = os.path.abspath(args.before)
        before = root if os.path.basename(root) == "src" else os.path.join(root, "src")
        if not os.path.isfile(os.path.join(before, "tokenrelay", "__init__.py")):
            parser.error(f"--before {args.before}: no src/tokenrelay there")
    results = trio.run(
        partial(run, yardsticks=args.yardsticks),
        args.repeats,
        args.streams,
        args.ttft_rounds,
        before,
    )
    print(table(results))
    load = subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    print(f"after: {load}")


if __name__ == "__main__":
    main()
