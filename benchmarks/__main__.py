"""Run the benchmarks: ``python -m benchmarks [--quick] [--json PATH]``.

Every comparison runs side by side in this one invocation, on this machine: tokenrelay
against the reference-style asyncio design (and raw trio memory channels for fan-out), and
``tokenrelay serve`` keeping its sessions in a SQLite file against keeping nothing. The
table shows medians and p99 over repeated trials, and each row's median as a ratio to the
first row of its benchmark. Nothing here asserts a time.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

import trio

from . import cluster, encoding, fanout, latency, memory, soak, store, throughput
from ._stats import Result, table


def machine() -> dict[str, Any]:
    model = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cores": os.cpu_count(),
        "cpu": model,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }


async def worker(*args: str) -> Any:
    """Run a baseline worker process; it prints one JSON value."""
    result = await trio.run_process(
        [sys.executable, "-m", "benchmarks.baselines.reference", *args],
        capture_stdout=True,
    )
    return json.loads(result.stdout)


async def run(quick: bool) -> list[Result]:
    results: list[Result] = []
    stop_trials, supersede_trials = (10, 5) if quick else (100, 50)
    deliveries = 20_000 if quick else 400_000  # per trial, whatever the fan-out
    fanout_sizes = (1, 10, 100) if quick else (1, 10, 100, 1000)
    fanout_repeats = 1 if quick else 5
    sessions = 1_000 if quick else 10_000

    fake = await trio.lowlevel.open_process(
        [sys.executable, "-m", "benchmarks._fake"], stdout=subprocess.PIPE
    )
    try:
        assert fake.stdout is not None
        url = (await fake.stdout.receive_some()).decode().strip().splitlines()[0]
        print(f"fake model server at {url}", file=sys.stderr)

        for phase in ("prefill", "stream"):
            bench = f"stop -> upstream closed ({phase})"
            print(f"{bench} ...", file=sys.stderr)
            ours = await latency.measure_stop(url, phase, stop_trials, 10)
            ref = await worker(
                "stop",
                "--url",
                url,
                "--phase",
                phase,
                "--trials",
                str(stop_trials),
                "--batch",
                "10",
            )
            results.append(Result(bench, "tokenrelay (trio)", "s", ours, "p99 <= 2 ms"))
            results.append(
                Result(bench, "reference-style asyncio", "s", ref, "ours >= 100x faster")
            )

        bench = "supersede -> new request sent"
        print(f"{bench} ...", file=sys.stderr)
        ours, our_overlaps = await latency.measure_supersede(url, supersede_trials)
        ref = await worker("supersede", "--url", url, "--trials", str(supersede_trials))
        results.append(Result(bench, "tokenrelay (trio)", "s", ours, "p99 <= 10 ms"))
        results.append(Result(bench, "reference-style asyncio", "s", ref["latencies"]))
        bench = "supersede: old one still open"
        results.append(Result(bench, "tokenrelay (trio)", "times", [our_overlaps], "0"))
        results.append(Result(bench, "reference-style asyncio", "times", [ref["overlaps"]]))

        runs = 500 if quick else 10_000
        print(f"soak, {runs:,} runs ...", file=sys.stderr)
        report = await soak.run(url, runs)
        print(f"soak: {json.dumps(report)}", file=sys.stderr)
        bench = f"soak, {runs:,} runs"
        results.append(Result(bench, "runs/s", "/s", [report["runs"] / report["elapsed"]]))
        for key, goal in (
            ("leaked_tasks", "0"),
            ("sessions_left", "0"),
            ("active_upstream_connections", "0"),
            ("requests_still_open_upstream", "0"),
        ):
            results.append(Result(bench, key.replace("_", " "), "", [report[key]], goal))
        results.append(
            Result(bench, "RSS growth after warm-up", "%", [100 * report["rss_growth"]], "<= 5%")
        )
    finally:
        fake.kill()
        await fake.wait()

    for size in fanout_sizes:
        fanout_events = max(100, deliveries // size)
        bench = f"fan-out to {size} subscriber(s)"
        print(f"{bench} ...", file=sys.stderr)
        raw, batched, single, ref = [], [], [], []
        for _ in range(fanout_repeats):
            raw.append(await fanout.raw_fanout(size, fanout_events))
            batched.append(await fanout.relay_fanout(size, fanout_events, batched=True))
            single.append(await fanout.relay_fanout(size, fanout_events, batched=False))
            ref += await worker(
                "fanout", "--subscribers", str(size), "--events", str(fanout_events)
            )
        results.append(Result(bench, "raw trio memory channels", "/s", raw))
        results.append(Result(bench, "tokenrelay, receive_batch", "/s", batched, ">= 0.7x raw"))
        results.append(Result(bench, "tokenrelay, async for", "/s", single, ">= 0.7x raw"))
        results.append(Result(bench, "asyncio.Queue per subscriber", "/s", ref))

    results += await throughput.run(quick)
    results += await cluster.run(quick)

    print("SQLite store ...", file=sys.stderr)
    stored_runs = 20 if quick else 200
    bench = "SQLite file per 1,000-token run"
    results.append(
        Result(bench, "its events (open_relay)", "B", [await store.bytes_per_run(stored_runs)])
    )
    results.append(
        Result(
            bench,
            "+ session, request, outcome",
            "B",
            [await store.bytes_per_run(stored_runs, as_server=True)],
        )
    )
    clean, marked = await store.time_to_mark_interrupted(10_000, 3 if quick else 7)
    bench = "open a SQLite file of 10,000 runs"
    results.append(Result(bench, "none left open", "s", clean))
    results.append(Result(bench, "all left open, then marked", "s", marked))
    big, label = (50 << 20, "50 MB") if quick else (1 << 30, "1 GB")
    reopened, size = await store.time_to_reopen(big, 3 if quick else 7)
    bench = f"reopen a {label} SQLite file"
    results.append(Result(bench, "100 runs left open", "s", reopened))
    results.append(Result(bench, "its size", "B", [size]))

    print("event encoding ...", file=sys.stderr)
    timings, sizes = [], []
    for _ in range(3 if quick else 7):
        seconds, size = encoding.text_path(20_000 if quick else 200_000)
        timings.append(seconds)
        sizes.append(size)
    bench = "a text token, upstream line to SSE chunk"
    results.append(Result(bench, "CPU per token", "s", timings))
    results.append(Result(bench, "bytes its event holds in the log", "B", sizes))

    print("memory ...", file=sys.stderr)
    per_run = await memory.bytes_per_retained_run()
    results.append(
        Result("retained run of 1,000 tokens", "tokenrelay", "B", [per_run], "<= 100 KB")
    )
    grown, rss = await memory.rss_for_idle_sessions(sessions)
    results.append(
        Result(f"RSS growth, {sessions:,} idle sessions", "tokenrelay", "B", [grown], "")
    )
    results.append(Result(f"RSS, {sessions:,} idle sessions", "tokenrelay", "B", [rss], "<= 1 GB"))
    events = 20_000 if quick else 200_000
    capped = await memory.stalled_subscriber(events, max_events=1_000)
    uncapped = await memory.stalled_subscriber(events, max_events=None)
    bench = f"stalled reader, {events:,} events"
    results.append(Result(bench, "max_events=1000", "B", [capped], "bounded by the caps"))
    results.append(Result(bench, "no cap", "B", [uncapped]))
    return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a CI-sized run: checks it works")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results here")
    args = parser.parse_args()
    results = trio.run(run, args.quick)
    print(table(results))
    if args.json:
        report = {
            "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            "command": " ".join(["python -m benchmarks", *sys.argv[1:]]),
            "machine": machine(),
            "results": [result.summary() for result in results],
        }
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
