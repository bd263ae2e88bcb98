"""Several relays as one, on Redis: ``tokenrelay serve`` keeping nothing (``--db :memory:``),
keeping everything in a SQLite file (``--db FILE``) and sharing its runs through Redis
(``--db :memory: --redis URL``), side by side at 100 paced streams; the Redis relay's round
trips per token delivered (its own ``tokenrelay_redis_round_trips`` counter, and what Redis
itself counted); ``--workers 2`` against ``--workers 1`` on Redis; and supersede latency
across two relay processes on one Redis.

Every server runs in its own process, against the same paced fake model (``_fake.py``), with
the load generator (``load.py``) in another, and the redis-server this starts on a free port
(keeping nothing on disk) in another: on a 2-core machine, ``--workers 2`` competes for the
same two cores as everything else, and the CPU each process used during its rounds is
reported alongside, to show what limited it.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from typing import Any

import httpx2
import psutil
import trio

from ._stats import Result
from .throughput import _cpu_seconds, _load, _start, relay_command

MEMORY = "serve --db :memory:"
SQLITE = "serve --db FILE"
REDIS = "serve --db :memory: --redis"
ONE = "--redis, --workers 1"
TWO = "--redis, --workers 2"


async def run(quick: bool) -> list[Result]:
    results: list[Result] = []
    repeats = 1 if quick else 3
    trials = 10 if quick else 100
    streams = 20 if quick else 100
    worker_levels = (streams,) if quick else (100, 1000)
    python = sys.executable
    print(f"cluster: load average {_load_average()}", file=sys.stderr)
    # The relays run in a temporary directory and are always told where their database is:
    # none of them may leave a tokenrelay.db (the default --db) in the working directory.
    with tempfile.TemporaryDirectory(prefix="tokenrelay-cluster-") as directory:
        async with trio.open_nursery() as nursery:
            redis_url, redis_port, redis_pid = await _redis(nursery, directory)
            fake, fake_pid = await _start(
                nursery, [python, "-m", "benchmarks._fake"], url_on="stdout"
            )
            serve = relay_command(fake)
            on_redis = [*serve, "--db", ":memory:", "--redis", redis_url]
            starting = {
                MEMORY: [*serve, "--db", ":memory:"],
                SQLITE: [*serve, "--db", os.path.join(directory, "relay.db")],
                REDIS: on_redis,
                TWO: [*on_redis, "--workers", "2"],
                "B": on_redis,  # supersede's second process (the first is REDIS's)
            }
            servers: dict[str, tuple[str, int]] = {}
            async with trio.open_nursery() as starters:  # all at once: each imports for ~1 s
                for name, argv in starting.items():
                    starters.start_soon(_start_into, servers, nursery, name, argv, directory)
            redis = _Redis(redis_port, redis_pid)
            for url, _ in servers.values():  # warm up: code paths, upstream connections
                await _load(url, streams, "first", 1)

            print(f"cluster: {streams} streams, memory / SQLite / Redis ...", file=sys.stderr)
            targets = [(name, *servers[name]) for name in (MEMORY, SQLITE, REDIS)]
            results += await _stores(targets, redis, streams, repeats)

            for level in worker_levels:
                print(f"cluster: {level} streams, --workers 1 / 2 ...", file=sys.stderr)
                pair = [(ONE, *servers[REDIS]), (TWO, *servers[TWO])]
                results += await _workers(pair, level, repeats, fake_pid, redis_pid)

            print("cluster: supersede across workers ...", file=sys.stderr)
            urls = (servers[REDIS][0], servers["B"][0], servers[MEMORY][0])
            results += await _supersede(fake, *urls, trials)
            nursery.cancel_scope.cancel()
    print(f"cluster: load average {_load_average()}", file=sys.stderr)
    return results


# -- processes ---------------------------------------------------------------------------------


def _load_average() -> str:
    return ", ".join(f"{value:.2f}" for value in os.getloadavg())


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


async def _kill(process: trio.Process) -> None:
    process.kill()
    await process.wait()


async def _redis(nursery: trio.Nursery, directory: str) -> tuple[str, int, int]:
    """Start a redis-server on a free port (killed when ``nursery`` is cancelled, keeping
    nothing on disk); return its URL, port and pid once it accepts connections."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed: apt-get install -y redis-server")
    port = _free_port()
    process: trio.Process = await nursery.start(
        partial(
            trio.run_process,
            [
                binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", directory, "--loglevel", "notice",
            ],
            check=False,
            stdout=subprocess.PIPE,
            deliver_cancel=_kill,
        )
    )  # fmt: skip
    assert process.stdout is not None
    seen = b""
    while b"Ready to accept connections" not in seen:
        chunk = await process.stdout.receive_some()
        if not chunk:
            raise RuntimeError(f"redis-server exited:\n{seen.decode(errors='replace')}")
        seen += chunk
    stdout = process.stdout

    async def drain() -> None:  # a full pipe would block it
        while await stdout.receive_some():
            pass

    nursery.start_soon(drain)
    return f"redis://127.0.0.1:{port}/0", port, process.pid


