"""The SQLite store, on real files in a temporary directory (no mock of the database)."""

from __future__ import annotations

import sqlite3
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

import tokenrelay
from _helpers import bounded
from tokenrelay import Emit, StoreUnavailable
from tokenrelay.stores import open_sqlite_store
from tokenrelay.stores._sqlite import _MIGRATIONS, APPLICATION_ID, SCHEMA_VERSION


def on_disk(path: Path, run_id: str) -> list[tuple[int, str]]:
    """What another connection reads from the file now."""
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT seq, data FROM events JOIN runs ON run = key WHERE run_id = ? ORDER BY seq",
            (run_id,),
        ).fetchall()


def states(path: Path) -> dict[str, str]:
    with sqlite3.connect(path) as db:
        return dict(db.execute("SELECT run_id, state FROM runs").fetchall())


async def test_events_are_written_behind_after_the_flush_interval(
    tmp_path: Path, mock_clock: MockClock
) -> None:
    # A clock that moves only when told to: the writer's thread is real I/O.
    path = tmp_path / "relay.db"
    release = trio.Event()

    async def produce(emit: Emit) -> None:
        for i in range(10):
            await emit(f'"t{i}"')  # never waits for the disk
        await release.wait()

    async with (
        open_sqlite_store(path, flush_interval=0.05) as store,
        tokenrelay.open_relay(store=store) as relay,
    ):
        run = await relay.start("s", produce)
        await wait_all_tasks_blocked()
        mock_clock.jump(0.04)
        await wait_all_tasks_blocked()
        assert store.batches == 0  # all queued at t=0, none written yet
        mock_clock.jump(0.01)
        await wait_all_tasks_blocked()
        assert (store.batches, store.last_batch_at) == (1, 0.05)  # one batch, on time
        await store.flush()  # (waits for that batch's thread)
        assert on_disk(path, run.id) == [(i, f'"t{i}"') for i in range(10)]
        assert states(path) == {run.id: "open"}
        release.set()
        await run.wait_finished()  # its log's aclose() wrote the end of the run at once
        assert (store.batches, store.last_batch_at) == (2, 0.05)
        assert states(path) == {run.id: "closed"}


async def test_a_full_batch_is_written_at_once(tmp_path: Path, mock_clock: MockClock) -> None:
    path = tmp_path / "relay.db"
    release = trio.Event()

    async def produce(emit: Emit) -> None:
        for i in range(299):
            await emit(f'"t{i}"')
        await release.wait()

    async with (
        open_sqlite_store(path, flush_interval=60.0, flush_events=100) as store,
        tokenrelay.open_relay(store=store) as relay,
    ):
        run = await relay.start("s", produce)
        await wait_all_tasks_blocked()
        # The run's opening and 299 events: the first full batch went at once, no time passing
        # (the interval is 60 s); flush() then writes the rest.
        assert store.batches >= 1
        assert store.last_batch_at == 0.0
        await store.flush()
        assert trio.current_time() == 0.0
        assert len(on_disk(path, run.id)) == 299
        release.set()


CRASH = """
import os, sys, trio, tokenrelay
from tokenrelay.stores import open_sqlite_store

async def main():
    async with open_sqlite_store(sys.argv[1]) as store:
        async with tokenrelay.open_relay(store=store) as relay:
            async def finished(emit):
                for word in ("all", " of", " it"):
                    await emit(f'"{word}"')
            async def endless(emit):
                await emit('"part"')
                await trio.sleep_forever()
            done = await relay.start("a", finished)
            await done.wait_finished()
            cut = await relay.start("b", endless)
            await trio.sleep(0.2)  # written behind
            print(done.id, cut.id, flush=True)
            os._exit(9)  # as kill -9 would: nothing is closed

trio.run(main)
"""


