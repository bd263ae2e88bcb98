"""What the SQLite store costs on disk and at start-up, in one process: the bytes a finished
1,000-token run leaves in the file, the time to open a file in which 10,000 runs were left
unfinished (a crash's leftovers, each then marked interrupted), and the time to reopen a big
file. Every file lives in a temporary directory, deleted afterwards.

(Its cost while streaming, ``tokenrelay serve --db FILE`` against ``--db :memory:``, is
measured in ``throughput.py``.)
"""

from __future__ import annotations

import json
import os
import sqlite3
import tempfile
import time
from collections.abc import Iterator
from contextlib import closing

import tokenrelay
from tokenrelay import Emit, Event, Run
from tokenrelay.server._service import outcome
from tokenrelay.stores import SQLiteStore, open_sqlite_store
from tokenrelay.upstreams._codec import encode_text

WORDS = ["the", " model", " answers", " in", " tokens", " of", " a", " few", " bytes", " each"]
PROMPT = "Tell me about relaying tokens."
#: What ``tokenrelay serve`` records of a request besides its prompt.
REQUEST = {
    "model": "llama",
    "stream": True,
    "messages": [{"role": "user", "content": PROMPT}],
}


def _temporary() -> tempfile.TemporaryDirectory[str]:
    return tempfile.TemporaryDirectory(prefix="tokenrelay-bench-")


def _file_size(path: str) -> int:
    """The database's size once its write-ahead log is checkpointed into it (the store must
    be closed)."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    wal = path + "-wal"
    return os.path.getsize(path) + (os.path.getsize(wal) if os.path.exists(wal) else 0)


async def bytes_per_run(runs: int, tokens: int = 1000, *, as_server: bool = False) -> float:
    """Bytes on disk per finished run of ``tokens`` text tokens, through
    ``open_relay(store=...)``; with ``as_server``, also what ``tokenrelay serve`` records of a
    run (its session, request and outcome, the answer included)."""
    with _temporary() as directory:
        path = os.path.join(directory, "store.db")
        SQLiteStore(path).check()  # the empty file: schema only
        empty = _file_size(path)
        async with open_sqlite_store(path) as store:

            async def produce(emit: Emit) -> None:
                # As the server stores them: each token's text as a JSON string literal.
                for i in range(tokens):
                    await emit(encode_text(WORDS[i % len(WORDS)]))

            async def record(run: Run, events: list[Event]) -> None:
                store.record_outcome(run.id, outcome(run, events))

            async with tokenrelay.open_relay(store=store) as relay:
                for i in range(runs):
                    run = await relay.start(
                        f"session-{i}", produce, on_finish=record if as_server else None
                    )
                    if as_server:
                        run.info = {"model": "llama"}
                        store.describe_run(run.id, "", f"session-{i}", PROMPT, REQUEST)
                    await run.wait_finished()
            assert store.write_errors == 0
        return (_file_size(path) - empty) / runs


def _run_rows(runs: int, start: int = 0, state: str = "open") -> Iterator[tuple[object, ...]]:
    """Rows of the ``runs`` table as ``tokenrelay serve`` writes them (before the outcome)."""
    now = time.time()
    closed_at = None if state == "open" else now
    request = json.dumps(REQUEST)
    for i in range(start, start + runs):
        session = f"session-{i}"
        yield (i + 1, f"run-{i}", session, now, closed_at, state, "", session, PROMPT, request)


_INSERT_RUN = (
    "INSERT INTO runs (key, run_id, session_id, opened_at, closed_at, state, namespace, "
    "session, prompt, request) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
)


def _reopen_runs(path: str, runs: int | None = None) -> None:
    """Mark the (first ``runs``) runs ``open`` again, as if their process had just died."""
    with closing(sqlite3.connect(path)) as db, db:
        if runs is None:
            db.execute("UPDATE runs SET state = 'open', closed_at = NULL")
        else:
            db.executemany(
                "UPDATE runs SET state = 'open', closed_at = NULL WHERE run_id = ?",
                ((f"run-{i}",) for i in range(runs)),
            )


async def _time_open(path: str, expect_interrupted: int) -> float:
    """Seconds to open the store at ``path`` as ``tokenrelay serve --db`` does before it
    serves (``await store.open()``: the schema checked, unfinished runs marked interrupted);
    it is closed again, untimed."""
    store = SQLiteStore(path)
    started = time.perf_counter()
    await store.open()
    elapsed = time.perf_counter() - started
    await store.aclose()
    assert store.interrupted == expect_interrupted, (store.interrupted, expect_interrupted)
    return elapsed


async def time_to_mark_interrupted(
    runs: int = 10_000, repeats: int = 5
) -> tuple[list[float], list[float]]:
    """Seconds to open a store holding ``runs`` runs (one event each) with none of them left
    open, and with all of them left open (so that opening marks them interrupted)."""
    with _temporary() as directory:
        path = os.path.join(directory, "store.db")
        SQLiteStore(path).check()  # the schema, as the store makes it
        with closing(sqlite3.connect(path)) as db, db:
            db.executemany(_INSERT_RUN, _run_rows(runs))
            db.executemany(
                "INSERT INTO events (run, seq, data) VALUES (?, 0, ?)",
                ((i + 1, encode_text(" t0")) for i in range(runs)),
            )
        clean: list[float] = []
        marked: list[float] = []
        for _ in range(repeats):
            _reopen_runs(path)
            marked.append(await _time_open(path, runs))
            clean.append(await _time_open(path, 0))
        return clean, marked


def build_big_file(path: str, size: int, event_bytes: int = 900, per_run: int = 32) -> int:
    """A tokenrelay database of about ``size`` bytes, written with ``sqlite3`` directly in
    big transactions: runs of ``per_run`` events of ``event_bytes`` characters each (about
    1 KB a row once stored; a row much bigger would spill into overflow pages), every run
    recorded as ``tokenrelay serve`` leaves it. Returns how many runs it holds."""
    SQLiteStore(path).check()
    text = encode_text(("lorem ipsum " * (event_bytes // 12 + 1))[: event_bytes - 2])
    # Runs per transaction: about 64 MB, or an eighth of the file if that is less.
    batch = max(1, min(64 << 20, size // 8) // (1024 * per_run))
    runs = 0
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA journal_mode = OFF")
        db.execute("PRAGMA synchronous = OFF")
        page_size = db.execute("PRAGMA page_size").fetchone()[0]
        while db.execute("PRAGMA page_count").fetchone()[0] * page_size < size:
            with db:
                db.executemany(_INSERT_RUN, _run_rows(batch, runs, "closed"))
                db.executemany(
                    "INSERT INTO events (run, seq, data) VALUES (?, ?, ?)",
                    (
                        (i + 1, seq, text)
                        for i in range(runs, runs + batch)
                        for seq in range(per_run)
                    ),
                )
            runs += batch
        db.execute("PRAGMA journal_mode = WAL")
    return runs


async def time_to_reopen(
    size: int, repeats: int = 5, left_open: int = 100
) -> tuple[list[float], int]:
    """Seconds to open a store of about ``size`` bytes in which ``left_open`` runs were left
    unfinished (a crash under load), and the file's size. The file is in the page cache."""
    with _temporary() as directory:
        path = os.path.join(directory, "big.db")
        build_big_file(path, size)
        actual = _file_size(path)
        timings = []
        for _ in range(repeats):
            _reopen_runs(path, left_open)
            timings.append(await _time_open(path, left_open))
        return timings, actual
