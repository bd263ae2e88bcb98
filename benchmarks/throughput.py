"""Time to first token and streaming throughput: the fake model directly, through
``tokenrelay serve``, and through a FastAPI + sse-starlette proxy, each in its own process,
driven by the load generator in another."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from functools import partial
from typing import Any

import psutil
import trio

from ._stats import Result


async def _start(nursery: trio.Nursery, argv: list[str], *, url_on: str) -> tuple[str, int]:
    """Start a server process (killed when ``nursery`` is cancelled); return its URL, which it
    prints first on stdout, or in tokenrelay's startup line on stderr, and its pid."""
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            check=False,
            stdout=subprocess.PIPE if url_on == "stdout" else subprocess.DEVNULL,
            stderr=subprocess.PIPE if url_on == "stderr" else None,
        )
    )
    stream = process.stdout if url_on == "stdout" else process.stderr
    assert stream is not None
    seen = b""
    pattern = (
        rb"(http://127\.0\.0\.1:\d+)" if url_on == "stdout" else rb"listening on (http://\S+),"
    )
    while (found := re.search(pattern, seen)) is None:
        chunk = await stream.receive_some()
        if not chunk:
            raise RuntimeError(f"{argv} exited:\n{seen.decode(errors='replace')}")
        seen += chunk

    async def drain() -> None:  # a full pipe would block the server
        while await stream.receive_some():
            pass

    nursery.start_soon(drain)
    return found.group(1).decode(), process.pid


def _cpu_seconds(pid: int) -> float:
    times = psutil.Process(pid).cpu_times()
    return float(times.user + times.system)


async def _load(url: str, streams: int, model: str, repeat: int) -> list[dict[str, Any]]:
    result = await trio.run_process(
        [
            sys.executable,
            "-m",
            "benchmarks.load",
            url,
            "--streams",
            str(streams),
            "--model",
            model,
            "--repeat",
            str(repeat),
        ],
        capture_stdout=True,
    )
    return list(json.loads(result.stdout))


async def run(quick: bool) -> list[Result]:
    results: list[Result] = []
    levels = (1, 20) if quick else (1, 100, 1000)
    repeats = 1 if quick else 3
    ttft_rounds = 10 if quick else 100
    python = sys.executable
    async with trio.open_nursery() as nursery:
        fake, fake_pid = await _start(nursery, [python, "-m", "benchmarks._fake"], url_on="stdout")
        relay, relay_pid = await _start(
            nursery,
            [
                python,
                "-m",
                "tokenrelay",
                "serve",
                "--port",
                "0",
                "--upstream",
                f"ollama={fake}",
                "--max-runs",
                "5000",
                "--upstream-connections",
                "2000",
            ],
            url_on="stderr",
        )
        proxy, proxy_pid = await _start(
            nursery, [python, "-m", "benchmarks.baselines.fastapi_proxy", fake], url_on="stdout"
        )
        # The CPU a server process spends per token it delivers (the fake model's own, for
        # the direct row): the measure least disturbed by the other processes on the machine.
        targets = [
            ("the fake model, directly", fake, fake_pid),
            ("tokenrelay serve", relay, relay_pid),
            ("FastAPI + sse-starlette proxy", proxy, proxy_pid),
        ]
        print("time to first token ...", file=sys.stderr)
        per_request = []
        for name, url, pid in targets:
            before = _cpu_seconds(pid)
            rounds = await _load(url, 1, "first", ttft_rounds)
            used = _cpu_seconds(pid) - before
            results.append(
                Result("time to first token", name, "s", [t for r in rounds for t in r["ttfts"]])
            )
            per_request.append(Result("CPU per 1-token request", name, "s", [used / len(rounds)]))
        results += per_request
        for streams in levels:
            print(f"{streams} streams ...", file=sys.stderr)
            rates, delays, cpu = [], [], []
            bench = f"{streams} streams x 50 tok/s"
            for name, url, pid in targets:
                rounds, cpu_per_token = [], []
                for _ in range(repeats):
                    before = _cpu_seconds(pid)
                    (one,) = await _load(url, streams, "paced", 1)
                    cpu_per_token.append((_cpu_seconds(pid) - before) / max(1, one["tokens"]))
                    rounds.append(one)
                rates.append(
                    Result(f"{bench}: tokens/s", name, "/s", [r["tokens_per_s"] for r in rounds])
                )
                delays.append(
                    Result(
                        f"{bench}: token delay", name, "s", [d for r in rounds for d in r["delays"]]
                    )
                )
                if streams > 1:  # one stream's few tokens are below the CPU clock's tick
                    cpu.append(Result(f"{bench}: CPU per token", name, "s", cpu_per_token))
            results += rates + delays + cpu
        nursery.cancel_scope.cancel()
    return results