async def _start_into(
    servers: dict[str, tuple[str, int]],
    nursery: trio.Nursery,
    name: str,
    argv: list[str],
    cwd: str,
) -> None:
    servers[name] = await _serve(nursery, argv, cwd)


async def _serve(nursery: trio.Nursery, argv: list[str], cwd: str) -> tuple[str, int]:
    """Start ``tokenrelay serve`` (stopped when ``nursery`` is cancelled) in ``cwd``; return its
    URL and pid once it serves: with ``--workers N``, once each of its N workers has said it
    listens (their stderr is the supervisor's)."""
    workers = int(argv[argv.index("--workers") + 1]) if "--workers" in argv else 1
    return await _start(nursery, argv, url_on="stderr", cwd=cwd, count=workers)


def _process_cpu(pid: int) -> float:
    """CPU seconds of ``pid`` and its children (a supervisor's workers)."""
    process = psutil.Process(pid)
    total = _cpu_seconds(pid)
    for child in process.children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):  # a worker being replaced
            total += _cpu_seconds(child.pid)
    return total


def _machine_busy() -> float:
    """CPU seconds the whole machine has been busy (every core, every process)."""
    times = psutil.cpu_times()
    idle = ("idle", "iowait", "guest", "guest_nice")  # a guest's time is in user's already
    return float(sum(getattr(times, name) for name in times._fields if name not in idle))


def _children_cpu() -> float:
    """CPU seconds of this process's finished children (the load generator's rounds)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


class _Redis:
    """The redis-server: its CPU, its command counts, and a relay's round trip counter."""

    def __init__(self, port: int, pid: int) -> None:
        self.port = port
        self.pid = pid

    async def commandstats(self) -> dict[str, int]:
        """Calls by command, as Redis counts them (the scripts' own commands included)."""
        stream = await trio.open_tcp_stream("127.0.0.1", self.port)
        async with stream:
            await stream.send_all(b"*2\r\n$4\r\nINFO\r\n$12\r\ncommandstats\r\n")
            data = b""
            while True:
                chunk = await stream.receive_some()
                if not chunk:
                    raise RuntimeError(f"redis-server closed the connection: {data!r}")
                data += chunk
                header, _, rest = data.partition(b"\r\n")
                if header.startswith(b"$") and len(rest) >= int(header[1:]):
                    break
        found = re.findall(r"cmdstat_(\S+?):calls=(\d+)", rest.decode())
        return {name: int(calls) for name, calls in found if name != "info"}  # not ours

    @staticmethod
    async def round_trips(client: httpx2.AsyncClient, url: str) -> float:
        """The relay's ``tokenrelay_redis_round_trips`` counter."""
        text = (await client.get(f"{url}/metrics")).text
        found = re.search(r"^tokenrelay_redis_round_trips(?:_total)? (\S+)$", text, re.M)
        if found is None:
            raise RuntimeError(f"no tokenrelay_redis_round_trips in {url}/metrics")
        return float(found.group(1))


# -- 100 paced streams: memory, SQLite, Redis ------------------------------------------------


