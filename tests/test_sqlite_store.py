"""The SQLite store, on real files in a temporary directory (no mock of the database)."""

from __future__ import annotations

import sqlite3
import sys
from pathlib import Path

import pytest
import trio
from trio.testing import MockClock, wait_all_tasks_blocked

import tokenrelay
from _helpers import bounded
from tokenrelay import Emit, StoreUnavailable
from tokenrelay.stores import open_sqlite_store


def on_disk(path: Path, run_id: str) -> list[tuple[int, str]]:
    """What another connection reads from the file now."""
    with sqlite3.connect(path) as db:
        return db.execute(
            "SELECT seq, data FROM events WHERE run_id = ? ORDER BY seq", (run_id,)
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