@bounded(30)
async def test_reopened_the_events_are_there_and_unfinished_runs_are_interrupted(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.db"
    crashed = await trio.run_process(
        [sys.executable, "-c", CRASH, str(path)], capture_stdout=True, check=False
    )
    assert crashed.returncode == 9
    done, cut = crashed.stdout.decode().split()
    assert states(path) == {done: "closed", cut: "open"}
    async with open_sqlite_store(path) as reopened:
        assert reopened.interrupted == 1
        assert await reopened.run_state(done) == "closed"
        assert await reopened.run_state(cut) == "interrupted"
        assert [e.data for e in await reopened.events(done)] == ['"all"', '" of"', '" it"']
        assert [e.data for e in await reopened.events(done, after=0)] == ['" of"', '" it"']
        assert [e.data for e in await reopened.events(cut)] == ['"part"']


@pytest.mark.parametrize(
    ("prepare", "message"),
    [
        (lambda p: p.write_bytes(b"this is not a database" * 100), "is not a tokenrelay database"),
        (
            lambda p: sqlite3.connect(p).execute("CREATE TABLE mine (x)").connection.commit(),
            "is a SQLite database, but not tokenrelay's",
        ),
        (lambda p: p.mkdir(), "cannot open the database"),
    ],
    ids=["garbage", "someone-elses", "a-directory"],
)
@bounded(20)
async def test_a_file_that_cannot_be_used_is_one_clear_error(
    tmp_path: Path, prepare: object, message: str
) -> None:
    path = tmp_path / "relay.db"
    prepare(path)  # type: ignore[operator]
    with pytest.raises(StoreUnavailable, match=message):
        async with open_sqlite_store(path):
            pass


@bounded(20)
async def test_a_newer_schema_or_a_lock_held_elsewhere_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "relay.db"
    async with open_sqlite_store(path):
        pass
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 99")
    with pytest.raises(StoreUnavailable, match=r"written by a newer tokenrelay \(schema 99"):
        async with open_sqlite_store(path):
            pass
    with sqlite3.connect(path) as db:
        db.execute("PRAGMA user_version = 1")
    other = sqlite3.connect(path, isolation_level=None)
    other.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(StoreUnavailable, match="is another process using it"):
            async with open_sqlite_store(path):
                pass
    finally:
        other.close()


@bounded(20)
async def test_a_failing_write_is_counted_and_serving_goes_on(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "relay.db"

    async def produce(emit: Emit) -> None:
        for word in ("still", " served"):
            await emit(f'"{word}"')

    async with open_sqlite_store(path) as store:
        with sqlite3.connect(path) as db:  # break the file under the store: no events table
            db.execute("DROP TABLE events")
        async with tokenrelay.open_relay(store=store) as relay:
            run = await relay.start("s", produce)
            async with run.subscribe() as sub:
                assert [event.data async for event in sub] == ['"still"', '" served"']
            await run.wait_finished()
        assert store.write_errors >= 1
    assert run.status is tokenrelay.RunStatus.DONE
    assert [r.getMessage().split()[0] for r in caplog.records].count("store_write_failed") == 1


@bounded(20)
async def test_a_run_withdrawn_before_its_turn_leaves_nothing_in_the_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.db"
    release = trio.Event()

    async def first(emit: Emit) -> None:
        await emit('"x"')
        await release.wait()

    async with (
        open_sqlite_store(path) as store,
        tokenrelay.open_relay(store=store, on_busy="enqueue") as relay,
    ):
        running = await relay.start("s", first)
        with trio.move_on_after(0.1):  # the second waits its turn, then gives up
            await relay.start("s", first)
        await store.flush()
        assert states(path) == {running.id: "open"}
        release.set()


@bounded(20)
async def test_an_expired_log_is_a_replay_gap_and_a_deleted_run_is_unknown(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.db"

    async def three(emit: Emit) -> None:
        for text in ("a", "b", "c"):
            await emit(f'"{text}"')

    async with open_sqlite_store(path) as store:
        async with tokenrelay.open_relay(store=store) as relay:
            run = await relay.start("s", three)
            await run.wait_finished()
        store.describe_run(run.id, "ns", "s", "hi", {})
        assert await store.expire(0.0) == 1
        with pytest.raises(tokenrelay.ReplayGap) as gap:
            await store.events(run.id, after=0)
        assert (gap.value.requested, gap.value.first_held) == (1, 3)
        assert await store.events(run.id, after=2) == []  # nothing after the end: no gap
        assert await store.event_count(run.id) == 3
        assert await store.delete_session("ns", "s")
        with pytest.raises(tokenrelay.UnknownRun):
            await store.events(run.id)
        assert await store.event_count(run.id) == 0


@bounded(20)
async def test_events_of_a_run_whose_session_is_deleted_meanwhile_are_not_left_behind(
    tmp_path: Path,
) -> None:
    path = tmp_path / "relay.db"
    more = trio.Event()

    async def slow(emit: Emit) -> None:
        await emit('"before"')
        await more.wait()
        await emit('"after"')

    async with open_sqlite_store(path) as store, tokenrelay.open_relay(store=store) as relay:
        run = await relay.start("ns/s", slow)
        store.describe_run(run.id, "ns", "s", "hi", {})
        await wait_all_tasks_blocked()
        assert await store.delete_session("ns", "s")  # while the run still produces
        more.set()
        await run.wait_finished()
        await store.flush()
    with sqlite3.connect(path) as db:
        assert db.execute("SELECT count(*) FROM events").fetchone() == (0,)
        assert db.execute("SELECT count(*) FROM runs").fetchone() == (0,)


@bounded(20)
async def test_a_second_version_database_is_migrated_with_its_events(tmp_path: Path) -> None:
    path = tmp_path / "v2.db"
    with sqlite3.connect(path) as db:
        for version in (1, 2):
            for statement in _MIGRATIONS[version]:
                db.execute(statement)
        db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
        db.execute("PRAGMA user_version = 2")
        db.execute(
            "INSERT INTO runs (run_id, session_id, opened_at, closed_at, state, namespace, "
            "session) VALUES ('done', 'ns/s', 1.0, 2.0, 'closed', 'ns', 's'), "
            "('cut', 'ns/t', 3.0, NULL, 'open', 'ns', 't')"
        )
        db.executemany(
            "INSERT INTO events VALUES (?, ?, ?)",
            [("done", 0, '"a"'), ("done", 1, '"b"'), ("cut", 0, '"c"')],
        )
    async with open_sqlite_store(path) as store:
        assert store.interrupted == 1
        assert [e.data for e in await store.events("done")] == ['"a"', '"b"']
        assert [e.data for e in await store.events("cut")] == ['"c"']
        assert await store.event_count("done") == 2
        assert await store.run_state("cut") == "interrupted"
    with sqlite3.connect(path) as db:
        assert db.execute("PRAGMA user_version").fetchone() == (SCHEMA_VERSION,)


@bounded(20)
async def test_a_read_waits_for_the_batch_being_written(tmp_path: Path) -> None:
    """A read sees what was queued before it, even a batch the flusher is writing just then
    (a run that has just ended reads with its outcome, never as interrupted)."""

    async def one(emit: Emit) -> None:
        await emit('"x"')

    async with open_sqlite_store(tmp_path / "relay.db") as store:
        writing, go_on = threading.Event(), threading.Event()
        write_batch = store._write_batch

        def held_batch(batch: list[tuple[str, Any]]) -> None:
            writing.set()
            go_on.wait(10)
            write_batch(batch)

        async with tokenrelay.open_relay(store=store) as relay:
            run = await relay.start("ns/s", one)
            await run.wait_finished()
        store.describe_run(run.id, "ns", "s", "hello", {})  # queued
        store._write_batch = held_batch  # type: ignore[method-assign]
        seen: list[object] = []

        async def read() -> None:
            seen.append(await store.latest_run("ns", "s"))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(store.flush)  # takes the queue: the batch is in flight
            await trio.to_thread.run_sync(writing.wait, 10, abandon_on_cancel=True)
            assert not store._pending
            nursery.start_soon(read)
            await wait_all_tasks_blocked()
            assert seen == []  # it waits for the batch in flight...
            go_on.set()
    [found] = seen  # ... and sees it
    assert found is not None
    assert found.prompt == "hello"  # type: ignore[attr-defined]


@bounded(30)
async def test_reads_at_the_same_time_each_get_their_events(tmp_path: Path) -> None:
    """Reads share one reader connection: taken one at a time (two threads on it at once
    nested one read's transaction in the other's: "cannot start a transaction within a
    transaction"). Many runs ending at once (a shutdown) each read their events back."""
    tokens = [f'"t{i}"' for i in range(5_000)]

    async def produce(emit: Emit) -> None:
        for data in tokens:
            await emit(data)

    async with (
        open_sqlite_store(tmp_path / "relay.db") as store,
        tokenrelay.open_relay(store=store) as relay,
    ):
        runs = [await relay.start(f"s{i}", produce) for i in range(8)]
        for run in runs:
            await run.wait_finished()
        found: dict[str, list[str]] = {}

        async def read(run_id: str) -> None:
            found[run_id] = [event.data for event in await store.events(run_id)]

        async with trio.open_nursery() as nursery:
            for run in runs:
                nursery.start_soon(read, run.id)
    assert all(found[run.id] == tokens for run in runs)