async def _stores(
    targets: list[tuple[str, str, int]], redis: _Redis, streams: int, repeats: int
) -> list[Result]:
    """``streams`` paced streams through each relay in turn, ``repeats`` times over
    (interleaved); the Redis relay's round trips and Redis's command counts around its
    rounds."""
    rounds: dict[str, list[dict[str, Any]]] = {name: [] for name, _, _ in targets}
    cpu: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    redis_cpu: list[float] = []
    trips = 0.0
    commands: dict[str, int] = {}
    delivered = 0
    async with httpx2.AsyncClient(timeout=30) as client:
        for _ in range(repeats):
            for name, url, pid in targets:
                if name == REDIS:
                    trips_before = await redis.round_trips(client, url)
                    commands_before = await redis.commandstats()
                    redis_before = _cpu_seconds(redis.pid)
                before = _cpu_seconds(pid)
                (one,) = await _load(url, streams, "paced", 1)
                cpu[name].append((_cpu_seconds(pid) - before) / max(1, one["tokens"]))
                rounds[name].append(one)
                if name == REDIS:
                    # The last runs' endings are written just after their clients saw [DONE].
                    await trio.sleep(0.5)
                    redis_cpu.append((_cpu_seconds(redis.pid) - redis_before) / one["tokens"])
                    trips += await redis.round_trips(client, url) - trips_before
                    for command, calls in (await redis.commandstats()).items():
                        commands[command] = (
                            commands.get(command, 0) + calls - commands_before.get(command, 0)
                        )
                    delivered += one["tokens"]
    bench = f"cluster, {streams} streams"
    rates, delays, per_token = {}, {}, {}
    for name, _, _ in targets:
        done = rounds[name]
        rates[name] = Result(f"{bench}: tokens/s", name, "/s", [r["tokens_per_s"] for r in done])
        delays[name] = Result(
            f"{bench}: token delay", name, "s", [d for r in done for d in r["delays"]]
        )
        per_token[name] = Result(f"{bench}: CPU per token", name, "s", cpu[name])
    rows = [*rates.values()]
    rows += [
        Result(f"{bench}: streams failed", name, "", [_failed(rounds[name], streams)], "0")
        for name, _, _ in targets
    ]
    for name, label, goal in (
        (SQLITE, "--db FILE / :memory:", ">= 0.9x memory"),
        (REDIS, "--redis / :memory:", ""),
    ):
        rows.append(
            Result(
                f"{bench}: tokens/s", label, "x", [rates[name].median / rates[MEMORY].median], goal
            )
        )
    rows += delays.values()
    for name, label in ((SQLITE, "median, FILE - :memory:"), (REDIS, "median, --redis - :memory:")):
        rows.append(
            Result(
                f"{bench}: delay added",
                label,
                "s",
                [delays[name].median - delays[MEMORY].median],
                "<= 1 ms",
            )
        )
    rows += per_token.values()
    rows.append(Result(f"{bench}: CPU per token", "redis-server, for --redis", "s", redis_cpu))
    for name, label in ((SQLITE, "--db FILE / :memory:"), (REDIS, "--redis / :memory:")):
        rows.append(
            Result(
                f"{bench}: CPU per token",
                label,
                "x",
                [per_token[name].median / per_token[MEMORY].median],
            )
        )
    per = max(1, delivered)
    shown = ", ".join(f"{name} {calls / per:.3f}" for name, calls in sorted(commands.items()))
    print(f"cluster: Redis's commands per token: {shown}", file=sys.stderr)
    bench = "cluster: Redis round trips per token"
    rows.append(Result(bench, "relay: redis_round_trips", "", [trips / per], "<= 0.1 (batched)"))
    # What Redis counted: every command, those its scripts ran included (an XADD per token,
    # whatever the batching), and the script calls alone (a pipeline of them is one trip).
    rows.append(Result(bench, "Redis: commandstats calls", "", [sum(commands.values()) / per]))
    scripts = sum(calls for command, calls in commands.items() if command.startswith("eval"))
    rows.append(Result(bench, "Redis: EVALSHA calls", "", [scripts / per]))
    # Round trips the relay's counter misses: coredis sends SCRIPT EXISTS, and waits for its
    # answer, before every pipeline holding a script (each batch of appends, each renewal),
    # and HELLO on every new connection.
    missed = commands.get("script|exists", 0) + commands.get("hello", 0)
    rows.append(
        Result(bench, "counted + SCRIPT EXISTS, HELLO", "", [(trips + missed) / per], "<= 0.1")
    )
    return rows


def _failed(rounds: list[dict[str, Any]], streams: int) -> int:
    """Streams of these rounds that got no token (an error status, or a connection lost)."""
    return sum(streams - len(one["ttfts"]) for one in rounds)


# -- --workers 2 against --workers 1 -----------------------------------------------------------


