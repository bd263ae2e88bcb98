"""Time to first token and streaming throughput: the fake model directly, through
``tokenrelay serve`` (keeping nothing, ``--db :memory:``, and keeping everything in a SQLite
file, ``--db FILE``), and through a FastAPI + sse-starlette proxy, each in its own process,
driven by the load generator in another. The SQLite relay's cost is also given against the
memory-only one's, from the same rounds: its tokens/s and CPU per token as ratios, and its
added token delay (its median and p99 minus the memory-only relay's)."""

from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
from functools import partial
from typing import Any

import psutil
import trio

from ._stats import Result


def relay_command(fake: str) -> list[str]:
    """``tokenrelay serve`` in front of the fake model at ``fake``, on any free port, with room
    for every stream a benchmark opens (give it ``--db`` too)."""
    return [
        sys.executable, "-m", "tokenrelay", "serve", "--port", "0",
        "--upstream", f"ollama={fake}",
        "--max-runs", "5000", "--upstream-connections", "2000",
    ]  # fmt: skip


async def _start(
    nursery: trio.Nursery,
    argv: list[str],
    *,
    url_on: str,
    cwd: str | None = None,
    env: dict[str, str] | None = None,
    count: int = 1,
) -> tuple[str, int]:
    """Start a server process (killed when ``nursery`` is cancelled) in ``cwd``; return its
    URL, which it prints first on stdout, or in tokenrelay's startup line on stderr, and its
    pid. ``count``: wait for that many startup lines (``tokenrelay serve --workers N``: one
    from each worker, on the supervisor's stderr)."""
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            argv,
            check=False,
            cwd=cwd,
            env=env,
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
    while len(found := re.findall(pattern, seen)) < count:
        chunk = await stream.receive_some()
        if not chunk:
            raise RuntimeError(f"{argv} exited:\n{seen.decode(errors='replace')}")
        seen += chunk

    async def drain() -> None:  # a full pipe would block the server
        while await stream.receive_some():
            pass

    nursery.start_soon(drain)
    return found[0].decode(), process.pid


async def start_yardsticks(nursery: trio.Nursery, fake: str) -> list[tuple[str, str, int]]:
    """The two proxies on the relay's own stack (``baselines/trio_proxy.py``) in front of the
    fake model at ``fake``, plain and lean: their rows' names, URLs and pids."""
    started = []
    for name, flags in ((PLAIN, []), (LEAN, ["--lean"])):
        argv = [sys.executable, "-m", "benchmarks.baselines.trio_proxy", fake, *flags]
        url, pid = await _start(nursery, argv, url_on="stdout")
        started.append((name, url, pid))
    return started


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
    # The relays run in a temporary directory, and are always told where their database is:
    # none of them may leave a tokenrelay.db (the default --db) in the working directory.
    with tempfile.TemporaryDirectory(prefix="tokenrelay-bench-") as directory:
        async with trio.open_nursery() as nursery:
            fake, fake_pid = await _start(
                nursery, [python, "-m", "benchmarks._fake"], url_on="stdout"
            )
            serve = relay_command(fake)
            memory, memory_pid = await _start(
                nursery, [*serve, "--db", ":memory:"], url_on="stderr", cwd=directory
            )
            db = os.path.join(directory, "relay.db")
            sqlite, sqlite_pid = await _start(
                nursery, [*serve, "--db", db], url_on="stderr", cwd=directory
            )
            proxy, proxy_pid = await _start(
                nursery,
                [python, "-m", "benchmarks.baselines.fastapi_proxy", fake],
                url_on="stdout",
            )
            floor, floor_pid = await _start(
                nursery, [python, "-m", "benchmarks.floor"], url_on="stdout"
            )
            # Time to first token only: where the relay's own share goes (see _own_share).
            yardsticks = await start_yardsticks(nursery, fake)
            # The CPU a server process spends per token it delivers (the fake model's own, for
            # the direct row): the measure least disturbed by the other processes on the machine.
            targets = [
                ("the fake model, directly", fake, fake_pid),
                (MEMORY, memory, memory_pid),
                (SQLITE, sqlite, sqlite_pid),
                (PROXY, proxy, proxy_pid),
                (FLOOR, floor, floor_pid),
            ]
            results += await _first_token([*targets, *yardsticks], ttft_rounds)
            for streams in levels:
                print(f"{streams} streams ...", file=sys.stderr)
                # At 100 streams the relay and the proxy are closest: more rounds there.
                times = 5 if streams == 100 else repeats
                results += await _paced(targets, streams, times)
            nursery.cancel_scope.cancel()
    return results


