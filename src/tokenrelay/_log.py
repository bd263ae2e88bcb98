"""What the relay needs of a run's event log, its readers, and the store that makes logs.

The log is the single source of truth for a run's events: the producer appends (never
waiting), readers replay it from a sequence number and then follow it live. The relay talks
to logs only through these protocols, so that a durable store (SQLite, Redis Streams) can
stand in for :class:`tokenrelay.stores.MemoryStore` without touching the relay.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from ._events import Event

if TYPE_CHECKING:
    from ._relay import Run

__all__ = [
    "MAX_BATCH",
    "ByteBudget",
    "Claim",
    "LogReader",
    "RunLog",
    "SharedStore",
    "Store",
    "event_size",
]

#: A reader hands out at most this many events per batch.
MAX_BATCH = 512


def event_size(data: str) -> int:
    """Bytes ``data`` takes as UTF-8: what ``max_bytes`` counts."""
    # str.isascii() is O(1) in CPython: the common case costs no encoding.
    return len(data) if data.isascii() else len(data.encode("utf-8", "surrogatepass"))


class ByteBudget:
    """The bytes of event data held by every log of one relay, against an optional cap.
    Logs add and subtract as they append, trim and are released; past ``cap``, each append
    calls ``over()`` (the relay then evicts finished runs nobody follows)."""

    __slots__ = ("cap", "held", "over")

    def __init__(self, cap: int | None = None, over: Callable[[], object] = lambda: None) -> None:
        self.cap = cap
        self.held = 0
        self.over = over

    @property
    def exceeded(self) -> bool:
        """Whether the logs hold ``cap`` bytes or more."""
        return self.cap is not None and self.held >= self.cap


class LogReader(Protocol):
    """Follows a log from a sequence number on: replays what is held, then follows live,
    then raises :exc:`trio.EndOfChannel` once the log is closed and fully read."""

    @property
    def position(self) -> int:
        """The sequence number of the next event this reader will hand out."""
        ...

    async def receive(self) -> Event:
        """The next event (see :meth:`receive_batch`)."""
        ...

    async def receive_batch(self, max_events: int = MAX_BATCH) -> list[Event]:
        """Wait for at least one event, then return every event that is ready (up to
        ``max_events``), in order. Raises :exc:`trio.EndOfChannel` at the end of the log
        and :exc:`ReplayGap` if events it needs were dropped.

        A reader may also have (the readers of every store tokenrelay ships do) a
        ``nudge()`` method: called from another task, it makes a waiting ``receive_batch``
        return ``[]`` at once, and does nothing to a reader that is not waiting (see
        :meth:`Subscription.nudge`); and ``receive_ready(max_events)``: what
        ``receive_batch`` would return at once, without waiting, ``[]`` if nothing (see
        :meth:`Subscription.receive_ready`). The memory and SQLite stores' readers also
        have ``receive_batch_offering(max_events, deliver)``: ``receive_batch``, offering
        each event appended while it waits to ``deliver`` first (see
        :meth:`Subscription.receive_batch`)."""
        ...

    def close(self) -> None:
        """Stop following the log, without waiting."""
        ...


class RunLog(Protocol):
    """What the relay needs of a run's log. ``append`` never blocks (the producer must not
    wait for storage or readers); sequence numbers start at 0 and are contiguous."""

    @property
    def next_seq(self) -> int:
        """How many events were ever appended: the seq the next one gets."""
        ...

    @property
    def first_seq(self) -> int:
        """The oldest seq still held (``next_seq`` when nothing is held)."""
        ...

    @property
    def nbytes(self) -> int:
        """Bytes of event data held."""
        ...

    @property
    def closed(self) -> bool:
        """Whether the log was closed (the run's production is over)."""
        ...

    def append(self, data: str) -> Event:
        """Add one event and hand it to every live reader."""
        ...

    def close(self) -> None:
        """No more events: readers end once they have read everything."""
        ...

    async def aclose(self) -> None:
        """After :meth:`close`: wait until every event is where the store keeps it (a
        write-behind store flushes here). The relay awaits it, shielded and bounded by its
        ``finish_timeout``, before the run's ``on_finish``."""
        ...

    def release(self) -> None:
        """The run was evicted from the relay: drop every event held in memory (a later read
        raises :exc:`ReplayGap`). A durable store may delete the log, or let it expire."""
        ...

    def discard(self) -> None:
        """The run never existed: it was withdrawn before its turn (its ``start()`` was
        cancelled). Nothing was appended; a durable store forgets the log."""
        ...

    def held(self) -> list[Event]:
        """Every event still held, oldest first."""
        ...

    def open_reader(self, after: int = -1) -> LogReader:
        """A reader of every event with ``seq > after``. Raises :exc:`ReplayGap` at once if
        some of them are no longer held."""
        ...


class Store(Protocol):
    """Makes the relay's run logs: where runs' events are kept (memory, SQLite, Redis...)."""

    def open_log(
        self,
        run_id: str,
        session_id: str,
        *,
        max_events: int | None,
        max_bytes: int | None,
        budget: ByteBudget,
    ) -> RunLog:
        """A new, empty log for one run. ``max_events`` / ``max_bytes`` cap what it holds in
        memory; it counts the bytes it holds in ``budget``."""
        ...


class Claim(Protocol):
    """A run's hold on its session across every process sharing a store (see
    :class:`SharedStore`), from its start until :meth:`release`."""

    async def release(self, run: Run) -> None:
        """The run is over (its log flushed, its ``on_finish`` done): record how it ended,
        where every process's readers see it, and free the session for the next run."""
        ...


@runtime_checkable
class SharedStore(Store, Protocol):
    """A store that several relays (processes, hosts) share, making them act as one: a
    session has one producer cluster-wide, and stop and supersede reach the run wherever it
    runs. The relay calls :meth:`claim` once a run has its turn in this process, and
    :meth:`stop` for a session that has no run here."""

    async def claim(self, run: Run, on_busy: str) -> Claim:
        """Wait until ``run`` holds its session cluster-wide, and return that hold. If another
        process's run holds it: ``"supersede"`` cancels that run and waits until it has
        ended, ``"enqueue"`` waits until it has ended, ``"reject"`` raises
        :exc:`SessionBusy`. The run is cancelled (``run.cancel(reason)``) if its hold is
        lost or the store is told to stop it.

        Raises:
            SessionBusy: ``on_busy="reject"`` and another process's run holds the session.
            StoreUnavailable: the store cannot be reached.
        """
        ...

    async def stop(self, session_id: str, reason: str) -> bool:
        """Cancel the session's run wherever it runs (with ``reason``) and wait until it has
        ended. Returns ``False`` when no run held the session."""
        ...