async def _workers(
    pair: list[tuple[str, str, int]], streams: int, repeats: int, fake_pid: int, redis_pid: int
) -> list[Result]:
    """``streams`` paced streams through one worker and through two, interleaved; and the
    cores each process kept busy meanwhile (what the two workers had to share)."""
    rates: dict[str, list[float]] = {name: [] for name, _, _ in pair}
    delays: dict[str, list[float]] = {name: [] for name, _, _ in pair}
    busy: dict[str, dict[str, list[float]]] = {name: {} for name, _, _ in pair}
    failed: dict[str, list[float]] = {name: [] for name, _, _ in pair}
    for _ in range(repeats):
        for name, url, pid in pair:
            pids = {"relay": pid, "fake model": fake_pid, "redis-server": redis_pid}
            before = {what: _process_cpu(p) for what, p in pids.items()}
            load_before = _children_cpu()
            machine_before = _machine_busy()
            started = time.monotonic()
            (one,) = await _load(url, streams, "paced", 1)
            elapsed = time.monotonic() - started
            used = {what: _process_cpu(p) - before[what] for what, p in pids.items()}
            used["load generator"] = _children_cpu() - load_before
            used["these four"] = sum(used.values())
            # Every process on the machine, this benchmark's and the other tenants' alike.
            used["whole machine"] = _machine_busy() - machine_before
            for what, seconds in used.items():
                busy[name].setdefault(what, []).append(round(seconds / elapsed, 2))
            rates[name].append(one["tokens_per_s"])
            failed[name].append(_failed([one], streams))
            delays[name] += one["delays"]
    bench = f"workers, {streams} streams"
    rows = [Result(f"{bench}: tokens/s", name, "/s", rates[name]) for name, _, _ in pair]
    ratio = statistics.median(rates[TWO]) / statistics.median(rates[ONE])
    rows.append(
        Result(
            f"{bench}: tokens/s",
            "--workers 2 / 1",
            "x",
            [ratio],
            "none: the 2 cores are shared with the load generator, model, Redis (and the "
            "machine's other tenants); see the cores busy rows",
        )
    )
    rows += [
        Result(f"{bench}: streams failed", name, "", [sum(failed[name])], "0")
        for name, _, _ in pair
    ]
    rows += [Result(f"{bench}: token delay", name, "s", delays[name]) for name, _, _ in pair]
    for name, _, _ in pair:
        for what, shares in busy[name].items():
            rows.append(Result(f"{bench}: cores busy, {name[-11:]}", what, "cores", shares))
    return rows


# -- supersede across workers ------------------------------------------------------------------


async def _supersede(
    fake: str, url_a: str, url_b: str, url_memory: str, trials: int
) -> list[Result]:
    """A run streams on A; a new prompt for its session is sent to B: from the client sending
    it to the model server receiving B's upstream request (on the clock every process shares),
    and whether A's upstream request was still open then; split at A's upstream closing. For
    comparison, interleaved (the machine's mood shows in all alike): the new prompt sent to A
    itself, and the same through a relay without Redis."""
    cases = {CROSS: (url_a, url_b), SAME: (url_a, url_a), ALONE: (url_memory, url_memory)}
    latencies: dict[str, list[float]] = {name: [] for name in cases}
    to_close: list[float] = []
    overlaps = dict.fromkeys(cases, 0)
    async with httpx2.AsyncClient(timeout=30) as client:
        for i in range(-1, trials):  # the first, untimed: connections and code paths warm up
            for name, (first, second) in cases.items():
                session = f"cluster-{i}-{random.randrange(1 << 32):08x}"
                a, b = f"{session}-a", f"{session}-b"
                await _tokens(client, first, session, "stream", a, 3)  # hangs up: it goes on
                await trio.sleep(random.random() * 0.02)
                sent = time.monotonic()
                await _tokens(client, second, session, "quick", b, None)
                record_b = (await client.get(f"{fake}/_fake/closed", params={"marker": b})).json()
                record_a = (await client.get(f"{fake}/_fake/closed", params={"marker": a})).json()
                if i < 0:
                    continue
                overlaps[name] += record_a["closed"] > record_b["received"]
                latencies[name].append(record_b["received"] - sent)
                if name == CROSS:
                    to_close.append(record_a["closed"] - sent)
    bench = "supersede across workers"
    return [
        Result(f"{bench} -> new request", CROSS, "s", latencies[CROSS], "p99 <= 20 ms"),
        Result(f"{bench} -> new request", SAME, "s", latencies[SAME]),
        Result(f"{bench} -> new request", ALONE, "s", latencies[ALONE]),
        Result(f"{bench}: of which", "A's upstream closed", "s", to_close),
        Result(
            f"{bench}: of which",
            "then B's request arrived",
            "s",
            [total - closed for total, closed in zip(latencies[CROSS], to_close, strict=True)],
        ),
        *(
            Result(f"{bench}: old still open", name, "times", [overlaps[name]], "0")
            for name in cases
        ),
    ]


CROSS = "run on A, prompt to B"
SAME = "run on A, prompt to A"
ALONE = "no Redis, one process"


async def _tokens(
    client: httpx2.AsyncClient, url: str, session: str, model: str, marker: str, count: int | None
) -> None:
    """A streaming chat request in ``session``: read ``count`` content chunks (all of it for
    ``None``), then hang up."""
    body = {"model": model, "stream": True, "messages": [{"role": "user", "content": marker}]}
    async with client.stream(
        "POST", f"{url}/v1/chat/completions", json=body, headers={"X-Session-Id": session}
    ) as response:
        if response.status_code != 200:
            await response.aread()
            raise RuntimeError(f"{url}: {response.status_code} {response.text}")
        seen = 0
        async for line in response.aiter_lines():
            if line == "data: [DONE]":
                return
            if line.startswith("data: ") and '"content"' in line:
                seen += 1
                if count is not None and seen >= count:
                    return