MEMORY = "tokenrelay serve --db :memory:"
PROXY = "FastAPI + sse-starlette proxy"
#: The bare server stack, writing the same events with no upstream (``benchmarks/floor.py``).
FLOOR = "floor: bare hypercorn + quart-trio"
#: The FastAPI proxy's code on the relay's server stack, plain, and with the relay's shortcuts
#: (``benchmarks/baselines/trio_proxy.py``): time to first token only.
PLAIN = "plain proxy on quart-trio + hypercorn + httpx2"
LEAN = "lean proxy: the relay's client and writes, no relay"
SQLITE = "tokenrelay serve --db FILE"
RATIO = "--db FILE / :memory:"
PAIRED_TTFT = "time to first token: relay / proxy"
OWN_SHARE = "time to first token: own share"


async def _first_token(
    targets: list[tuple[str, str, int]], rounds: int, blocks: int = 10
) -> list[Result]:
    """``rounds`` sequential 1-token requests to each target, in ``blocks`` blocks taken in
    turn (interleaved, so that the machine's mood drifts over all of them alike)."""
    print("time to first token ...", file=sys.stderr)
    ttfts: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    used: dict[str, float] = dict.fromkeys(ttfts, 0.0)
    done: dict[str, int] = dict.fromkeys(ttfts, 0)
    #: Each block's median time to first token, by target.
    block_ttfts: list[dict[str, float]] = []
    for block in range(blocks):
        size = rounds // blocks + (block < rounds % blocks)
        medians = {}
        for name, url, pid in targets:
            before = _cpu_seconds(pid)
            loads = await _load(url, 1, "first", size)
            used[name] += _cpu_seconds(pid) - before
            done[name] += len(loads)
            ttfts[name] += (these := [t for r in loads for t in r["ttfts"]])
            if these:
                medians[name] = statistics.median(these)
        block_ttfts.append(medians)
    ttft = [Result("time to first token", name, "s", ttfts[name]) for name, _, _ in targets]
    per_request = [
        Result("CPU per 1-token request", name, "s", [used[name] / max(1, done[name])])
        for name, _, _ in targets
    ]
    return ttft + per_request + _own_share(block_ttfts)


def _own_share(blocks: list[dict[str, float]]) -> list[Result]:
    """Paired, block by block (the targets of one block ran one after another, in the same
    mood of the machine): the relay's time to first token over the proxy's, and its own share
    over the serving floor (what it adds over the model's own time to first token, less what
    the floor adds over a client's bare request, which is what being a server costs); and the
    same share of the two proxies written for the relay's stack (``baselines/trio_proxy.py``):
    plain, what the stack costs a proxy before anything is done about it; lean, what is left
    of the relay's share without the relay (so the relay's share less the lean proxy's is
    what the relay's own features cost on the way to the first token)."""
    direct = "the fake model, directly"
    ratio = [b[MEMORY] / b[PROXY] for b in blocks if MEMORY in b and PROXY in b]
    share = {
        name: [b[name] - b[direct] - b[FLOOR] for b in blocks if {name, direct, FLOOR} <= b.keys()]
        for name in (MEMORY, PROXY, PLAIN, LEAN)
    }
    rows = []
    if ratio:
        rows.append(Result(PAIRED_TTFT, "relay / proxy, block by block", "x", ratio, "<= 1x"))
    for name, goal in ((MEMORY, "<= 1 ms"), (PROXY, ""), (PLAIN, ""), (LEAN, "")):
        if share[name]:
            rows.append(Result(OWN_SHARE, name, "s", share[name], goal))
    return rows


