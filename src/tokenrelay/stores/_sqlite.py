"""A durable store: every run's events in a SQLite file (stdlib ``sqlite3``, WAL mode).

Live subscribers are fed from memory exactly as with :class:`MemoryStore`; what the producer
appends is also queued, never awaited, and written behind in batches: once ``flush_interval``
seconds have passed since the first queued event, or at once when ``flush_events`` are queued,
whichever comes first. So a crash (``kill -9``) loses at most the batch being gathered. One
writer connection is used, from one flusher task, through ``trio.to_thread`` (one batch at a
time); reads use a connection of their own.

A run's log is ``open`` until its run ends (``closed``). Opening a store marks the logs it
finds still ``open`` as ``interrupted``: their runs died with the process that wrote them.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from typing import Any

try:
    import fcntl
except ImportError:  # pragma: no cover (Windows)
    fcntl = None  # type: ignore[assignment]

import trio

from .._events import Event
from .._exceptions import ReplayGap, StoreUnavailable, UnknownRun
from .._log import ByteBudget, RunLog
from ._memory import MemoryRunLog, in_memory_only

__all__ = ["SCHEMA_VERSION", "SQLiteRunLog", "SQLiteStore", "StoredRun", "open_sqlite_store"]

logger = logging.getLogger("tokenrelay")

#: Whether this platform has ``flock`` (everywhere but Windows).
_CAN_LOCK: bool = fcntl is not None

#: The schema this code writes (``PRAGMA user_version``); older ones are migrated forward.
SCHEMA_VERSION = 3

#: What makes a database a tokenrelay one: the ``application_id`` pragma ("TRly").
APPLICATION_ID = 0x54526C79

_MIGRATIONS: dict[int, Sequence[str]] = {
    1: (
        """CREATE TABLE runs (
            run_id TEXT PRIMARY KEY,
            session_id TEXT NOT NULL,
            opened_at REAL NOT NULL,
            closed_at REAL,
            state TEXT NOT NULL CHECK (state IN ('open', 'closed', 'interrupted'))
        )""",
        "CREATE INDEX runs_by_session ON runs (session_id, opened_at)",
        """CREATE TABLE events (
            run_id TEXT NOT NULL,
            seq INTEGER NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (run_id, seq)
        ) WITHOUT ROWID""",
    ),
    # What a server records of its sessions and runs: the conversation, turn by turn.
    2: (
        """CREATE TABLE sessions (
            namespace TEXT NOT NULL,
            session TEXT NOT NULL,
            created REAL NOT NULL,
            updated REAL NOT NULL,
            title TEXT NOT NULL,
            PRIMARY KEY (namespace, session)
        )""",
        "CREATE INDEX sessions_by_update ON sessions (namespace, updated)",
        "ALTER TABLE runs ADD COLUMN namespace TEXT",
        "ALTER TABLE runs ADD COLUMN session TEXT",
        "ALTER TABLE runs ADD COLUMN prompt TEXT",
        "ALTER TABLE runs ADD COLUMN request TEXT",
        "ALTER TABLE runs ADD COLUMN outcome TEXT",
        "ALTER TABLE runs ADD COLUMN expired INTEGER NOT NULL DEFAULT 0",
        "CREATE INDEX runs_by_conversation ON runs (namespace, session, opened_at)",
        "CREATE INDEX runs_due ON runs (closed_at) WHERE state != 'open' AND NOT expired",
        "CREATE INDEX runs_open ON runs (state) WHERE state = 'open'",
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value BLOB NOT NULL)",
    ),
    # Events keyed by a small integer per run instead of repeating its 22-character id in
    # every row (about half of a text token's row), and each run's event count kept when it
    # ends (what a replay of an expired log reports).
    3: (
        """CREATE TABLE runs_v3 (
            key INTEGER PRIMARY KEY,
            run_id TEXT NOT NULL UNIQUE,
            session_id TEXT NOT NULL,
            opened_at REAL NOT NULL,
            closed_at REAL,
            state TEXT NOT NULL CHECK (state IN ('open', 'closed', 'interrupted')),
            events INTEGER,
            namespace TEXT,
            session TEXT,
            prompt TEXT,
            request TEXT,
            outcome TEXT,
            expired INTEGER NOT NULL DEFAULT 0
        )""",
        """INSERT INTO runs_v3 (run_id, session_id, opened_at, closed_at, state, events,
            namespace, session, prompt, request, outcome, expired)
        SELECT run_id, session_id, opened_at, closed_at, state,
            CASE WHEN state = 'closed' AND NOT expired
                THEN (SELECT count(*) FROM events WHERE events.run_id = runs.run_id) END,
            namespace, session, prompt, request, outcome, expired
        FROM runs ORDER BY opened_at""",
        """CREATE TABLE events_v3 (
            run INTEGER NOT NULL,
            seq INTEGER NOT NULL,
            data TEXT NOT NULL,
            PRIMARY KEY (run, seq)
        ) WITHOUT ROWID""",
        """INSERT INTO events_v3 (run, seq, data)
        SELECT runs_v3.key, events.seq, events.data FROM events JOIN runs_v3 USING (run_id)""",
        "DROP TABLE events",
        "DROP TABLE runs",
        "ALTER TABLE runs_v3 RENAME TO runs",
        "ALTER TABLE events_v3 RENAME TO events",
        "CREATE INDEX runs_by_conversation ON runs (namespace, session, opened_at)",
        "CREATE INDEX runs_due ON runs (closed_at) WHERE state != 'open' AND NOT expired",
        "CREATE INDEX runs_open ON runs (state) WHERE state = 'open'",
    ),
}


class SQLiteStore:
    """Keeps each run's events in memory for live readers and in a SQLite file for good.
    Open one with :func:`open_sqlite_store`; pass it as ``open_relay(store=...)``.

    Attributes:
        path: the database file.
        interrupted: how many runs were found unfinished (and marked so) when it was opened.
        batches: how many batches it has written (or tried to).
        last_batch_at: when (trio's clock) the last of them began.
        write_errors: how many batches could not be written (logged once; serving goes on
            in memory).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        flush_interval: float = 0.05,
        flush_events: int = 256,
    ) -> None:
        if not flush_interval > 0 or flush_events < 1:
            raise ValueError("flush_interval must be > 0 seconds and flush_events >= 1")
        self.path = os.fspath(path)
        self.flush_interval = flush_interval
        self.flush_events = flush_events
        self.interrupted = 0
        self.write_errors = 0
        self.batches = 0
        #: When (trio clock) the last batch began to be written.
        self.last_batch_at: float | None = None
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._pending: list[tuple[str, Any]] = []
        #: The writer's keys of the runs it has seen opened and not yet closed (used only
        #: under ``_write_lock``: by the writer's thread).
        self._keys: dict[str, int] = {}
        self._lock_file: Any = None  # the OS lock held while the store is open
        #: A secret kept in the file (for the server's key namespaces, so that they are the
        #: same after a restart).
        self.secret = b""
        self._write_lock = trio.Lock()  # one batch at a time on the writer connection
        # One read at a time on the reader connection: two threads on it at once would nest
        # one read's transaction in the other's ("cannot start a transaction within a
        # transaction"), and a close could come in the middle of a read.
        self._read_lock = trio.Lock()
        self._something = trio.Event()  # set when the first item of a batch is queued
        self._full = trio.Event()  # set when a batch should be written at once

    def __repr__(self) -> str:
        return f"SQLiteStore({self.path!r})"

    # -- RunLog side ------------------------------------------------------------------------

    def open_log(
        self,
        run_id: str,
        session_id: str,
        *,
        max_events: int | None,
        max_bytes: int | None,
        budget: ByteBudget,
    ) -> RunLog:
        """A log for one run: in memory, and written behind to the file (in memory only, for
        a run started in a :func:`~tokenrelay.stores.memory_only` block)."""
        if in_memory_only():
            return MemoryRunLog(run_id, max_events=max_events, max_bytes=max_bytes, budget=budget)
        self._queue("open", (run_id, session_id, time.time()))
        return SQLiteRunLog(self, run_id, max_events=max_events, max_bytes=max_bytes, budget=budget)

    def _queue(self, kind: str, item: Any) -> None:
        self._pending.append((kind, item))
        self._something.set()
        if len(self._pending) >= self.flush_events:
            self._full.set()

    def describe_run(
        self, run_id: str, namespace: str, session: str, prompt: str, request: dict[str, Any]
    ) -> None:
        """Record what a run answers (queued like its events): its session (made, or touched,
        its title the first prompt) and the request, ``prompt`` being its last user message."""
        self._queue("describe", (run_id, namespace, session, prompt, request, time.time()))

    def record_outcome(self, run_id: str, outcome: dict[str, Any]) -> None:
        """Record how a run ended (queued): status, reason, error, timings, model, usage and
        the answer as it was produced."""
        self._queue("outcome", (json.dumps(outcome, ensure_ascii=False), run_id))

    async def flush(self) -> None:
        """Write everything queued so far now (batches are written one at a time, in order:
        when this returns, so is everything queued before it)."""
        await self._write_pending()

    # -- the flusher --------------------------------------------------------------------------

    def check(self) -> None:
        """Open the file and close it again, synchronously (for a command line, before its
        event loop starts): creates or migrates it; marks nothing interrupted.

        Raises:
            StoreUnavailable: the file cannot be used, with a one-line reason.
        """
        self._open(mark_interrupted=False)
        self._close()

    async def open(self) -> None:
        """Open the file (creating or migrating it) and mark unfinished runs interrupted.

        Raises:
            StoreUnavailable: the file cannot be used, with a one-line reason.
        """
        await trio.to_thread.run_sync(self._open)

    async def aclose(self) -> None:
        """Write what is still queued, and close the file. (Cancel :meth:`serve` first.)"""
        async with self._write_lock:
            if self._writer is not None and self._pending:
                batch, self._pending = self._pending, []
                await trio.to_thread.run_sync(self._write_batch, batch)
            async with self._read_lock:
                await trio.to_thread.run_sync(self._close)

    async def serve(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """Write queued items in batches until cancelled (start it with ``nursery.start``)."""
        task_status.started()
        while True:
            await self._something.wait()
            with trio.move_on_after(self.flush_interval):
                await self._full.wait()
            # Only this task renews the events it waits on: items queued from now on wake it
            # again (those that make it into this batch as well: one spare wake-up).
            self._something, self._full = trio.Event(), trio.Event()
            await self._write_pending()

    async def _write_pending(self) -> None:
        async with self._write_lock:
            batch, self._pending = self._pending, []
            if not batch or self._writer is None:
                await trio.lowlevel.checkpoint()
                return
            self.batches += 1
            self.last_batch_at = trio.current_time()
            await trio.to_thread.run_sync(self._write_batch, batch)

    def _write_batch(self, batch: list[tuple[str, Any]]) -> None:
        """(In a worker thread.) One transaction for the batch; if it fails, each item on its
        own, so that one item that cannot be written (or a full disk) costs only itself."""
        try:
            self._write(batch)
        except Exception as exc:
            self._keys.clear()  # what the failed transaction inserted was rolled back
            self.write_errors += 1
            if self.write_errors == 1:
                # Once, one line: serving goes on in memory; write_errors counts the rest.
                logger.error("store_write_failed path=%s error=%s", self.path, exc)  # noqa: TRY400
            for item in batch:
                with suppress(Exception):
                    self._write([item])

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        """(In the writer's thread.) One transaction for the whole batch; its events go in
        with one ``executemany``."""
        db = self._writer
        assert db is not None
        events: list[tuple[int, int, str]] = []
        with db:
            for kind, item in batch:
                if kind == "event":
                    run_id, seq, data = item
                    key = self._keys.get(run_id)
                    if key is None:
                        key = self._key(db, run_id)
                    if key is not None:  # else its run was deleted: so are its events
                        events.append((key, seq, data))
                elif kind == "open":
                    cursor = db.execute(
                        "INSERT OR IGNORE INTO runs (run_id, session_id, opened_at, state) "
                        "VALUES (?, ?, ?, 'open')",
                        item,
                    )
                    if cursor.rowcount == 1 and cursor.lastrowid is not None:
                        self._keys[item[0]] = cursor.lastrowid
                elif kind == "close":
                    db.execute(
                        "UPDATE runs SET state = 'closed', closed_at = ?, events = ? "
                        "WHERE run_id = ?",
                        item,
                    )
                    self._keys.pop(item[2], None)
                elif kind == "describe":
                    run_id, namespace, session, prompt, request, now = item
                    db.execute(
                        "INSERT INTO sessions (namespace, session, created, updated, title) "
                        "VALUES (?, ?, ?, ?, ?) "
                        "ON CONFLICT DO UPDATE SET updated = excluded.updated",
                        (namespace, session, now, now, prompt[:TITLE_LENGTH]),
                    )
                    db.execute(
                        "UPDATE runs SET namespace = ?, session = ?, prompt = ?, request = ? "
                        "WHERE run_id = ?",
                        (
                            namespace,
                            session,
                            prompt,
                            json.dumps(request, ensure_ascii=False),
                            run_id,
                        ),
                    )
                elif kind == "outcome":
                    db.execute("UPDATE runs SET outcome = ? WHERE run_id = ?", item)
                elif kind == "discard":
                    db.execute("DELETE FROM runs WHERE run_id = ?", item)
                    self._keys.pop(item[0], None)
            if events:
                db.executemany(
                    "INSERT OR REPLACE INTO events (run, seq, data) VALUES (?, ?, ?)", events
                )

    def _key(self, db: sqlite3.Connection, run_id: str) -> int | None:
        """(In the writer's thread.) The key of a run whose ``open`` was written by an
        earlier batch, or ``None`` if there is no such run (any more)."""
        row = db.execute("SELECT key FROM runs WHERE run_id = ?", (run_id,)).fetchone()
        if row is None:
            return None
        key: int = row[0]
        self._keys[run_id] = key
        return key

    # -- reading ------------------------------------------------------------------------------

    async def _read(self, sql: str, parameters: Sequence[Any]) -> list[Any]:
        """Read, after writing whatever is queued: readers see everything recorded so far
        (a run that has just ended has its outcome, never "interrupted")."""
        # Also when nothing is queued: a batch the flusher is writing right now must be
        # seen too (the write lock waits for it).
        await self._write_pending()

        def read() -> list[Any]:
            assert self._reader is not None
            return self._reader.execute(sql, parameters).fetchall()

        async with self._read_lock:
            return await trio.to_thread.run_sync(read)

    async def latest_run(self, namespace: str, session: str) -> StoredRun | None:
        """The session's latest stored run, ``None`` if there is none."""
        rows = await self._read(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE namespace = ? AND session = ? "
            "ORDER BY opened_at DESC LIMIT 1",
            (namespace, session),
        )
        return _stored_run(rows[0]) if rows else None

    async def sessions(
        self, namespace: str, *, limit: int, before: float | None = None
    ) -> list[dict[str, Any]]:
        """The namespace's sessions, most recently updated first, updated before ``before``."""
        rows = await self._read(
            "SELECT session, created, updated, title FROM sessions WHERE namespace = ? "
            "AND updated < ? ORDER BY updated DESC LIMIT ?",
            (namespace, before if before is not None else float("inf"), limit),
        )
        return [
            {"id": session, "created_at": created, "updated_at": updated, "title": title}
            for session, created, updated, title in rows
        ]

    async def conversation(self, namespace: str, session: str) -> list[StoredRun]:
        """The session's runs, oldest first: each the prompt it answered and how."""
        rows = await self._read(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE namespace = ? AND session = ? "
            "ORDER BY opened_at",
            (namespace, session),
        )
        return [_stored_run(row) for row in rows]

    async def next_expiry(self, keep: float) -> float | None:
        """When (wall clock) the oldest finished run's events are due to expire, ``keep``
        seconds after it ended; ``None`` if no run's events are due ever."""
        [(oldest,)] = await self._read(
            "SELECT min(closed_at) FROM runs WHERE state != 'open' AND NOT expired", ()
        )
        return None if oldest is None else float(oldest) + keep

    async def expire(self, keep: float, *, batch: int = 500) -> int:
        """Delete the events of runs that ended more than ``keep`` seconds ago (their runs,
        sessions and answers are kept), ``batch`` runs per transaction, yielding in between
        so the event loop never stalls. Returns how many runs' events were deleted."""
        deadline = time.time() - keep

        def expire_batch() -> int:
            db = self._writer
            assert db is not None
            with db:
                due = [
                    row[0]
                    for row in db.execute(
                        "SELECT key FROM runs WHERE state != 'open' AND NOT expired "
                        "AND closed_at < ? LIMIT ?",
                        (deadline, batch),
                    )
                ]
                for key in due:
                    # An interrupted run's count was never recorded: keep it, for ReplayGap.
                    db.execute(
                        "UPDATE runs SET expired = 1, events = coalesce(events, "
                        "(SELECT count(*) FROM events WHERE run = ?)) WHERE key = ?",
                        (key, key),
                    )
                    db.execute("DELETE FROM events WHERE run = ?", (key,))
            return len(due)

        total = 0
        while True:
            async with self._write_lock:
                done = await trio.to_thread.run_sync(expire_batch)
            total += done
            if done < batch:
                return total

    async def delete_session(self, namespace: str, session: str) -> bool:
        """Delete the session, its runs and their events (after what is queued is written).
        Returns whether there was such a session."""
        await self.flush()

        def delete() -> bool:
            db = self._writer
            assert db is not None
            with db:
                db.execute(
                    "DELETE FROM events WHERE run IN "
                    "(SELECT key FROM runs WHERE namespace = ? AND session = ?)",
                    (namespace, session),
                )
                # A run of the session still going loses its key: its later events are
                # dropped, not left behind without their run.
                self._keys.clear()
                db.execute(
                    "DELETE FROM runs WHERE namespace = ? AND session = ?", (namespace, session)
                )
                return bool(
                    db.execute(
                        "DELETE FROM sessions WHERE namespace = ? AND session = ?",
                        (namespace, session),
                    ).rowcount
                )

        async with self._write_lock:
            return await trio.to_thread.run_sync(delete)

    async def run_in(self, namespace: str, run_id: str) -> StoredRun | None:
        """The stored run ``run_id`` if it was described (:meth:`describe_run`) in
        ``namespace``, else ``None``."""
        rows = await self._read(
            f"SELECT {_RUN_COLUMNS} FROM runs WHERE run_id = ? AND namespace = ?",
            (run_id, namespace),
        )
        return _stored_run(rows[0]) if rows else None

    async def delete_run(self, namespace: str, run_id: str) -> bool:
        """Delete one run of ``namespace`` and its events (after what is queued is written);
        its session and the session's other runs stay. Returns whether there was such a run."""
        await self.flush()

        def delete() -> bool:
            db = self._writer
            assert db is not None
            with db:
                found = db.execute(
                    "SELECT key FROM runs WHERE run_id = ? AND namespace = ?", (run_id, namespace)
                ).fetchone()
                if found is None:
                    return False
                db.execute("DELETE FROM events WHERE run = ?", found)
                db.execute("DELETE FROM runs WHERE key = ?", found)
                self._keys.pop(run_id, None)  # its later events (if it still runs) are dropped
                return True

        async with self._write_lock:
            return await trio.to_thread.run_sync(delete)

    async def events(self, run_id: str, after: int = -1) -> list[Event]:
        """The stored events of ``run_id`` with ``seq > after``, in order (what is queued
        included): what a reader of the run's log would have replayed.

        Raises:
            UnknownRun: the store has no such run (never stored, or deleted).
            ReplayGap: the run's events have expired (:meth:`expire`) and some of those
                asked for existed.
        """
        # Also when nothing is queued: a batch the flusher is writing right now must be
        # seen too (the write lock waits for it).
        await self._write_pending()

        def read() -> tuple[bool, int | None, list[Any]] | None:
            db = self._reader
            assert db is not None
            db.execute("BEGIN")  # one snapshot: the run and its events agree
            try:
                found = db.execute(
                    "SELECT key, expired, events FROM runs WHERE run_id = ?", (run_id,)
                ).fetchone()
                if found is None:
                    return None
                key, expired, count = found
                rows = db.execute(
                    "SELECT seq, data FROM events WHERE run = ? AND seq > ? ORDER BY seq",
                    (key, after),
                ).fetchall()
                return bool(expired), count, rows
            finally:
                db.execute("COMMIT")

        async with self._read_lock:
            found = await trio.to_thread.run_sync(read)
        if found is None:
            raise UnknownRun(run_id)
        expired, count, rows = found
        if expired and count is not None and after + 1 < count:
            raise ReplayGap(run_id, after + 1, count)
        return [Event(seq, data, run_id) for seq, data in rows]

    async def event_count(self, run_id: str) -> int:
        """How many events ``run_id`` has had (expired ones included); 0 for a run the store
        does not know."""
        rows = await self._read(
            "SELECT coalesce(runs.events, (SELECT count(*) FROM events WHERE run = runs.key)) "
            "FROM runs WHERE run_id = ?",
            (run_id,),
        )
        return int(rows[0][0]) if rows else 0

    async def run_state(self, run_id: str) -> str | None:
        """``"open"``, ``"closed"`` or ``"interrupted"``; ``None`` for a run it never saw."""
        rows = await self._read("SELECT state FROM runs WHERE run_id = ?", (run_id,))
        return str(rows[0][0]) if rows else None

    # -- opening and closing --------------------------------------------------------------

    def _open(self, *, mark_interrupted: bool = True) -> None:
        """(In a worker thread.) Take the file's lock, open both connections, check and
        migrate the schema, mark unfinished runs interrupted."""
        self._lock()
        try:
            writer = sqlite3.connect(self.path, timeout=1.0, check_same_thread=False)
        except sqlite3.Error as exc:
            self._unlock()
            raise StoreUnavailable(f"cannot open the database {self.path!r}: {exc}") from None
        try:
            self._migrate(writer)
            with writer:
                writer.execute(
                    "INSERT OR IGNORE INTO meta VALUES ('namespace_secret', ?)",
                    (secrets.token_bytes(32),),
                )
                self.secret = writer.execute(
                    "SELECT value FROM meta WHERE key = 'namespace_secret'"
                ).fetchone()[0]
                if mark_interrupted:
                    self.interrupted = writer.execute(
                        "UPDATE runs SET state = 'interrupted', closed_at = ? WHERE state = 'open'",
                        (time.time(),),
                    ).rowcount
            reader = sqlite3.connect(self.path, timeout=1.0, check_same_thread=False)
        except BaseException:
            writer.close()
            self._unlock()
            raise
        self._writer, self._reader = writer, reader

    def _lock(self) -> None:
        """Hold an OS lock on ``PATH-lock`` while open: a second process (another server on
        the same file) is refused, and never marks the first one's runs interrupted."""
        if not _CAN_LOCK:  # pragma: no cover (Windows: SQLite's own locking only)
            return
        try:
            handle = open(self.path + "-lock", "a")  # noqa: SIM115 (held while open)
        except OSError as exc:
            raise StoreUnavailable(f"cannot open the database {self.path!r}: {exc}") from None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise StoreUnavailable(
                f"the database {self.path!r} is in use by another process (another tokenrelay "
                "serve?): give each its own --db"
            ) from None
        self._lock_file = handle

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()  # closing the file releases the lock
            self._lock_file = None

    def _migrate(self, db: sqlite3.Connection) -> None:
        try:
            application_id, version = (
                db.execute("PRAGMA application_id").fetchone()[0],
                db.execute("PRAGMA user_version").fetchone()[0],
            )
            tables = db.execute("SELECT count(*) FROM sqlite_master").fetchone()[0]
        except sqlite3.DatabaseError as exc:
            raise StoreUnavailable(
                f"{self.path!r} is not a tokenrelay database (SQLite says: {exc})"
            ) from None
        if tables and application_id != APPLICATION_ID:
            raise StoreUnavailable(f"{self.path!r} is a SQLite database, but not tokenrelay's")
        if version > SCHEMA_VERSION:
            raise StoreUnavailable(
                f"{self.path!r} was written by a newer tokenrelay (schema {version}; this one "
                f"knows up to {SCHEMA_VERSION}): upgrade tokenrelay, or use another file"
            )
        try:
            if db.execute("PRAGMA journal_mode = WAL").fetchone()[0] != "wal":
                raise StoreUnavailable(f"{self.path!r}: SQLite could not switch it to WAL mode")
            db.execute("PRAGMA synchronous = NORMAL")
            with db:
                db.execute("BEGIN IMMEDIATE")  # the lock: another writer makes this fail
                for step in range(version + 1, SCHEMA_VERSION + 1):
                    for statement in _MIGRATIONS[step]:
                        db.execute(statement)
                db.execute(f"PRAGMA application_id = {APPLICATION_ID}")
                db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.OperationalError as exc:
            raise StoreUnavailable(
                f"cannot use the database {self.path!r} ({exc}): is another process using it?"
            ) from None

    def _close(self) -> None:
        for db in (self._writer, self._reader):
            if db is not None:
                db.close()
        self._writer = self._reader = None
        self._unlock()


#: The longest closing a store (its last batch, then the file) may take.
CLOSE_TIMEOUT = 10.0

#: How much of a session's first prompt is kept as its title.
TITLE_LENGTH = 80

_RUN_COLUMNS = "run_id, state, opened_at, closed_at, prompt, request, outcome, expired"


@dataclass(frozen=True)
class StoredRun:
    """A run as the store keeps it.

    Attributes:
        id: the run's id.
        state: ``"open"`` (running, in this process), ``"closed"`` or ``"interrupted"`` (its
            process died before it ended).
        opened_at, closed_at: wall-clock times.
        prompt: the user message it answered.
        request: the rest of the request.
        outcome: how it ended (``status``, ``reason``, ``error``, ``model``, ``usage``,
            ``answer``...), as the server recorded it; ``None`` for an interrupted run.
        expired: its events were deleted (:meth:`SQLiteStore.expire`); the rest is kept.
    """

    id: str
    state: str
    opened_at: float
    closed_at: float | None
    prompt: str | None
    request: dict[str, Any] | None
    outcome: dict[str, Any] | None
    expired: bool = False


def _stored_run(row: Sequence[Any]) -> StoredRun:
    run_id, state, opened_at, closed_at, prompt, request, outcome, expired = row
    return StoredRun(
        run_id,
        state,
        opened_at,
        closed_at,
        prompt,
        json.loads(request) if request else None,
        json.loads(outcome) if outcome else None,
        bool(expired),
    )


class SQLiteRunLog(MemoryRunLog):
    """A run's log in memory (what live readers follow), each event also queued for the
    store's file. ``aclose()`` waits until the whole log is written."""

    __slots__ = ("_store",)

    def __init__(self, store: SQLiteStore, run_id: str, **caps: Any) -> None:
        super().__init__(run_id, **caps)
        self._store = store

    def append(self, data: str) -> Event:
        event = super().append(data)
        self._store._queue("event", (self.run_id, event.seq, data))
        return event

    def close(self) -> None:
        if not self.closed:
            self._store._queue("close", (time.time(), self.next_seq, self.run_id))
        super().close()

    async def aclose(self) -> None:
        self.close()
        await self._store.flush()

    def discard(self) -> None:
        super().close()
        self._store._queue("discard", (self.run_id,))


@asynccontextmanager
async def open_sqlite_store(
    path: str | os.PathLike[str], *, flush_interval: float = 0.05, flush_events: int = 256
) -> AsyncIterator[SQLiteStore]:
    """Open (creating or migrating it) the SQLite store at ``path``, with its flusher task::

        async with tokenrelay.stores.open_sqlite_store("tokenrelay.db") as store:
            async with tokenrelay.open_relay(store=store) as relay:
                ...

    Close the relay first (its runs' logs are flushed as they end); on exit, anything still
    queued is written and the file is closed. (Or, in your own nursery: ``await
    store.open()``, ``await nursery.start(store.serve)``, then ``await store.aclose()``.)

    Raises:
        StoreUnavailable: the file cannot be used (see the class), with a one-line reason.
    """
    store = SQLiteStore(path, flush_interval=flush_interval, flush_events=flush_events)
    await store.open()
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(store.serve)
            try:
                yield store
            finally:
                nursery.cancel_scope.cancel()
    finally:
        with trio.move_on_after(CLOSE_TIMEOUT, shield=True):
            await store.aclose()