def _paired(
    bench: str, rounds: dict[str, list[dict[str, Any]]], cpu_per_token: dict[str, list[float]]
) -> list[Result]:
    """The relay against the proxy, round by round (each pair ran one after the other):
    tokens/s, CPU per token and median token delay as ratios, whose median is steadier than
    the ratio of two medians when the machine's speed drifts over a run."""
    if MEMORY not in rounds or PROXY not in rounds:
        return []
    pairs = list(zip(rounds[MEMORY], rounds[PROXY], strict=True))
    rows = [
        Result(
            f"{bench}: relay / proxy",
            "tokens/s, round by round",
            "x",
            [ours["tokens_per_s"] / theirs["tokens_per_s"] for ours, theirs in pairs],
            ">= 1x",
        ),
        Result(
            f"{bench}: relay / proxy",
            "median delay, round by round",
            "x",
            [
                statistics.median(ours["delays"]) / statistics.median(theirs["delays"])
                for ours, theirs in pairs
                if ours["delays"] and theirs["delays"]
            ],
            "<= 1x",
        ),
    ]
    if cpu_per_token.get(MEMORY) and cpu_per_token.get(PROXY):
        cpu = zip(cpu_per_token[MEMORY], cpu_per_token[PROXY], strict=True)
        rows.append(
            Result(
                f"{bench}: relay / proxy",
                "CPU per token, round by round",
                "x",
                [ours / theirs for ours, theirs in cpu],
                "<= 1x",
            )
        )
    return rows


async def _paced(targets: list[tuple[str, str, int]], streams: int, repeats: int) -> list[Result]:
    """``streams`` paced streams at once through each target in turn, ``repeats`` times over
    (interleaved, so that the machine's mood drifts over all of them alike)."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
    cpu_per_token: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    for _ in range(repeats):
        for name, url, pid in targets:
            before = _cpu_seconds(pid)
            (one,) = await _load(url, streams, "paced", 1)
            cpu_per_token[name].append((_cpu_seconds(pid) - before) / max(1, one["tokens"]))
            rounds[name].append(one)
    bench = f"{streams} streams x 50 tok/s"
    rates, delays, cpu = {}, {}, {}
    for name, _, _ in targets:
        done = rounds[name]
        rates[name] = Result(f"{bench}: tokens/s", name, "/s", [r["tokens_per_s"] for r in done])
        delays[name] = Result(
            f"{bench}: token delay", name, "s", [d for r in done for d in r["delays"]]
        )
        if streams > 1:  # one stream's few tokens are below the CPU clock's tick
            cpu[name] = Result(f"{bench}: CPU per token", name, "s", cpu_per_token[name])
    # The store's cost: the SQLite relay against the memory-only one, from the rows above.
    store = SQLITE in rates and MEMORY in rates
    rows = [*rates.values()]
    if store:
        rows.append(
            Result(
                f"{bench}: tokens/s",
                RATIO,
                "x",
                [rates[SQLITE].median / rates[MEMORY].median],
                "SQLite >= 0.9x memory",
            )
        )
    rows += delays.values()
    if store:
        rows.append(
            Result(
                f"{bench}: delay FILE adds",
                "median, FILE - :memory:",
                "s",
                [delays[SQLITE].median - delays[MEMORY].median],
                "median added delay <= 1 ms",
            )
        )
    if cpu:
        rows += cpu.values()
        if store:
            rows.append(
                Result(
                    f"{bench}: CPU per token", RATIO, "x", [cpu[SQLITE].median / cpu[MEMORY].median]
                )
            )
    return rows + _paired(bench, rounds, cpu_per_token if streams > 1 else {})
